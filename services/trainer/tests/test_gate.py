"""The promotion gate: a model that does not beat both baselines on its holdout, or whose range
coverage is far off, is never promoted — the first one included — unless forced."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from eta_common.model_bundle import dump_bundle, load_bundle
from trainer.evaluate import Prediction
from trainer.gate import PromotionGate, check_gate
from trainer.run import TrainingOptions, _promotion
from trainer.tests.support import synthetic
from trainer.train import fit_quantile_models


def _metrics(
    mae: float, coverage: float | None, restaurant: float = 10.0, distance: float = 9.0
) -> dict[str, Any]:
    return {
        "model": {"mae": mae, "coverage": coverage},
        "baseline_restaurant_mean": {"mae": restaurant, "coverage": 0.8},
        "baseline_distance": {"mae": distance, "coverage": 0.8},
    }


def test_a_good_model_passes() -> None:
    verdict = check_gate(_metrics(6.0, 0.81), PromotionGate())
    assert verdict.passed
    assert verdict.problems == ()
    assert verdict.ratios == {"baseline_restaurant_mean": 0.6, "baseline_distance": pytest.approx(6 / 9)}
    assert verdict.coverage == 0.81
    assert verdict.reason().startswith(
        "passes the promotion gate (holdout MAE 6.00 min, 0.60× restaurant-mean"
    )
    assert verdict.as_dict()["passed"] is True


def test_the_starved_city_fails_on_both_counts() -> None:
    # the first model of `make run --restaurants 50` with 60 drivers, as measured
    verdict = check_gate(_metrics(322.61, 0.239, restaurant=246.36, distance=237.01), PromotionGate())
    assert not verdict.passed
    assert verdict.problems == (
        "holdout MAE 322.61 min is not below the restaurant-mean baseline's 246.36 min",
        "holdout MAE 322.61 min is not below the distance/speed baseline's 237.01 min",
        "p10–p90 coverage 23.9% is outside 65%–95% (nominal 80 %)",
    )
    assert verdict.reason().startswith("fails the promotion gate: holdout MAE 322.61")


@pytest.mark.parametrize(
    ("metrics", "problem"),
    [
        (_metrics(9.5, 0.8), "not below the distance/speed baseline's 9.00 min"),  # beats only one
        (_metrics(9.0, 0.8), "not below the distance/speed baseline's 9.00 min"),  # a tie does not beat
        (_metrics(6.0, 0.50), "coverage 50.0% is outside 65%–95%"),  # range far too narrow
        (_metrics(6.0, 0.99), "coverage 99.0% is outside 65%–95%"),  # range uselessly wide
        (_metrics(6.0, None), "coverage unknown is outside"),
        (_metrics(float("nan"), 0.8), "holdout MAE is not a number"),
        ({"model": {"mae": 6.0, "coverage": 0.8}}, "no restaurant-mean baseline"),
    ],
)
def test_each_way_to_fail(metrics: dict[str, Any], problem: str) -> None:
    verdict = check_gate(metrics, PromotionGate())
    assert not verdict.passed
    assert any(problem in p for p in verdict.problems), verdict.problems


def test_the_gate_is_configurable() -> None:
    strict = PromotionGate(max_mae_ratio=0.7, min_coverage=0.75, max_coverage=0.85)
    assert not check_gate(_metrics(7.5, 0.8), strict).passed  # 0.75× and 0.83× the baselines
    assert check_gate(_metrics(6.0, 0.8), strict).passed
    assert not check_gate(_metrics(6.0, 0.7), strict).passed
    with pytest.raises(ValueError, match="max_mae_ratio"):
        PromotionGate(max_mae_ratio=0)
    with pytest.raises(ValueError, match="min_coverage"):
        PromotionGate(min_coverage=0.9, max_coverage=0.8)


class FakePool:
    """Just what ``load_promoted`` asks of a pool: the promoted model's row, or none."""

    def __init__(self, row: dict[str, Any] | None) -> None:
        self.row = row

    async def fetchrow(self, _query: str, *_args: Any) -> dict[str, Any] | None:
        return self.row


