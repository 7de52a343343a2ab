"""In-process scoring of the quantile bundle, one thread, no per-call setup.

``lightgbm.Booster.predict`` builds a predictor, validates and converts its input on every call: ~80 µs
per booster for one row here, ~250 µs for the three quantiles. Two faster scorers, best first:

- **compiled** (``PREDICTION_MODEL_COMPILE``, default on): each booster's trees are compiled to machine
  code by lleaves (LLVM), ~2 s per 150-round booster here, in a child process (niced: no GIL or CPU taken
  from the scoring thread, and an LLVM crash cannot take the service down); the object code is then
  loaded into the service and the compiled function
  ``forest_root(data, out, start, end)`` is called directly through ctypes: one call per booster scores
  every row of a batch, a single row is read from a preallocated C array. No LightGBM, no numpy
  conversion, no lleaves wrapper (its ``predict`` adds ~20 µs of Python per call). For the three
  150-round boosters: one row ~7.5 µs (fast path ~15 µs), 50 rows ~100 µs (fast path ~830 µs). The
  object files can be cached on disk (``PREDICTION_MODEL_CACHE_DIR``), named by model version, quantile
  and a hash of the model text, the compiler versions and the host CPU, so a different model or machine
  never reuses one;
  a checksum guards each file (LLVM aborts the process on a damaged object file). lleaves sums the trees
  in blocks of 34 (cache blocking, ~40 % faster batches than one block): beyond 34 rounds the sums differ
  from LightGBM's in the last bits (≤ 1e-13 minutes measured), same answers otherwise.
- **fast**: LightGBM's C API single-row fast path (``LGBM_BoosterPredictForMatSingleRowFast``), which
  keeps the per-call setup in a "fast config" made once per booster: ~8 µs per booster per row, on the
  calling thread (``num_threads=1``: no OpenMP pool is woken for a single row). Batches loop over their
  rows on the same path, which is also faster than ``LGBM_BoosterPredictForMat`` for ≤100 rows.

A single prediction skips numpy altogether (``predict_one``: the row is copied into a preallocated C
array); the trees then dominate (150 rounds × 3 quantiles, see ``trainer.train.ROUNDS``).

Neither scorer is thread-safe (shared buffers, the fast config); the service scores only on its
event-loop thread. Every scorer is checked against ``Booster.predict`` on probe rows (missing values,
zeros, values exactly on split thresholds) before the model serves: if lleaves is missing, fails to
compile or disagrees, the model scores on the fast path; if that is unavailable or disagrees, through
``Booster.predict`` (slower, same answers). A scorer problem never refuses a model. The service installs
a new model on the fast path and compiles it while it serves (:meth:`QuantileModel.compile` in a worker
thread, :meth:`QuantileModel.use` on the event loop; see ``prediction.models``).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path

import lightgbm as lgb
import numpy as np
import numpy.typing as npt

from eta_common import features as F
from eta_common.model_bundle import QUANTILES, EtaModel

__all__ = ["SCORERS", "Array", "HeuristicModel", "QuantileModel", "ServingModel", "canonical_columns"]

log = logging.getLogger(__name__)
Array = npt.NDArray[np.float64]

_C_API_DTYPE_FLOAT64 = 1
_C_API_PREDICT_NORMAL = 0
SCORERS = ("compiled", "fast", "booster")  # best first, see the module doc
# lleaves' compiled entry point: void forest_root(double *data, double *out, int32 start, int32 end)
# scores rows [start, end) of the row-major ``data`` (n × the model's features) into out[start:end].
# Addresses go in as plain ints (c_void_p): no pointer objects are built per call.
_ENTRY = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int32, ctypes.c_int32)


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


class _CompiledBooster:
    """One booster's machine code (compiled by lleaves), called directly through ctypes."""

    def __init__(self, model_file: Path, object_file: Path, num_features: int, *, from_cache: bool) -> None:
        import lleaves  # optional at run time: without it the model scores on the fast path

        if not object_file.is_file():  # lleaves would compile here, on the serving process' GIL
            raise RuntimeError(f"no compiled code for {model_file.name}")
        model = lleaves.Model(model_file=str(model_file))
        if model.num_feature() != num_features or model.num_model_per_iteration() != 1:
            raise ValueError(
                f"lleaves sees {model.num_feature()} features and {model.num_model_per_iteration()} "
                f"outputs per row, the bundle {num_features} and 1"
            )
        model.compile(cache=str(object_file))  # the object file exists: this only loads and links it
        self._model = model  # owns the LLVM execution engine that holds the machine code: keep it alive
        address = ctypes.cast(model._c_entry_func, ctypes.c_void_p).value
        if not address:  # an object file without the function: calling it would crash
            raise RuntimeError("compiled model has no entry point")
        self.score: Callable[..., None] = _ENTRY(address)
        self.from_cache = from_cache


