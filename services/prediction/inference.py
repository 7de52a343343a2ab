"""In-process scoring of the quantile bundle, one thread, no per-call setup.

``lightgbm.Booster.predict`` builds a predictor, validates and converts its input on every call: ~80 µs
per booster for one row here, ~250 µs for the three quantiles. LightGBM's C API has a single-row fast
path (``LGBM_BoosterPredictForMatSingleRowFast``) that keeps that setup in a "fast config" made once per
booster: ~8 µs per booster per row, on the calling thread (``num_threads=1``: no OpenMP pool is woken
for a single row, so concurrent calls never thrash a thread pool). Batches loop over their rows on the
same path, which is also faster than ``LGBM_BoosterPredictForMat`` for the ≤100 rows a call carries.
A single prediction skips numpy altogether (``predict_one``: the row is copied into a preallocated C
array); the trees then dominate (150 rounds × 3 quantiles, see ``trainer.train.ROUNDS``).

A fast config is not thread-safe; the service scores only on its event-loop thread. Every model is
checked against ``Booster.predict`` on probe rows (with missing values) before it serves; if the fast
path is unavailable or disagrees, the model serves through ``Booster.predict`` instead (slower, same
answers).
"""

from __future__ import annotations

import ctypes
import logging
import weakref
from collections.abc import Sequence

import lightgbm as lgb
import numpy as np
import numpy.typing as npt

from eta_common import features as F
from eta_common.model_bundle import QUANTILES, EtaModel

__all__ = ["Array", "HeuristicModel", "QuantileModel", "ServingModel", "canonical_columns"]

log = logging.getLogger(__name__)
Array = npt.NDArray[np.float64]

_C_API_DTYPE_FLOAT64 = 1
_C_API_PREDICT_NORMAL = 0


def canonical_columns(feature_names: Sequence[str]) -> list[int]:
    """Positions of a model's features in :data:`eta_common.features.FEATURE_NAMES` (the row layout the
    service builds). A name the service does not compute makes the model unusable."""
    unknown = [name for name in feature_names if name not in F.FEATURE_NAMES]
    if unknown:
        raise ValueError(f"model needs features this service does not compute: {unknown}")
    return [F.FEATURE_NAMES.index(name) for name in feature_names]


class ServingModel:
    """What the servicer scores with: ``predict`` takes rows in the canonical layout (n × all features)
    and returns (point, low, high) in minutes with low ≤ point ≤ high."""

    version: str
    feature_names: tuple[str, ...]
    columns: list[int]
    is_heuristic: bool = False

    def predict(self, rows: Array) -> tuple[Array, Array, Array]:
        raise NotImplementedError

    def predict_one(self, row: Sequence[float]) -> tuple[float, float, float]:
        """(point, low, high) of one row in the canonical layout."""
        point, low, high = self.predict(np.array([row], dtype=np.float64))
        return float(point[0]), float(low[0]), float(high[0])


class HeuristicModel(ServingModel):
    """``heuristic-v0``: 10 min + 2.5 min per km + 2 min per order in the kitchen, range ±35 %.

    Used while no registry model is loaded (and ``PREDICTION_HEURISTIC_FALLBACK`` allows it). It needs
    only the request's distance; the kitchen load adds to it when known (0 when missing).
    """

    version = "heuristic-v0"
    is_heuristic = True

    def __init__(self) -> None:
        self.feature_names = tuple(F.FEATURE_NAMES)
        self.columns = list(range(len(F.FEATURE_NAMES)))
        self._distance = F.FEATURE_NAMES.index(F.DISTANCE_KM)
        self._kitchen = F.FEATURE_NAMES.index(F.ORDERS_IN_KITCHEN)

    def predict(self, rows: Array) -> tuple[Array, Array, Array]:
        point = 10.0 + 2.5 * rows[:, self._distance] + 2.0 * np.nan_to_num(rows[:, self._kitchen])
        return point, point * 0.65, point * 1.35


