"""Per-feature staleness budgets from the environment; malformed settings fail fast."""

from __future__ import annotations

import pytest

from eta_common import features as F
from eta_common.config import ConfigError
from prediction.config import DEFAULT_STALENESS_BUDGETS, ONLINE_FEATURES, PredictionSettings, parse_budgets


def test_budgets_parse_name_equals_seconds() -> None:
    assert parse_budgets(" kitchen_busy=90 , free_drivers_within_3km=7.5,") == {
        "kitchen_busy": 90.0,
        "free_drivers_within_3km": 7.5,
    }


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("distance_km=5", "unknown online feature"),
        ("kitchen_busy", "name=seconds"),
        ("kitchen_busy=soon", "not a number"),
        ("kitchen_busy=-1", ">= 0"),
    ],
)
def test_bad_budgets_fail_fast(raw: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_budgets(raw)


def test_env_budgets_merge_over_the_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PREDICTION_STALENESS_BUDGET_SECONDS", "120")
    monkeypatch.setenv("PREDICTION_STALENESS_BUDGETS", "free_drivers_within_3km=5")
    settings = PredictionSettings.from_env()
    assert settings.budget_of("free_drivers_within_3km") == 5.0
    assert settings.budget_of("kitchen_busy") == DEFAULT_STALENESS_BUDGETS["kitchen_busy"]
    assert settings.budget_of("orders_in_kitchen") == 120.0  # no budget of its own: the default
    assert set(ONLINE_FEATURES) == set(F.DEFAULTS)  # every feature read from the store
    assert set(DEFAULT_STALENESS_BUDGETS) <= set(ONLINE_FEATURES)


def test_unknown_redis_client_fails_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PREDICTION_REDIS_CLIENT", "hiredis")
    with pytest.raises(ConfigError, match="PREDICTION_REDIS_CLIENT"):
        PredictionSettings.from_env()
