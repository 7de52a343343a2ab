"""Does the market help the model? ``eta-trainer market-effect`` measures it on the archive.

Three variants of the p50 model (the point estimate; its loss is the absolute error), trained on the same
older orders and scored on the same most recent ones (the time-ordered holdout of ``eta-trainer``):

``per-market``          the served features, city-wide ones (free drivers near the restaurant, dispatch
                        backlog) computed per market — what the platform serves since markets exist;
``pooled``              the same features with every market's city-wide state pooled into one (a free driver
                        in Munich counts for a Berlin restaurant 500 km away only if within 3 km, so supply
                        hardly moves, but every market's waiting orders add up) — the platform before markets;
``per-market + market`` the first with the market id as a categorical feature.

Reported: holdout MAE (minutes) overall and per market, rows per market. Findings on a simulated
multi-market history are in docs/model.md ("Markets").
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import lightgbm as lgb
import numpy as np
import numpy.typing as npt

from eta_common.markets import DEFAULT_MARKET
from eta_common.model_bundle import QUANTILES
from trainer.dataset import TrainingSet
from trainer.train import PARAMS, ROUNDS

__all__ = ["MarketEffect", "market_effect", "with_market_feature"]

MARKET_FEATURE = "market"
_MID = QUANTILES[1]


@dataclass
class MarketEffect:
    rows_train: int
    rows_holdout: int
    # variant -> {"all": mae, <market>: mae, …}
    mae: dict[str, dict[str, float]] = field(default_factory=dict)
    rows_by_market: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "rows_train": self.rows_train,
            "rows_holdout": self.rows_holdout,
            "holdout_rows_by_market": self.rows_by_market,
            "holdout_mae_minutes": self.mae,
        }

    def render(self) -> str:
        markets = ["all", *sorted(self.rows_by_market)]
        head = f"{'variant':<24}" + "".join(f"{m:>12}" for m in markets)
        rows = [f"{'holdout rows':<24}" + "".join(
            f"{(self.rows_holdout if m == 'all' else self.rows_by_market[m]):>12}" for m in markets
        )]  # fmt: skip
        for variant, maes in self.mae.items():
            rows.append(f"{variant:<24}" + "".join(f"{maes.get(m, math.nan):>12.2f}" for m in markets))
        return "\n".join([f"holdout MAE, minutes (train {self.rows_train} rows)", head, *rows])

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), indent=2)


def _markets(ts: TrainingSet) -> list[str]:
    return [m or DEFAULT_MARKET for m in (ts.markets or [""] * len(ts))]


def with_market_feature(ts: TrainingSet, codes: dict[str, int]) -> TrainingSet:
    """``ts`` with one more column: the market's code (unknown markets: NaN, LightGBM's missing)."""
    column = np.array([codes.get(m, math.nan) for m in _markets(ts)], dtype=np.float64)
    return TrainingSet(
        [*ts.feature_names, MARKET_FEATURE],
        np.column_stack([ts.X, column]),
        ts.y,
        ts.placed_ms,
        ts.restaurant_ids,
        ts.order_ids,
        ts.markets,
    )


def _fit_p50(train: TrainingSet, *, rounds: int, categorical: list[str]) -> lgb.Booster:
    dataset = lgb.Dataset(
        train.X,
        label=train.y,
        feature_name=train.feature_names,
        categorical_feature=categorical or "auto",
        free_raw_data=False,
    )
    return lgb.train({**PARAMS, "alpha": _MID}, dataset, num_boost_round=rounds)


def _maes(holdout: TrainingSet, point: npt.NDArray[np.float64]) -> dict[str, float]:
    err = np.abs(point - holdout.y)
    markets = np.array(_markets(holdout))
    out = {"all": float(np.mean(err))}
    for market in sorted(set(markets.tolist())):
        out[market] = float(np.mean(err[markets == market]))
    return out


def market_effect(
    per_market: tuple[TrainingSet, TrainingSet],
    pooled: tuple[TrainingSet, TrainingSet] | None = None,
    *,
    rounds: int = ROUNDS,
) -> MarketEffect:
    """Fit and score the variants on (train, holdout) pairs of the same orders: ``per_market`` built with
    city-wide state per market, ``pooled`` (optional) with it pooled across markets."""
    train, holdout = per_market
    effect = MarketEffect(len(train), len(holdout))
    markets = _markets(holdout)
    effect.rows_by_market = {m: markets.count(m) for m in sorted(set(markets))}
    model = _fit_p50(train, rounds=rounds, categorical=[])
    effect.mae["per-market"] = _maes(holdout, np.asarray(model.predict(holdout.X), dtype=np.float64))
    if pooled is not None:
        p_train, p_holdout = pooled
        if p_train.order_ids != train.order_ids or p_holdout.order_ids != holdout.order_ids:
            raise ValueError("the pooled training set must hold the same orders")
        model = _fit_p50(p_train, rounds=rounds, categorical=[])
        effect.mae["pooled"] = _maes(p_holdout, np.asarray(model.predict(p_holdout.X), dtype=np.float64))
    codes = {m: i for i, m in enumerate(sorted(set(_markets(train))))}
    m_train, m_holdout = with_market_feature(train, codes), with_market_feature(holdout, codes)
    model = _fit_p50(m_train, rounds=rounds, categorical=[MARKET_FEATURE])
    effect.mae["per-market + market"] = _maes(
        m_holdout, np.asarray(model.predict(m_holdout.X), dtype=np.float64)
    )
    return effect