class _FastBooster:
    """One booster's single-row fast path."""

    def __init__(self, booster: lgb.Booster, num_features: int) -> None:
        import lightgbm.basic

        _LIB = lightgbm.basic._LIB  # type: ignore[attr-defined]  # the ctypes handle to lib_lightgbm
        self._booster = booster  # the fast config points into it: keep it alive
        self._lib = _LIB
        handle = ctypes.c_void_p()
        rc = _LIB.LGBM_BoosterPredictForMatSingleRowFastInit(
            booster._handle,
            ctypes.c_int(_C_API_PREDICT_NORMAL),
            ctypes.c_int(0),  # start iteration
            ctypes.c_int(-1),  # all iterations
            ctypes.c_int(_C_API_DTYPE_FLOAT64),
            ctypes.c_int32(num_features),
            ctypes.c_char_p(b"num_threads=1"),
            ctypes.byref(handle),
        )
        if rc != 0:
            raise RuntimeError(f"LightGBM fast predictor init failed: {self._last_error()}")
        self._handle = handle
        self._fn = _LIB.LGBM_BoosterPredictForMatSingleRowFast
        self._out = ctypes.c_double(0.0)
        self._out_ref = ctypes.byref(self._out)
        self._len = ctypes.c_int64(0)
        self._len_ref = ctypes.byref(self._len)
        weakref.finalize(self, _LIB.LGBM_FastConfigFree, handle)

    def _last_error(self) -> str:
        self._lib.LGBM_GetLastError.restype = ctypes.c_char_p
        return bytes(self._lib.LGBM_GetLastError() or b"").decode(errors="replace")

    def predict_row(self, address: int) -> float:
        """Score the C-contiguous float64 row at ``address``."""
        return self.predict_at(ctypes.c_void_p(address))

    def predict_at(self, row: ctypes.c_void_p) -> float:
        if self._fn(self._handle, row, self._len_ref, self._out_ref) != 0:
            raise RuntimeError(f"LightGBM prediction failed: {self._last_error()}")
        return self._out.value


class QuantileModel(ServingModel):
    """A registry bundle (p10/p50/p90 boosters) ready to serve."""

    def __init__(self, bundle: EtaModel) -> None:
        self.version = bundle.version
        self.feature_names = tuple(bundle.feature_names)
        self.columns = canonical_columns(bundle.feature_names)
        self._bundle = bundle
        self._boosters = [bundle.boosters[q] for q in QUANTILES]
        self._fast: list[_FastBooster] | None = None
        # predict_one's input row: filled in place (scoring happens on one thread, see the module doc)
        self._row = (ctypes.c_double * len(self.feature_names))()
        self._row_ptr = ctypes.cast(self._row, ctypes.c_void_p)
        try:
            fast = [_FastBooster(b, len(self.feature_names)) for b in self._boosters]
            self._fast = fast
            self._check_fast_path()
        except (AttributeError, OSError, RuntimeError, ValueError) as exc:
            self._fast = None
            log.warning(
                "LightGBM fast path unavailable; scoring through Booster.predict",
                extra={"model_version": self.version, "error": str(exc)},
            )

    @property
    def fast_path(self) -> bool:
        return self._fast is not None

    def _check_fast_path(self) -> None:
        rng = np.random.default_rng(0)
        probe = rng.uniform(0.0, 30.0, size=(16, len(F.FEATURE_NAMES)))
        probe[::3, 0] = np.nan
        probe[1::4, -1] = np.nan
        fast = self.predict(probe)
        slow = self._predict_booster(np.ascontiguousarray(probe[:, self.columns]))
        for got, want in zip(fast, slow, strict=True):
            if not np.allclose(got, want, rtol=1e-9, atol=1e-9):
                raise ValueError("fast path disagrees with Booster.predict")

    def _predict_booster(self, model_rows: Array) -> tuple[Array, Array, Array]:
        preds = np.vstack(
            [np.asarray(b.predict(model_rows, num_threads=1), dtype=np.float64) for b in self._boosters]
        )
        preds.sort(axis=0)
        return preds[1], preds[0], preds[2]

    def predict_one(self, row: Sequence[float]) -> tuple[float, float, float]:
        """One row without numpy (no array allocation, no fancy indexing): the same answers as
        ``predict`` on a 1-row array, with less work around the trees."""
        fast = self._fast
        if fast is None:
            return super().predict_one(row)
        self._row[:] = [row[c] for c in self.columns]
        pointer = self._row_ptr
        low, point, high = sorted([booster.predict_at(pointer) for booster in fast])
        return point, low, high

    def predict(self, rows: Array) -> tuple[Array, Array, Array]:
        model_rows = np.ascontiguousarray(rows[:, self.columns], dtype=np.float64)
        fast = self._fast
        if fast is None:
            return self._predict_booster(model_rows)
        n = model_rows.shape[0]
        out = np.empty((3, n), dtype=np.float64)
        base = model_rows.ctypes.data
        addresses = [base + i * model_rows.strides[0] for i in range(n)]
        # Booster by booster (not row by row): one booster's trees stay in cache across the rows, which
        # makes a batch ~30 % faster than alternating between the three boosters' trees.
        for q, booster in enumerate(fast):
            predict_row, target = booster.predict_row, out[q]
            for i, address in enumerate(addresses):
                target[i] = predict_row(address)
        out.sort(axis=0)  # quantile crossing can happen; ranges must stay ordered
        return out[1], out[0], out[2]
