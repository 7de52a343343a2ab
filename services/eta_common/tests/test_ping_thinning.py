"""The driver-ping keep rule (``features.ping_kept``): one rule, read by the aggregator and the offline
builder, that decides from the ping alone."""

from __future__ import annotations

import itertools
import random

from eta_common import features as F


def test_a_driver_keeps_exactly_the_window_of_every_period() -> None:
    for driver in ("d-1", "d-2", "driver-with-a-long-id-000123"):
        start = 1_765_000_000_000
        kept = [t for t in range(start, start + F.PING_KEEP_PERIOD_MS) if F.ping_kept(driver, t)]
        assert len(kept) == F.PING_KEEP_WINDOW_MS
        # one contiguous stretch (modulo the period)
        gaps = sum(1 for a, b in itertools.pairwise(kept) if b != a + 1)
        assert gaps <= 1


def test_regular_pings_at_the_window_interval_keep_one_per_period() -> None:
    rng = random.Random(1)
    interval = F.PING_KEEP_WINDOW_MS  # apps pinging every 4 s
    for d in range(200):
        driver = f"drv-{d}"
        first = 1_765_000_000_000 + rng.randrange(interval)
        periods = 20
        pings = range(first, first + periods * F.PING_KEEP_PERIOD_MS, interval)
        kept = [t for t in pings if F.ping_kept(driver, t)]
        assert periods - 1 <= len(kept) <= periods + 1
        # never more than a period (plus one ping interval) between two kept pings
        assert all(b - a <= F.PING_KEEP_PERIOD_MS + interval for a, b in itertools.pairwise(kept))


def test_the_fleet_keeps_the_window_share_spread_over_the_period() -> None:
    rng = random.Random(2)
    drivers = [f"d{i}" for i in range(5000)]
    t = 1_765_000_000_000
    kept = [d for d in drivers if F.ping_kept(d, t)]
    share = len(kept) / len(drivers)
    assert abs(share - F.PING_KEEP_WINDOW_MS / F.PING_KEEP_PERIOD_MS) < 0.03  # phases spread the load
    sample = [(rng.choice(drivers), t + rng.randrange(10**7)) for _ in range(2000)]
    assert [F.ping_kept(d, ms) for d, ms in sample] == [F.ping_kept(d, ms) for d, ms in sample]
