"""The Redis scripts (online) and the offline builder implement the same feature semantics: on a random
timeline with out-of-order, duplicate and late events, both give identical values at every checkpoint.

Orders are PICKED_UP after (a few, by a skewed clock, "before") they are READY, the two arriving in
either order (the pickup wait). Drivers are ASSIGNED to the placed orders (the dispatch backlog): most a
few minutes after PLACED, some whose ASSIGNED arrives before their PLACED, some with an assignment time
before the placement (device clocks), some cancelled before or after assignment, and some never
assigned."""

from __future__ import annotations

import dataclasses
import math
import random
import uuid
from collections.abc import Iterator

import pytest

from eta_common import features as F
from eta_common.offline_features import FeatureQuery, HistoryEvent, OfflineFeatureBuilder
from eta_common.online_store import DriverUpdate, OnlineStore, RestaurantUpdate
from tests.integration.helpers import start_test_redis

pytestmark = pytest.mark.integration
MIN = 60_000
CENTRE = (52.52, 13.405)


def _assignment(rng: random.Random, oid: str, placed_ms: int) -> tuple[HistoryEvent | None, int | None]:
    """The order's ASSIGNED event (or None: never assigned) and, when it must arrive after its ASSIGNED,
    the delay to give its PLACED event."""
    driver = f"par-d{rng.randrange(10)}"
    at = (CENTRE[0] + rng.uniform(-0.04, 0.04), CENTRE[1] + rng.uniform(-0.06, 0.06))
    roll = rng.random()
    if roll < 0.6:  # the usual: a driver a few minutes later
        when, placed_delay = placed_ms + rng.randrange(MIN, 12 * MIN), None
    elif roll < 0.75:  # ASSIGNED arrives first; the PLACED is held back (still within the lateness)
        when, placed_delay = placed_ms + rng.randrange(5_000, 30_000), rng.randrange(2 * MIN, 4 * MIN)
    elif roll < 0.8:  # the driver's clock says it was assigned before it was placed
        when, placed_delay = placed_ms - rng.randrange(1_000, 30_000), None
    else:
        return None, None
    return HistoryEvent("driver", "ASSIGNED", when, 0, None, driver, oid, *at), placed_delay


def _random_timeline(rng: random.Random, start: int, minutes: int, prefix: str) -> list[HistoryEvent]:
    events: list[HistoryEvent] = []
    # a delay some events must arrive with (else the arrival delay is random), by position in ``events``
    forced_delay: dict[int, int] = {}
    restaurants = {
        f"{prefix}-r{i}": (CENTRE[0] + rng.uniform(-0.03, 0.03), CENTRE[1] + rng.uniform(-0.05, 0.05))
        for i in range(3)
    }
    for minute in range(minutes):
        t = start + minute * MIN
        for rid, (lat, lng) in restaurants.items():
            for _ in range(rng.choice([0, 0, 1, 2])):
                oid = f"{rid}-o{len(events)}"
                placed_ms = t + rng.randrange(MIN)
                assignment, placed_delay = _assignment(rng, oid, placed_ms)
                if placed_delay is not None:
                    forced_delay[len(events)] = placed_delay
                events.append(HistoryEvent("order", "PLACED", placed_ms, 0, rid, None, oid, lat, lng))
                if assignment is not None:
                    events.append(assignment)
                accepted = placed_ms + rng.randrange(30_000, 120_000)
                events.append(HistoryEvent("kitchen", "ORDER_ACCEPTED", accepted, 0, rid, None, oid))
                if rng.random() < 0.1:  # before or after its assignment (or instead of it)
                    cancelled_ms = placed_ms + rng.randrange(30_000, 15 * MIN)
                    events.append(HistoryEvent("order", "CANCELLED", cancelled_ms, 0, rid, None, oid))
                else:
                    ready_ms = accepted + rng.randrange(5, 25) * MIN
                    events.append(
                        HistoryEvent("kitchen", "ORDER_READY", ready_ms, 0, rid, None, oid, lat, lng)
                    )
                    if rng.random() < 0.85:  # the driver picks it up (a clock may even say "before ready")
                        picked_ms = ready_ms + rng.randrange(-MIN, 15 * MIN)
                        events.append(HistoryEvent("order", "PICKED_UP", picked_ms, 0, rid, None, oid))
            if rng.random() < 0.05:
                events.append(
                    HistoryEvent("kitchen", rng.choice(["BUSY", "OPENED"]), t + rng.randrange(MIN), 0, rid)
                )
        for d in range(10):
            if rng.random() < 0.3:
                events.append(
                    HistoryEvent(
                        "driver",
                        rng.choice(["ONLINE", "OFFLINE", "LOCATION", "DELIVERED"]),
                        t + rng.randrange(MIN),
                        0,
                        driver_id=f"par-d{d}",
                        lat=CENTRE[0] + rng.uniform(-0.04, 0.04),
                        lng=CENTRE[1] + rng.uniform(-0.06, 0.06),
                    )
                )
    # arrival: mostly in order with jitter, some late beyond the allowed lateness, some duplicated
    out = []
    for i, ev in enumerate(events):
        delay = rng.choice([rng.randrange(50, 3_000)] * 8 + [rng.randrange(3 * MIN, 4 * MIN), 7 * MIN])
        delay = forced_delay.get(i, delay)
        arrived = HistoryEvent(
            ev.kind,
            ev.type,
            ev.event_ms,
            ev.event_ms + delay,
            ev.restaurant_id,
            ev.driver_id,
            ev.order_id,
            ev.lat,
            ev.lng,
        )
        out.append(arrived)
        if rng.random() < 0.05:
            out.append(arrived)
    out.sort(key=lambda e: e.ingest_ms)
    return out


