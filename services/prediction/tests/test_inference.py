"""In-process scoring: the single-row fast path gives exactly what ``Booster.predict`` gives, ranges stay
ordered, models with features the service cannot compute are refused, and the heuristic is as documented."""

from __future__ import annotations

import json

import numpy as np
import pytest

from eta_common import features as F
from eta_common.model_bundle import QUANTILES, load_bundle
from prediction.inference import HeuristicModel, QuantileModel, canonical_columns
from prediction.models import load_model
from prediction.tests.support import synthetic_bundle


@pytest.fixture(scope="module")
def blob() -> bytes:
    return synthetic_bundle(rows=1500, rounds=25)


def _rows(n: int, seed: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rows = rng.uniform(0.0, 20.0, size=(n, len(F.FEATURE_NAMES)))
    rows[::4, F.FEATURE_NAMES.index(F.MEAN_PREP_MINUTES_60.name)] = np.nan
    rows[1::5, F.FEATURE_NAMES.index(F.FREE_DRIVERS_NEARBY)] = np.nan
    return rows


@pytest.mark.parametrize("n", [1, 7, 100])
def test_fast_path_matches_booster_predict(blob: bytes, n: int) -> None:
    model = load_model("v1", blob)
    assert model.fast_path
    rows = _rows(n)
    point, low, high = model.predict(rows)
    bundle = load_bundle("v1", blob)
    reference = np.sort(np.vstack([bundle.boosters[q].predict(rows) for q in QUANTILES]), axis=0)
    np.testing.assert_allclose(low, reference[0], rtol=1e-12)
    np.testing.assert_allclose(point, reference[1], rtol=1e-12)
    np.testing.assert_allclose(high, reference[2], rtol=1e-12)
    assert np.all(low <= point)
    assert np.all(point <= high)


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


@pytest.mark.parametrize("fast", [True, False])
def test_predict_one_matches_predict(blob: bytes, fast: bool) -> None:
    model = load_model("v1", blob)
    if not fast:
        model._fast = None  # the Booster.predict fallback
    rows = _rows(9, seed=11)
    point, low, high = model.predict(rows)
    for i, row in enumerate(rows.tolist()):
        assert model.predict_one(row) == (point[i], low[i], high[i])


def test_heuristic_predict_one_matches_predict() -> None:
    rows = _rows(3, seed=5)
    point, low, high = HeuristicModel().predict(rows)
    assert HeuristicModel().predict_one(rows[1].tolist()) == (point[1], low[1], high[1])
