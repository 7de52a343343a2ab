"""eta-trainer market-effect: the variants are fitted on the same split, scored overall and per market; a
market with a hidden offset the features do not carry is found by the market feature."""

from __future__ import annotations

import numpy as np
import pytest

from eta_common.markets import DEFAULT_MARKET
from trainer.__main__ import build_market_effect_parser
from trainer.dataset import TrainingSet
from trainer.market_effect import MARKET_FEATURE, market_effect, with_market_feature
from trainer.tests.support import synthetic


def _with_markets(ts: TrainingSet, offset: float) -> TrainingSet:
    markets = ["berlin" if i % 3 else "" for i in range(len(ts))]
    y = ts.y + np.array([offset if m == "berlin" else 0.0 for m in markets])
    return TrainingSet(ts.feature_names, ts.X, y, ts.placed_ms, ts.restaurant_ids, ts.order_ids, markets)


def test_split_keeps_markets_and_the_feature_is_a_code() -> None:
    ts = _with_markets(synthetic(300), 0.0)
    train, holdout = ts.split(0.2)
    assert len(train.markets) == len(train)
    assert len(holdout.markets) == len(holdout)
    extended = with_market_feature(holdout, {DEFAULT_MARKET: 0, "berlin": 1})
    assert extended.feature_names[-1] == MARKET_FEATURE
    column = extended.X[:, -1]
    assert set(column.tolist()) <= {0.0, 1.0}
    assert [int(c) for c in column] == [1 if m == "berlin" else 0 for m in holdout.markets]


def test_a_hidden_market_offset_is_found_by_the_market_feature() -> None:
    ts = _with_markets(synthetic(3000, seed=3), 10.0)
    split = ts.split(0.2)
    effect = market_effect(split, split, rounds=60)
    assert set(effect.mae) == {"per-market", "pooled", "per-market + market"}
    assert set(effect.rows_by_market) == {"berlin", DEFAULT_MARKET}
    assert sum(effect.rows_by_market.values()) == effect.rows_holdout == len(split[1])
    assert effect.mae["per-market"]["all"] == pytest.approx(effect.mae["pooled"]["all"])  # same sets here
    assert effect.mae["per-market + market"]["all"] < effect.mae["per-market"]["all"] - 2.0
    assert "holdout MAE" in effect.render()
    assert '"holdout_mae_minutes"' in effect.to_json()


def test_pooled_set_must_hold_the_same_orders() -> None:
    a = _with_markets(synthetic(400, seed=1), 0.0).split(0.2)
    b = _with_markets(synthetic(400, seed=2), 0.0)
    b = TrainingSet(b.feature_names, b.X, b.y, b.placed_ms, b.restaurant_ids, [f"x{i}" for i in range(400)])
    with pytest.raises(ValueError, match="same orders"):
        market_effect(a, b.split(0.2), rounds=5)


def test_cli_options() -> None:
    args = build_market_effect_parser().parse_args(["--history-days", "7", "--json"])
    assert args.history_days == 7
    assert args.json