def _update(ev: HistoryEvent) -> RestaurantUpdate | DriverUpdate:
    if ev.kind == "driver":
        assert ev.driver_id is not None
        assert ev.lat is not None
        assert ev.lng is not None
        return DriverUpdate(
            ev.driver_id, ev.type, ev.event_ms, ev.lat, ev.lng, order_id=ev.order_id or "", market=ev.market
        )
    assert ev.restaurant_id is not None
    return RestaurantUpdate(
        ev.restaurant_id, ev.type, ev.order_id or "", ev.event_ms, ev.lat, ev.lng, market=ev.market
    )


@pytest.fixture(scope="module")
def parity_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Redis of the module's own: the shared stack's aggregator would maintain (re-count the supply of)
    every market it finds in a shared one, racing the test's own refreshes."""
    workdir = tmp_path_factory.mktemp("parity-redis")
    server = start_test_redis(workdir / "data", workdir / "logs")
    try:
        yield server.url
    finally:
        server.stop()


async def test_online_scripts_equal_offline_builder(parity_redis: str) -> None:
    rng = random.Random(20261128)
    start = 1_800_000_000_000
    prefix = f"par{uuid.uuid4().hex[:6]}"
    timeline = _random_timeline(rng, start, minutes=150, prefix=prefix)
    first_seen: dict[tuple[str, str | None], int] = {}
    for ev in timeline:
        first_seen.setdefault((ev.type, ev.order_id), ev.ingest_ms)
    assigned = {oid for kind, oid in first_seen if kind == "ASSIGNED"}
    cancelled = {oid for kind, oid in first_seen if kind == "CANCELLED"}
    early = [o for o in assigned if first_seen[("ASSIGNED", o)] < first_seen.get(("PLACED", o), 0)]
    assert len(early) > 20  # ASSIGNED before PLACED
    assert len(assigned & cancelled) > 5  # assigned and cancelled
    assert len(cancelled - assigned) >= 3  # cancelled instead of assigned
    store = OnlineStore.from_url(parity_redis, city=f"parity-{uuid.uuid4().hex[:8]}")
    offline = OfflineFeatureBuilder()
    try:
        checkpoints = [start + m * MIN for m in range(20, 160, 7)]
        idx = 0
        compared = 0
        backlog: list[float] = []
        for checkpoint in checkpoints:
            batch = []
            while idx < len(timeline) and timeline[idx].ingest_ms <= checkpoint:
                ev = timeline[idx]
                idx += 1
                offline.apply(ev)  # applies both rules below itself
                if F.is_late(ev.event_ms, ev.ingest_ms, F.DEFAULT_ALLOWED_LATENESS_MS):
                    continue  # the aggregator's rule, applied before the store (see aggregator.processor)
                if ev.type == "LOCATION" and not F.ping_kept(ev.driver_id or "", ev.event_ms):
                    continue  # the keep rule, likewise
                batch.append(ev)
            await store.apply([_update(ev) for ev in batch], now_ms=checkpoint)
            # the supply counts the aggregator materialises (from the driver state of this checkpoint)
            await store.refresh_supply(now_ms=checkpoint, owner="parity", hold_ms=1)
            for rid in (f"{prefix}-r0", f"{prefix}-r1", f"{prefix}-r2"):
                located = await store.read_restaurant(rid, now_ms=checkpoint)  # FeatureService's read
                assert located.location is not None
                wanted = [(rid, located.location)]
                from_row = await store.read_block(wanted, now_ms=checkpoint)  # the serving read
                exact = await store.read_exact(wanted, now_ms=checkpoint)  # its fallback
                assert (from_row.from_rows, exact.from_fallback) == (1, 1)
                expected = offline.features_at(FeatureQuery("q", rid, checkpoint, *located.location))
                for online in (located, from_row.restaurant(0), exact.restaurant(0)):
                    for name, value in expected.items():
                        got = online.readings[name].value
                        if math.isnan(value):
                            assert math.isnan(got), (name, checkpoint)
                        else:
                            assert got == pytest.approx(value), (rid, name, checkpoint)
                        compared += 1
                backlog.append(located.readings[F.ORDERS_WAITING_FOR_DRIVER].value)
        assert compared > 900
        assert idx > 1000
        # the backlog was really exercised: known, non-zero, and moving between checkpoints
        assert not any(math.isnan(v) for v in backlog)
        assert sum(1 for v in backlog if v > 0) > len(backlog) // 2
        assert len(set(backlog)) > 5
    finally:
        await store.close()


