"""Fit the LightGBM quantile models (p10 / p50 / p90)."""

from __future__ import annotations

import lightgbm as lgb

from eta_common.model_bundle import QUANTILES
from trainer.dataset import TrainingSet

PARAMS: dict[str, object] = {
    "objective": "quantile",
    "learning_rate": 0.05,
    "num_leaves": 31,
    "min_data_in_leaf": 20,
    "feature_fraction": 0.9,
    "bagging_fraction": 0.9,
    "bagging_freq": 1,
    "verbose": -1,
    "num_threads": 2,
    "seed": 7,
}


def fit_quantile_models(train: TrainingSet, *, rounds: int = 300) -> dict[float, lgb.Booster]:
    dataset = lgb.Dataset(train.X, label=train.y, feature_name=train.feature_names, free_raw_data=False)
    return {q: lgb.train({**PARAMS, "alpha": q}, dataset, num_boost_round=rounds) for q in QUANTILES}
