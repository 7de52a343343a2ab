from __future__ import annotations

import json
import math

import numpy as np
import pytest

from eta_common.model_bundle import dump_bundle, load_bundle
from trainer.evaluate import score
from trainer.tests.support import synthetic
from trainer.train import conformal_offset, fit_calibrated_models, fit_quantile_models, shift_booster


def test_conformal_offset_is_the_finite_sample_quantile() -> None:
    scores = np.arange(1.0, 20.0)  # 19 scores: rank ⌈20 × 0.9⌉ = 18
    assert conformal_offset(scores, 0.1) == 18.0
    assert conformal_offset(np.arange(1.0, 10.0), 0.1) == 9.0  # ⌈10 × 0.9⌉ = 9: the largest of 9
    assert conformal_offset(np.arange(1.0, 9.0), 0.1) == math.inf  # 8 scores are too few for 90 %
    assert conformal_offset(np.array([]), 0.1) == math.inf


def test_shift_booster_moves_every_prediction_by_exactly_the_offset() -> None:
    data = synthetic(600)
    booster = fit_quantile_models(data, rounds=20)[0.9]
    shifted = shift_booster(booster, 2.5)
    before = np.asarray(booster.predict(data.X))
    after = np.asarray(shifted.predict(data.X))
    assert np.allclose(after - before, 2.5)
    assert np.allclose(shift_booster(booster, 0.0).predict(data.X), before)
    # it survives the bundle round trip the prediction service does
    boosters = fit_quantile_models(data, rounds=20)
    boosters[0.9] = shifted
    model = load_bundle("v", dump_bundle(data.feature_names, boosters))
    assert np.allclose(model.boosters[0.9].predict(data.X), after)


def test_calibrated_range_covers_80_percent_of_new_data_and_stays_a_format_1_bundle() -> None:
    train, test = synthetic(4000, seed=1), synthetic(3000, seed=2)
    boosters, calibration = fit_calibrated_models(train, rounds=120, folds=5)
    assert calibration.method.startswith("cross-conformal")
    assert calibration.rows == len(train)
    assert calibration.coverage == pytest.approx(0.8, abs=0.01)
    assert calibration.raw_coverage is not None
    assert calibration.raw_coverage < 0.8
    assert calibration.low_offset > 0
    assert calibration.high_offset > 0
    blob = dump_bundle(train.feature_names, boosters)
    assert set(json.loads(blob)) == {"format", "feature_names", "quantiles"}
    point, low, high = load_bundle("v", blob).predict(test.X)
    s = score(test.y, point, low, high)
    assert s.coverage == pytest.approx(0.8, abs=0.03)
    assert np.mean(test.y < low) == pytest.approx(0.1, abs=0.025)
    assert np.mean(test.y > high) == pytest.approx(0.1, abs=0.025)
    names = test.feature_names
    truth = (
        12.0 + 3.0 * test.X[:, names.index("distance_km")] + 2.0 * test.X[:, names.index("orders_in_kitchen")]
    )
    assert s.mae < 1.05 * float(np.mean(np.abs(test.y - truth)))  # within 5 % of the noise floor


def test_too_little_data_falls_back_to_raw_quantiles() -> None:
    boosters, calibration = fit_calibrated_models(synthetic(120), rounds=10, folds=5)
    assert calibration.method == "none"
    assert set(boosters) == {0.1, 0.5, 0.9}
