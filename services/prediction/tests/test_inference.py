"""In-process scoring: the compiled scorer (lleaves) and LightGBM's single-row fast path give what
``Booster.predict`` gives, a scorer that cannot be built or disagrees falls back instead of refusing the
model, compiled models are cached safely, ranges stay ordered, models with features the service cannot
compute are refused, and the heuristic is as documented. Real LightGBM and real lleaves/LLVM throughout
(small models: compiling takes time per tree)."""

from __future__ import annotations

import asyncio
import ctypes
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from eta_common import features as F
from eta_common.model_bundle import QUANTILES, load_bundle
from prediction import inference
from prediction.config import PredictionSettings
from prediction.inference import HeuristicModel, QuantileModel, canonical_columns, compiled_cache_file
from prediction.models import ModelHolder, load_model
from prediction.tests.support import synthetic_bundle


@pytest.fixture(scope="module")
def blob() -> bytes:
    return synthetic_bundle(rows=1500, rounds=25)


@pytest.fixture(scope="module")
def small_blob() -> bytes:
    """For the tests that compile a model several times: 5 rounds compile in ~0.2 s."""
    return synthetic_bundle(rows=800, rounds=5, seed=3)


@pytest.fixture(scope="module")
def compiled(blob: bytes) -> QuantileModel:
    return load_model("v1", blob)


@pytest.fixture(scope="module")
def fast(blob: bytes) -> QuantileModel:
    return load_model("v1", blob, compile_trees=False)


def _reference(blob: bytes, rows: np.ndarray) -> np.ndarray:
    """(low, point, high) straight from ``Booster.predict`` on rows in the canonical layout."""
    bundle = load_bundle("ref", blob)
    return np.sort(np.vstack([bundle.boosters[q].predict(rows) for q in QUANTILES]), axis=0)


