"""Aggregator settings: the supply restamp period is checked against the count's staleness budget."""

from __future__ import annotations

import pytest

from aggregator.config import AggregatorSettings
from eta_common.config import ConfigError


def test_defaults_restamp_unchanged_supply_counts_every_30_seconds(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AGGREGATOR_SUPPLY_RESTAMP_SECONDS", "AGGREGATOR_SUPPLY_REFRESH_SECONDS"):
        monkeypatch.delenv(name, raising=False)
    settings = AggregatorSettings.from_env()
    assert (settings.supply_refresh_seconds, settings.supply_restamp_seconds) == (5.0, 30.0)
    monkeypatch.setenv("AGGREGATOR_SUPPLY_RESTAMP_SECONDS", "0")
    assert AggregatorSettings.from_env().supply_restamp_seconds == 0.0


def test_a_restamp_period_that_would_age_counts_past_their_budget_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("AGGREGATOR_SUPPLY_RESTAMP_SECONDS", "55")
    with pytest.raises(ConfigError, match=r"AGGREGATOR_SUPPLY_RESTAMP_SECONDS=55 .* 60 s staleness budget"):
        AggregatorSettings.from_env()
