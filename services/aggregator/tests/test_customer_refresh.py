"""Scheduling and settings of the customer-feature refresh (the refresh itself: tests/integration)."""

from __future__ import annotations

import pytest

from aggregator import config
from aggregator.__main__ import main
from aggregator.customer_refresh import due_boundary
from eta_common.customer_features import CUSTOMER_REFRESH_MS

HOUR = 3_600_000
R = 1_800_000_000_000 // HOUR * HOUR


def test_due_boundary_waits_the_delay_after_each_boundary() -> None:
    assert CUSTOMER_REFRESH_MS == HOUR
    assert due_boundary(R + 59_999, 60_000) == R - HOUR  # not yet due
    assert due_boundary(R + 60_000, 60_000) == R
    assert due_boundary(R + HOUR - 1, 60_000) == R
    assert due_boundary(R, 0) == R


def test_settings_defaults_and_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for suffix in ("", "_DELAY_SECONDS", "_RETRY_SECONDS", "_LOCK_SECONDS"):
        monkeypatch.delenv(f"AGGREGATOR_CUSTOMER_REFRESH{suffix}", raising=False)
    s = config.AggregatorSettings.from_env()
    assert (s.customer_refresh, s.customer_refresh_delay_seconds) == (True, 60.0)
    assert (s.customer_refresh_retry_seconds, s.customer_refresh_lock_seconds) == (60.0, 900)
    monkeypatch.setenv("AGGREGATOR_CUSTOMER_REFRESH", "false")
    monkeypatch.setenv("AGGREGATOR_CUSTOMER_REFRESH_DELAY_SECONDS", "5")
    s = config.AggregatorSettings.from_env()
    assert (s.customer_refresh, s.customer_refresh_delay_seconds) == (False, 5.0)
    for name in ("AGGREGATOR_CUSTOMER_REFRESH", "AGGREGATOR_CUSTOMER_REFRESH_DELAY_SECONDS"):
        assert name in (config.__doc__ or "")


def test_cli_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["refresh-customer-features", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--as-of-ms" in out
    assert "--force" in out
    assert "eta:customers:as_of" in out