# Run by _compile in a child process: lleaves turns each model.txt into an object file (its cache file).
_COMPILER = """
import os, sys
os.nice(10)  # yield the CPU to the service, which keeps scoring while this compiles
import lleaves
for model_file, object_file in zip(sys.argv[1::2], sys.argv[2::2]):
    lleaves.Model(model_file=model_file).compile(cache=object_file)
"""
_COMPILE_TIMEOUT_SECONDS = 900.0


def _compile(jobs: Sequence[tuple[Path, Path]]) -> None:
    """Compile each (LightGBM model text file, object file to write) with lleaves, in a child process:
    generating and optimising the code takes seconds of CPU per 150-round booster, a good part of it in
    Python (lleaves builds the LLVM IR in Python), which in a thread would hold the service's GIL for
    5 ms slices and stall its event loop; and an LLVM crash (it aborts on some errors) takes only the child
    down. Defaults otherwise: trees cache-blocked by 34, inlined, LLVM's large code model (the small one
    is faster but can crash with MCJIT's memory layout), fp64, this host's CPU (the same as the parent's).
    """
    if not jobs:
        return
    args = [str(path) for job in jobs for path in job]
    done = subprocess.run(
        [sys.executable, "-c", _COMPILER, *args],
        capture_output=True,
        text=True,
        timeout=_COMPILE_TIMEOUT_SECONDS,
        check=False,
    )
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines()
        raise RuntimeError(f"lleaves compiler exited with {done.returncode}: {' | '.join(lines[-3:])}")


_CACHE_MAGIC = b"eta-llv1"  # + sha256 of the object code + the object code


def _read_cached(cache_file: Path) -> bytes | None:
    """The object code in ``cache_file``, or None when there is none or it is damaged."""
    try:
        data = cache_file.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning(
            "compiled model cache unreadable", extra={"cache_file": str(cache_file), "error": str(exc)}
        )
        return None
    header = len(_CACHE_MAGIC) + hashlib.sha256().digest_size
    code = data[header:]
    if not data.startswith(_CACHE_MAGIC) or hashlib.sha256(code).digest() != data[len(_CACHE_MAGIC) : header]:
        log.warning("compiled model cache damaged; compiling again", extra={"cache_file": str(cache_file)})
        return None
    return code


def _write_cached(cache_file: Path, code: bytes) -> None:
    """Store object code with its checksum, written under a temporary name and renamed: a crash or a
    concurrent load never leaves a partial file under the name a later load reads."""
    partial = cache_file.with_name(f".{cache_file.name}.{os.getpid()}-{threading.get_ident()}.partial")
    try:
        partial.write_bytes(_CACHE_MAGIC + hashlib.sha256(code).digest() + code)
        os.replace(partial, cache_file)
    except OSError as exc:
        log.warning("compiled model not cached", extra={"cache_file": str(cache_file), "error": str(exc)})
    finally:
        with contextlib.suppress(OSError):
            partial.unlink(missing_ok=True)


def _compiler_fingerprint() -> str:
    """What else decides the machine code besides the model text: the compiler versions and the CPU the
    code is generated for (a cache directory shared by different machines must not mix them)."""
    from importlib import metadata

    import llvmlite.binding as llvm

    try:
        features = llvm.get_host_cpu_features().flatten()
    except RuntimeError:  # LLVM cannot detect them here; lleaves then compiles without extra features
        features = ""
    return "\0".join(
        [metadata.version("lleaves"), metadata.version("llvmlite"), llvm.get_host_cpu_name(), features]
    )


def compiled_cache_file(cache_dir: Path, version: str, quantile: float, model_text: str) -> Path:
    """Where the compiled ``quantile`` booster of model ``version`` is cached: the name carries the version
    and quantile (for people) and a hash of the model text and the compiler fingerprint (for safety:
    lleaves loads a cached object file without any check)."""
    digest = hashlib.sha256(f"{_compiler_fingerprint()}\0{model_text}".encode()).hexdigest()[:24]
    readable = re.sub(r"[^A-Za-z0-9._-]", "_", version)[:80]
    return cache_dir / f"{readable}-p{round(quantile * 100):02d}-{digest}.o"