def _rows(n: int, seed: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rows = rng.uniform(0.0, 20.0, size=(n, len(F.FEATURE_NAMES)))
    rows[::4, F.FEATURE_NAMES.index(F.MEAN_PREP_MINUTES_60.name)] = np.nan
    rows[1::5, F.FEATURE_NAMES.index(F.FREE_DRIVERS_NEARBY)] = np.nan
    return rows


@pytest.mark.parametrize("scorer", ["compiled", "fast"])
@pytest.mark.parametrize("n", [1, 7, 50, 100])
def test_scorers_match_booster_predict(
    blob: bytes, compiled: QuantileModel, fast: QuantileModel, scorer: str, n: int
) -> None:
    model = {"compiled": compiled, "fast": fast}[scorer]
    assert model.scorer == scorer
    rows = _rows(n)
    assert np.isnan(rows).any()
    point, low, high = model.predict(rows)
    reference = _reference(blob, rows)
    np.testing.assert_allclose(low, reference[0], rtol=1e-12)
    np.testing.assert_allclose(point, reference[1], rtol=1e-12)
    np.testing.assert_allclose(high, reference[2], rtol=1e-12)
    assert np.all(low <= point)
    assert np.all(point <= high)


def test_compiled_scorer_matches_on_values_at_split_thresholds_and_zeros(
    blob: bytes, compiled: QuantileModel
) -> None:
    probe = inference._probe_rows(compiled._boosters, compiled.columns)
    assert len(probe) > 40  # random rows, zeros and missing values, plus values exactly on thresholds
    point, low, high = compiled.predict(probe)
    reference = _reference(blob, probe)
    np.testing.assert_allclose(np.vstack([low, point, high]), reference, rtol=1e-12)


def test_model_columns_follow_its_own_feature_order(blob: bytes) -> None:
    data = json.loads(blob)
    reordered = list(reversed(data["feature_names"]))
    assert canonical_columns(reordered) == [F.FEATURE_NAMES.index(n) for n in reordered]


def test_a_model_needing_unknown_features_is_refused(blob: bytes) -> None:
    data = json.loads(blob)
    data["feature_names"] = [*data["feature_names"][:-1], "weather_index"]
    with pytest.raises(ValueError, match="weather_index"):
        QuantileModel(load_bundle("v-bad", json.dumps(data).encode()))


def test_heuristic_is_distance_and_kitchen_load() -> None:
    rows = np.zeros((2, len(F.FEATURE_NAMES)))
    rows[:, F.FEATURE_NAMES.index(F.DISTANCE_KM)] = [2.0, 4.0]
    rows[:, F.FEATURE_NAMES.index(F.ORDERS_IN_KITCHEN)] = [3.0, np.nan]
    point, low, high = HeuristicModel().predict(rows)
    np.testing.assert_allclose(point, [10 + 5 + 6, 10 + 10])
    np.testing.assert_allclose(low, point * 0.65)
    np.testing.assert_allclose(high, point * 1.35)


@pytest.mark.parametrize("scorer", ["compiled", "fast", "booster"])
def test_predict_one_matches_predict(blob: bytes, compiled: QuantileModel, scorer: str) -> None:
    if scorer == "compiled":
        model = compiled
    else:
        model = load_model("v1", blob, compile_trees=False)
        if scorer == "booster":
            model.use(model._reference)  # the Booster.predict fallback
        assert model.scorer == scorer
    rows = _rows(9, seed=11)
    point, low, high = model.predict(rows)
    for i, row in enumerate(rows.tolist()):
        assert model.predict_one(row) == (point[i], low[i], high[i])


def test_compile_setting_off_serves_on_the_fast_path(
    monkeypatch: pytest.MonkeyPatch, small_blob: bytes
) -> None:
    monkeypatch.setenv("PREDICTION_MODEL_COMPILE", "false")
    monkeypatch.setenv("PREDICTION_MODEL_CACHE_DIR", "/var/cache/eta-models")
    settings = PredictionSettings.from_env()
    assert (settings.model_compile, settings.model_cache_dir) == (False, "/var/cache/eta-models")
    model = load_model("v1", small_blob, compile_trees=settings.model_compile)
    assert (model.scorer, model.fast_path) == ("fast", True)
    monkeypatch.delenv("PREDICTION_MODEL_COMPILE")
    monkeypatch.delenv("PREDICTION_MODEL_CACHE_DIR")
    defaults = PredictionSettings.from_env()
    assert (defaults.model_compile, defaults.model_cache_dir) == (True, "")


def _failing_compile(jobs: Any) -> None:
    raise RuntimeError("lleaves compiler exited with -6: LLVM ERROR: out of registers")


@pytest.mark.parametrize(
    "breakage",
    ["compile raises", "lleaves missing", "compiled code disagrees"],
)
def test_a_broken_compiled_scorer_falls_back_to_the_fast_path(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, small_blob: bytes, breakage: str
) -> None:
    if breakage == "compile raises":
        monkeypatch.setattr(inference, "_compile", _failing_compile)
    elif breakage == "lleaves missing":
        monkeypatch.setitem(sys.modules, "lleaves", None)  # import lleaves -> ImportError
    else:
        real_init = inference._CompiledBooster.__init__

        def skewed_init(self: Any, *args: Any, **kwargs: Any) -> None:
            real_init(self, *args, **kwargs)
            score = self.score

            def off_by_a_little(data: int, out: int, start: int, end: int) -> None:
                score(data, out, start, end)
                values = (ctypes.c_double * end).from_address(out)
                for i in range(start, end):
                    values[i] += 1e-6

            self.score = off_by_a_little

        monkeypatch.setattr(inference._CompiledBooster, "__init__", skewed_init)
    with caplog.at_level(logging.WARNING, logger="prediction.inference"):
        model = load_model("v1", small_blob)
    assert (model.scorer, model.compile_seconds) == ("fast", 0.0)
    assert "compiled scorer unavailable" in caplog.text
    why = {"compile raises": "out of registers", "lleaves missing": "import of lleaves"}
    assert why.get(breakage, "disagrees with Booster.predict") in str(
        [getattr(r, "error", "") for r in caplog.records]
    )
    rows = _rows(20, seed=4)
    point, low, high = model.predict(rows)
    np.testing.assert_allclose(np.vstack([low, point, high]), _reference(small_blob, rows), rtol=1e-12)
    assert model.predict_one(rows[0].tolist()) == (point[0], low[0], high[0])


async def test_the_holder_compiles_the_serving_model_while_it_serves(small_blob: bytes) -> None:
    holder = ModelHolder()
    model = load_model("v1", small_blob, compile_trees=False)  # what refresh() installs
    holder.install(model)
    assert model.scorer == "fast"
    rows = _rows(30, seed=9).tolist()
    before = [model.predict_one(row) for row in rows]
    # the compile runs in a worker thread while this (the scoring) thread keeps answering
    compiling = asyncio.create_task(holder.compile_current())
    during = []
    while not compiling.done():
        during.append([model.predict_one(row) for row in rows])
        await asyncio.sleep(0)
    await compiling
    assert model.scorer == "compiled"
    assert during  # it did serve while compiling
    assert all(answers == before for answers in during)
    after = [model.predict_one(row) for row in rows]
    np.testing.assert_allclose(after, before, rtol=1e-12)
    await holder.compile_current()  # once per model: nothing to do
    assert model.scorer == "compiled"


async def test_the_holder_leaves_models_on_the_fast_path_when_compiling_is_off(small_blob: bytes) -> None:
    holder = ModelHolder(compile_trees=False)
    model = load_model("v1", small_blob, compile_trees=False)
    holder.install(model)
    await holder.compile_current()
    assert model.scorer == "fast"


def _count_compiles(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Spy on the compile step (the real one runs): the model files it compiled."""
    compiled: list[Path] = []
    real: Callable[..., None] = inference._compile

    def counting(jobs: list[tuple[Path, Path]]) -> None:
        compiled.extend(model_file for model_file, _ in jobs)
        real(jobs)

    monkeypatch.setattr(inference, "_compile", counting)
    return compiled


def test_a_second_load_reuses_the_cached_object_files(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, small_blob: bytes
) -> None:
    compiles = _count_compiles(monkeypatch)
    cache = tmp_path / "compiled"  # created on first use
    first = load_model("v1", small_blob, cache_dir=str(cache))
    assert (first.scorer, first.compiled_from_cache, len(compiles)) == ("compiled", False, 3)
    files = sorted(cache.iterdir())
    assert [f.name.split("-")[:2] for f in files] == [["v1", "p10"], ["v1", "p50"], ["v1", "p90"]]
    assert all(f.suffix == ".o" for f in files)  # no temporary file left behind

    second = load_model("v1", small_blob, cache_dir=cache)
    assert (second.scorer, second.compiled_from_cache, len(compiles)) == ("compiled", True, 3)
    rows = _rows(50, seed=8)
    for got, want in zip(second.predict(rows), first.predict(rows), strict=True):
        np.testing.assert_array_equal(got, want)


def test_a_damaged_cache_file_is_compiled_again_and_replaced(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, small_blob: bytes
) -> None:
    load_model("v1", small_blob, cache_dir=tmp_path)
    files = sorted(tmp_path.iterdir())
    good = [f.read_bytes() for f in files]
    files[0].write_bytes(good[0][: len(good[0]) // 2])  # truncated: LLVM would abort the process on it
    files[1].write_bytes(b"not an object file")
    compiles = _count_compiles(monkeypatch)
    model = load_model("v1", small_blob, cache_dir=tmp_path)
    assert (model.scorer, model.compiled_from_cache, len(compiles)) == ("compiled", False, 2)
    assert [f.read_bytes() for f in files] == good


def test_cache_file_names_never_let_another_model_reuse_an_object_file(tmp_path: Path) -> None:
    name = compiled_cache_file(tmp_path, "2024-06-01/run 7", 0.9, "tree text")
    assert name.parent == tmp_path
    assert name.name.startswith("2024-06-01_run_7-p90-")
    assert compiled_cache_file(tmp_path, "2024-06-01/run 7", 0.9, "tree text") == name
    others = {
        compiled_cache_file(tmp_path, "2024-06-01/run 7", 0.9, "other tree text"),
        compiled_cache_file(tmp_path, "2024-06-01/run 7", 0.5, "tree text"),
        compiled_cache_file(tmp_path, "2024-06-02", 0.9, "tree text"),
    }
    assert name not in others
    assert len(others) == 3


def test_heuristic_predict_one_matches_predict() -> None:
    rows = _rows(3, seed=5)
    point, low, high = HeuristicModel().predict(rows)
    assert HeuristicModel().predict_one(rows[1].tolist()) == (point[1], low[1], high[1])