async def test_online_scripts_equal_offline_builder_per_market(parity_redis: str) -> None:
    """Two markets on the same streets with the same driver ids (``par-d0``…): each market's drivers, free
    drivers and backlog are its own, online as offline, and every read in a market equals the builder's."""
    rng = random.Random(20261206)
    start = 1_800_000_000_000
    run = uuid.uuid4().hex[:6]
    markets = (f"parA{run}", f"parB{run}")
    timeline: list[HistoryEvent] = []
    restaurants: dict[str, str] = {}
    for market in markets:
        prefix = f"{market}x"
        for ev in _random_timeline(rng, start, minutes=90, prefix=prefix):
            timeline.append(dataclasses.replace(ev, market=market))
        restaurants.update({f"{prefix}-r{i}": market for i in range(3)})
    timeline.sort(key=lambda e: e.ingest_ms)
    store = OnlineStore.from_url(parity_redis, city=f"parity-{uuid.uuid4().hex[:8]}")
    offline = OfflineFeatureBuilder()
    compared = 0
    seen: dict[str, set[tuple[float, float]]] = {m: set() for m in markets}
    try:
        idx = 0
        for checkpoint in [start + m * MIN for m in range(20, 100, 9)]:
            batch = []
            while idx < len(timeline) and timeline[idx].ingest_ms <= checkpoint:
                ev = timeline[idx]
                idx += 1
                offline.apply(ev)  # applies the lateness and ping keep rules itself
                if F.is_late(ev.event_ms, ev.ingest_ms, F.DEFAULT_ALLOWED_LATENESS_MS):
                    continue
                if ev.type == "LOCATION" and not F.ping_kept(ev.driver_id or "", ev.event_ms):
                    continue
                batch.append(ev)
            await store.apply([_update(ev) for ev in batch], now_ms=checkpoint)
            for market in markets:
                await store.refresh_supply(now_ms=checkpoint, owner="parity", hold_ms=1, market=market)
            for rid, market in restaurants.items():
                located = await store.read_restaurant(rid, now_ms=checkpoint, market=market)
                assert located.location is not None
                wanted = [(rid, located.location)]
                from_row = await store.read_block(wanted, now_ms=checkpoint, market=market)
                exact = await store.read_exact(wanted, now_ms=checkpoint, market=market)
                expected = offline.features_at(FeatureQuery("q", rid, checkpoint, *located.location, market))
                for online in (located, from_row.restaurant(0), exact.restaurant(0)):
                    for name, value in expected.items():
                        got = online.readings[name].value
                        if math.isnan(value):
                            assert math.isnan(got), (name, checkpoint)
                        else:
                            assert got == pytest.approx(value), (rid, market, name, checkpoint)
                        compared += 1
                seen[market].add(
                    (
                        located.readings[F.FREE_DRIVERS_NEARBY].value,
                        located.readings[F.ORDERS_WAITING_FOR_DRIVER].value,
                    )
                )
        assert compared > 1000
        assert sorted(offline.markets) == sorted(markets)
        assert seen[markets[0]] != seen[markets[1]]  # the markets' city-wide values differ
    finally:
        await store.close()