def _probe_rows(boosters: Sequence[lgb.Booster], columns: Sequence[int]) -> Array:
    """Rows in the canonical layout that exercise what a scorer could get wrong: random values, missing
    values, zeros (LightGBM's zero-as-missing splits) and values exactly on split thresholds (``<=``)."""
    width = len(F.FEATURE_NAMES)
    rng = np.random.default_rng(0)
    random = np.vstack([rng.uniform(0.0, 30.0, size=(24, width)), rng.uniform(-5.0, 200.0, size=(8, width))])
    random[::3, 0] = np.nan
    random[1::4, -1] = np.nan
    for i in range(2, len(random), 5):
        random[i, i % width] = np.nan
    zeros = rng.uniform(0.0, 30.0, size=(4, width))
    zeros[0, :] = 0.0
    zeros[1, ::2] = 0.0
    zeros[2, 1::2] = 0.0
    zeros[3, :] = np.nan
    splits: set[tuple[int, float]] = set()
    for booster in boosters:
        for tree in booster.dump_model(num_iteration=4)["tree_info"]:
            stack = [tree["tree_structure"]]
            while stack:
                node = stack.pop()
                if "split_feature" in node:
                    if isinstance(node.get("threshold"), float):  # numerical split (not categorical)
                        splits.add((int(node["split_feature"]), float(node["threshold"])))
                    stack += [node["left_child"], node["right_child"]]
    grouped: list[dict[int, float]] = []  # up to 4 thresholds of different features per row
    for feature, threshold in sorted(splits):
        row = next((r for r in grouped if feature not in r and len(r) < 4), None)
        if row is None:
            grouped.append(row := {})
        row[feature] = threshold
    on_threshold = rng.uniform(0.0, 30.0, size=(len(grouped), width))
    for i, row in enumerate(grouped):
        for feature, threshold in row.items():
            on_threshold[i, columns[feature]] = threshold
    return np.vstack([random, zeros, on_threshold])


class _BoosterScorer:
    """``Booster.predict``: the reference, and the scorer of last resort."""

    name = "booster"

    def __init__(self, boosters: Sequence[lgb.Booster], columns: Sequence[int]) -> None:
        self._boosters = boosters
        self._columns = columns

    def scores(self, model_rows: Array) -> Array:
        """(boosters × rows) predictions of C-contiguous float64 rows in the model's feature order."""
        return np.vstack(
            [np.asarray(b.predict(model_rows, num_threads=1), dtype=np.float64) for b in self._boosters]
        )

    def predict_one(self, row: Sequence[float]) -> tuple[float, float, float]:
        out = self.scores(np.array([[row[c] for c in self._columns]], dtype=np.float64))[:, 0]
        low, point, high = sorted(out.tolist())
        return point, low, high


class _FastScorer:
    """LightGBM's single-row fast path, row by row."""

    name = "fast"

    def __init__(self, boosters: Sequence[lgb.Booster], columns: Sequence[int]) -> None:
        self._fast = [_FastBooster(b, len(columns)) for b in boosters]
        self._columns = columns
        self._row = (ctypes.c_double * len(columns))()  # predict_one's input row, filled in place
        self._row_ptr = ctypes.cast(self._row, ctypes.c_void_p)

    def scores(self, model_rows: Array) -> Array:
        n = model_rows.shape[0]
        out = np.empty((len(self._fast), n), dtype=np.float64)
        base = model_rows.ctypes.data
        addresses = [base + i * model_rows.strides[0] for i in range(n)]
        # Booster by booster (not row by row): one booster's trees stay in cache across the rows, which
        # makes a batch ~30 % faster than alternating between the three boosters' trees.
        for q, booster in enumerate(self._fast):
            predict_row, target = booster.predict_row, out[q]
            for i, address in enumerate(addresses):
                target[i] = predict_row(address)
        return out

    def predict_one(self, row: Sequence[float]) -> tuple[float, float, float]:
        self._row[:] = [row[c] for c in self._columns]
        pointer = self._row_ptr
        low, point, high = sorted([booster.predict_at(pointer) for booster in self._fast])
        return point, low, high


