"""Fit the LightGBM quantile models (p10 / p50 / p90) and calibrate the range conformally.

Point estimate: the p50 model (the quantile loss at 0.5 is the absolute error, so it targets MAE).

Range: raw quantile models are too narrow out of sample (they are fitted to the rows they then
predict), so the range is **conformally calibrated** with one-sided conformalized-quantile-regression
scores (CQR, Romano, Patterson & Candès 2019), computed out of fold over **contiguous time blocks** of the
training period (cross-conformal / CV+, Vovk 2015, Barber et al. 2021):

* the training period is cut into ``K`` (default 5) consecutive blocks in placement-time order (blocks of
  days, never shuffled rows, so a block's errors include its days' own conditions);
* for each block, p10 and p90 models fitted on the other blocks score it: ``s_low = low − y`` and
  ``s_high = y − high``;
* ``c_low`` = the ⌈(n+1)(1−0.10)⌉-th smallest ``s_low`` over all n training rows, ``c_high`` likewise;
* the shipped models are fitted on the whole training period; the bounds become ``low − c_low`` and
  ``high + c_high``, so that each tail misses ≈ 10 % and the range holds ≈ 80 %.

Why not one calibration slice at the end of the training period? On a simulated month a slice of ~5
days is dominated by its few days' conditions (one day with a driver shortage fattens the upper tail):
measured on the holdout that gave 83–85 % coverage, and its fit lost 20 % of the training rows. Out-of-fold
scores over every training day gave 81.5 % with the full-data fit (docs/model.md has the numbers). The
holdout stays strictly later than all training rows and is never used for fitting or calibration.

The corrections are **baked into the boosters**: every leaf of the first tree of the low (high) model is
shifted by −c_low (+c_high). Each row lands in exactly one leaf of that tree, so every prediction moves by
exactly that constant, and the bundle stays the plain format-1 bundle of :mod:`eta_common.model_bundle`
that the prediction service reads — no format change, no extra field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import lightgbm as lgb
import numpy as np
import numpy.typing as npt

from eta_common.model_bundle import QUANTILES
from trainer.dataset import TrainingSet

__all__ = [
    "PARAMS",
    "ROUNDS",
    "Calibration",
    "conformal_offset",
    "fit_calibrated_models",
    "fit_quantile_models",
    "shift_booster",
]

Array = npt.NDArray[np.float64]
LOW, MID, HIGH = QUANTILES

# 150 rounds at 0.1: the same holdout quality as 300 at 0.05 (bench model_quality) with half the trees,
# i.e. half the scoring time per prediction in the ETA service.
ROUNDS = 150
PARAMS: dict[str, object] = {
    "objective": "quantile",
    "learning_rate": 0.1,
    "num_leaves": 15,
    "min_data_in_leaf": 40,
    "feature_fraction": 0.9,
    "bagging_fraction": 0.9,
    "bagging_freq": 1,
    "lambda_l2": 1.0,
    "verbose": -1,
    "num_threads": 2,
    "seed": 7,
    "deterministic": True,
    "force_row_wise": True,
}


@dataclass(frozen=True)
class Calibration:
    """What the conformal step did (stored with the run's metrics)."""

    method: str  # "cross-conformal CQR, K time blocks" or "none"
    rows: int  # out-of-fold scores used
    low_offset: float  # minutes subtracted from the raw p10
    high_offset: float  # minutes added to the raw p90
    raw_coverage: float | None  # out-of-fold coverage of the raw [p10, p90]
    coverage: float | None  # out-of-fold coverage after the correction

    def as_dict(self) -> dict[str, object]:
        return {
            "method": self.method,
            "rows": self.rows,
            "low_offset_minutes": self.low_offset,
            "high_offset_minutes": self.high_offset,
            "raw_coverage_out_of_fold": self.raw_coverage,
            "coverage_out_of_fold": self.coverage,
        }


def fit_quantile_models(train: TrainingSet, *, rounds: int = ROUNDS) -> dict[float, lgb.Booster]:
    dataset = lgb.Dataset(train.X, label=train.y, feature_name=train.feature_names, free_raw_data=False)
    return {q: lgb.train({**PARAMS, "alpha": q}, dataset, num_boost_round=rounds) for q in QUANTILES}


def conformal_offset(scores: Array, miss_rate: float) -> float:
    """The split-conformal quantile: the ⌈(n+1)(1−miss_rate)⌉-th smallest score (+inf if n is too small)."""
    n = len(scores)
    rank = math.ceil((n + 1) * (1.0 - miss_rate))
    if n == 0 or rank > n:
        return math.inf
    return float(np.partition(scores, rank - 1)[rank - 1])


def shift_booster(booster: lgb.Booster, delta: float) -> lgb.Booster:
    """A copy of ``booster`` whose every prediction is ``delta`` higher (first tree's leaves shifted)."""
    copy = lgb.Booster(model_str=booster.model_to_string())
    if delta == 0.0:
        return copy
    tree = copy.dump_model(num_iteration=1)["tree_info"][0]
    for leaf in range(int(tree["num_leaves"])):
        copy.set_leaf_output(0, leaf, copy.get_leaf_output(0, leaf) + delta)
    # round-trip through the text format: what is stored is exactly what is scored
    return lgb.Booster(model_str=copy.model_to_string())


def _predict(booster: lgb.Booster, X: Array) -> Array:
    return np.asarray(booster.predict(X, num_threads=1), dtype=np.float64)


def fit_calibrated_models(
    train: TrainingSet, *, rounds: int = ROUNDS, folds: int = 5, min_rows_per_fold: int = 50
) -> tuple[dict[float, lgb.Booster], Calibration]:
    """Fit p10/p50/p90 on all of ``train`` and calibrate the range with out-of-fold conformal scores
    over ``folds`` contiguous time blocks (see the module docstring).

    With fewer than ``min_rows_per_fold`` rows per block the raw quantile models are returned and the
    calibration says ``method="none"``."""
    boosters = fit_quantile_models(train, rounds=rounds)
    if folds < 2 or len(train) < folds * min_rows_per_fold:
        return boosters, Calibration("none", 0, 0.0, 0.0, None, None)
    order = np.argsort(train.placed_ms, kind="stable")
    blocks = np.array_split(order, folds)
    low_scores: list[Array] = []
    high_scores: list[Array] = []
    for k, block in enumerate(blocks):
        rest = train.take(np.concatenate([b for j, b in enumerate(blocks) if j != k]))
        held = train.take(block)
        dataset = lgb.Dataset(rest.X, label=rest.y, feature_name=rest.feature_names, free_raw_data=False)
        for q, scores, sign in ((LOW, low_scores, 1.0), (HIGH, high_scores, -1.0)):
            model = lgb.train({**PARAMS, "alpha": q}, dataset, num_boost_round=rounds)
            scores.append(sign * (_predict(model, held.X) - held.y))
    s_low, s_high = np.concatenate(low_scores), np.concatenate(high_scores)
    c_low = conformal_offset(s_low, LOW)
    c_high = conformal_offset(s_high, round(1.0 - HIGH, 9))
    calibrated = {
        LOW: shift_booster(boosters[LOW], -c_low),
        MID: boosters[MID],
        HIGH: shift_booster(boosters[HIGH], c_high),
    }
    raw = float(np.mean((s_low <= 0) & (s_high <= 0)))
    after = float(np.mean((s_low <= c_low) & (s_high <= c_high)))
    return calibrated, Calibration(
        f"cross-conformal CQR, {folds} time blocks", len(s_low), c_low, c_high, raw, after
    )