@pytest.fixture(scope="module")
def data() -> tuple[Any, Any, bytes]:
    train, holdout = synthetic(1500, seed=3).split(0.2)
    incumbent = dump_bundle(train.feature_names, fit_quantile_models(train, rounds=30))
    return train, holdout, incumbent


def _row(version: str, blob: bytes, names: list[str]) -> dict[str, Any]:
    return {"version": version, "feature_names": json.dumps(names), "metrics": "{}", "model_blob": blob}


async def _decide(
    pool: FakePool, metrics: dict[str, Any], data: tuple[Any, Any, bytes], *, force: bool = False
) -> tuple[bool, str]:
    train, holdout, _ = data
    options = TrainingOptions(force_promote=force)
    return await _promotion(pool, options, train, holdout, metrics["model"]["mae"], metrics)


async def test_a_bad_first_model_is_not_promoted_unless_forced(data: tuple[Any, Any, bytes]) -> None:
    bad = _metrics(322.61, 0.239, restaurant=246.36, distance=237.01)
    promote, reason = await _decide(FakePool(None), bad, data)
    assert not promote
    assert reason.startswith(
        "no model promoted yet, and this one fails the promotion gate: holdout MAE 322.61"
    )
    assert bad["gate"]["passed"] is False  # the verdict is stored with the run's metrics
    promote, reason = await _decide(FakePool(None), _metrics(322.61, 0.239, 246.36, 237.01), data, force=True)
    assert promote
    assert reason.startswith("forced; no model promoted yet; fails the promotion gate")


async def test_a_good_first_model_is_promoted(data: tuple[Any, Any, bytes]) -> None:
    promote, reason = await _decide(FakePool(None), _metrics(6.0, 0.8), data)
    assert promote
    assert reason.startswith("no model promoted yet; passes the promotion gate")


async def test_with_an_incumbent_the_model_must_pass_and_be_better(data: tuple[Any, Any, bytes]) -> None:
    train, holdout, blob = data
    pool = FakePool(_row("v-old", blob, train.feature_names))
    point, _, _ = load_bundle("v-old", blob).predict(holdout.X)
    incumbent_mae = Prediction(np.asarray(point)).score(holdout.y).mae

    promote, reason = await _decide(pool, _metrics(incumbent_mae - 0.5, 0.8, 50.0, 50.0), data)
    assert promote
    assert reason.startswith("better: holdout MAE")
    assert reason.endswith("coverage 80.0%)")

    promote, reason = await _decide(pool, _metrics(incumbent_mae + 0.5, 0.8, 50.0, 50.0), data)
    assert not promote
    assert reason.startswith("not better: ")

    promote, reason = await _decide(pool, _metrics(incumbent_mae - 0.5, 0.3, 50.0, 50.0), data)
    assert not promote  # better than the incumbent, but its range is far off
    assert reason.startswith("better than v-old (")
    assert "but it fails the promotion gate: p10–p90 coverage 30.0%" in reason

    promote, reason = await _decide(pool, _metrics(incumbent_mae + 0.5, 0.3, 50.0, 50.0), data, force=True)
    assert promote
    assert reason.startswith("forced (holdout MAE")


async def test_an_unusable_incumbent_loses_only_to_a_model_that_passes(data: tuple[Any, Any, bytes]) -> None:
    train, _, _ = data
    pool = FakePool(_row("v-broken", b"not a bundle", train.feature_names))
    promote, reason = await _decide(pool, _metrics(6.0, 0.8), data)
    assert promote
    assert reason.startswith("promoted model v-broken cannot score the holdout")
    promote, reason = await _decide(pool, _metrics(60.0, 0.8), data)
    assert not promote
    assert "but this one fails the promotion gate" in reason