class _CompiledScorer:
    """The boosters compiled by lleaves: one native call per booster for a whole batch or a single row."""

    name = "compiled"

    def __init__(
        self, compiled: Sequence[_CompiledBooster], columns: Sequence[int], *, compile_seconds: float
    ) -> None:
        self._compiled = compiled  # keeps the machine code alive
        self._columns = columns
        self.from_cache = all(c.from_cache for c in compiled)
        self.compile_seconds = compile_seconds
        self._row = (ctypes.c_double * len(columns))()  # predict_one's input row and outputs, in place
        self._row_ptr = ctypes.addressof(self._row)
        self._out = (ctypes.c_double * len(compiled))()
        size = ctypes.sizeof(ctypes.c_double)
        self._calls = [(c.score, ctypes.addressof(self._out) + q * size) for q, c in enumerate(compiled)]

    def scores(self, model_rows: Array) -> Array:
        n = model_rows.shape[0]
        out = np.empty((len(self._compiled), n), dtype=np.float64)
        data, base, stride = model_rows.ctypes.data, out.ctypes.data, out.strides[0]
        # one call per booster scores every row (its trees stay in cache across the rows)
        for q, booster in enumerate(self._compiled):
            booster.score(data, base + q * stride, 0, n)
        return out

    def predict_one(self, row: Sequence[float]) -> tuple[float, float, float]:
        self._row[:] = [row[c] for c in self._columns]
        pointer = self._row_ptr
        for score, out in self._calls:
            score(pointer, out, 0, 1)
        low, point, high = sorted(self._out)
        return point, low, high


_Scorer = _BoosterScorer | _FastScorer | _CompiledScorer


class QuantileModel(ServingModel):
    """A registry bundle (p10/p50/p90 boosters) ready to serve.

    ``scorer`` says what scores it (see :data:`SCORERS` and the module doc). With ``compile_trees`` the
    trees are compiled here (seconds: construct it off the event loop) and ``cache_dir`` keeps the object
    files across loads. Without, the model serves on the fast path and can be compiled later while it
    serves: :meth:`compile` in a worker thread, then :meth:`use` on the scoring thread.
    """

    def __init__(
        self, bundle: EtaModel, *, compile_trees: bool = True, cache_dir: str | Path | None = None
    ) -> None:
        self.version = bundle.version
        self.feature_names = tuple(bundle.feature_names)
        self.columns = canonical_columns(bundle.feature_names)
        self._bundle = bundle
        self._boosters = [bundle.boosters[q] for q in QUANTILES]
        self._reference = _BoosterScorer(self._boosters, self.columns)
        # what every scorer must reproduce before it serves (computed now: compile() then needs no
        # LightGBM call while the model serves)
        self._probe = _probe_rows(self._boosters, self.columns)
        self._probe_want = np.sort(self._reference.scores(self._model_rows(self._probe)), axis=0)
        self._scorer: _Scorer = self._reference
        self.scorer = self._reference.name
        self.compile_seconds = 0.0
        self.compiled_from_cache = False
        try:
            fast = _FastScorer(self._boosters, self.columns)
            self._check(fast)
            self.use(fast)
        except (AttributeError, OSError, RuntimeError, ValueError) as exc:
            log.warning(
                "LightGBM fast path unavailable; scoring through Booster.predict",
                extra={"model_version": self.version, "error": str(exc)},
            )
        if compile_trees:
            compiled = self.compile(cache_dir)
            if compiled is not None:
                self.use(compiled)

    @property
    def fast_path(self) -> bool:
        """Whether the model scores without ``Booster.predict`` (compiled or LightGBM's fast path)."""
        return self.scorer != "booster"

    def use(self, scorer: _Scorer) -> None:
        """Score with ``scorer`` from now on (checked already). Call it on the scoring thread."""
        self._scorer = scorer
        self.scorer = scorer.name
        if isinstance(scorer, _CompiledScorer):
            self.compile_seconds = scorer.compile_seconds
            self.compiled_from_cache = scorer.from_cache

    def compile(self, cache_dir: str | Path | None = None) -> _CompiledScorer | None:
        """The trees compiled to machine code and checked against ``Booster.predict``, or None (logged)
        when lleaves is missing, fails or disagrees. Takes seconds per booster unless ``cache_dir`` holds
        them already. Safe in a worker thread while the model serves: it touches nothing the current
        scorer uses; hand the result to :meth:`use` on the scoring thread."""
        started = time.perf_counter()
        try:
            texts = [booster.model_to_string() for booster in self._boosters]
            files = self._cache_files(Path(cache_dir) if cache_dir else None, texts)
            cached = [f for f in files if f is not None and f.is_file()]
            try:
                return self._compile_checked(texts, files, started)
            except Exception as exc:  # anything from lleaves/LLVM: see below
                if not cached:
                    raise
                # machine code from the cache that does not load or disagrees (written by something
                # else?): drop it and compile once more, which writes a fresh one
                log.warning(
                    "cached compiled model unusable; compiling again",
                    extra={"model_version": self.version, "error": f"{type(exc).__name__}: {exc}"},
                )
                for f in cached:
                    with contextlib.suppress(OSError):
                        f.unlink()
                return self._compile_checked(texts, files, started)
        except Exception as exc:  # lleaves missing, compile failure, disagreement: fall back, never refuse
            log.warning(
                f"compiled scorer unavailable; scoring with the {self.scorer} scorer",
                extra={"model_version": self.version, "error": f"{type(exc).__name__}: {exc}"},
            )
            return None

    def _cache_files(self, cache_dir: Path | None, texts: Sequence[str]) -> list[Path | None]:
        if cache_dir is not None:
            try:
                cache_dir.mkdir(parents=True, exist_ok=True)
                return [
                    compiled_cache_file(cache_dir, self.version, q, text)
                    for q, text in zip(QUANTILES, texts, strict=True)
                ]
            except OSError as exc:
                log.warning(
                    "model cache directory unusable; compiling without a cache",
                    extra={"model_version": self.version, "cache_dir": str(cache_dir), "error": str(exc)},
                )
        return [None] * len(texts)

    def _compile_checked(
        self, texts: Sequence[str], files: Sequence[Path | None], started: float
    ) -> _CompiledScorer:
        import lleaves  # noqa: F401 - missing: fail before compiling for nothing

        width = len(self.feature_names)
        with tempfile.TemporaryDirectory(prefix="eta-lleaves-") as tmp:
            # lleaves reads models from files; it loads an object file without any check (LLVM aborts
            # the process on a damaged one), so it only ever sees private copies of checked cache files
            paths = [(Path(tmp) / f"{i}.txt", Path(tmp) / f"{i}.o") for i in range(len(texts))]
            cached: list[bool] = []
            for text, cache_file, (model_file, object_file) in zip(texts, files, paths, strict=True):
                model_file.write_text(text, encoding="utf-8")
                code = _read_cached(cache_file) if cache_file is not None else None
                if code is not None:
                    object_file.write_bytes(code)
                cached.append(code is not None)
            _compile([job for job, hit in zip(paths, cached, strict=True) if not hit])
            compiled = [
                _CompiledBooster(model_file, object_file, width, from_cache=hit)
                for (model_file, object_file), hit in zip(paths, cached, strict=True)
            ]
            scorer = _CompiledScorer(compiled, self.columns, compile_seconds=time.perf_counter() - started)
            self._check(scorer)
            for cache_file, (_, object_file), hit in zip(files, paths, cached, strict=True):
                if cache_file is not None and not hit:
                    _write_cached(cache_file, object_file.read_bytes())
        return scorer

    def _model_rows(self, rows: Array) -> Array:
        return np.ascontiguousarray(rows[:, self.columns], dtype=np.float64)

    def _check(self, scorer: _Scorer) -> None:
        """``scorer`` must give what ``Booster.predict`` gives on the probe rows, through ``scores`` and
        ``predict_one`` (rtol/atol 1e-9; missing values must not come out NaN)."""
        want = self._probe_want
        got = np.sort(scorer.scores(self._model_rows(self._probe)), axis=0)
        one = np.array([scorer.predict_one(row) for row in self._probe.tolist()]).T[[1, 0, 2]]
        for name, values in (("batch", got), ("single-row", one)):
            if values.shape != want.shape or not np.allclose(values, want, rtol=1e-9, atol=1e-9):
                raise ValueError(f"{scorer.name} scorer ({name}) disagrees with Booster.predict")

    def predict_one(self, row: Sequence[float]) -> tuple[float, float, float]:
        """One row without numpy (compiled and fast scorers: no array allocation, no fancy indexing):
        the same answers as ``predict`` on a 1-row array, with less work around the trees."""
        return self._scorer.predict_one(row)

    def predict(self, rows: Array) -> tuple[Array, Array, Array]:
        out = self._scorer.scores(self._model_rows(rows))
        out.sort(axis=0)  # quantile crossing can happen; ranges must stay ordered
        return out[1], out[0], out[2]
