"""The Redis scripts (online) and the offline builder implement the same feature semantics: on a random
timeline with out-of-order, duplicate and late events, both give identical values at every checkpoint."""

from __future__ import annotations

import math
import random
import uuid

import pytest

from devstack.stack import LocalStack
from eta_common import features as F
from eta_common.offline_features import FeatureQuery, HistoryEvent, OfflineFeatureBuilder
from eta_common.online_store import DriverUpdate, OnlineStore, RestaurantUpdate

pytestmark = pytest.mark.integration
MIN = 60_000
CENTRE = (52.52, 13.405)


def _random_timeline(rng: random.Random, start: int, minutes: int, prefix: str) -> list[HistoryEvent]:
    events: list[HistoryEvent] = []
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
                events.append(HistoryEvent("order", "PLACED", placed_ms, 0, rid, None, oid, lat, lng))
                accepted = placed_ms + rng.randrange(30_000, 120_000)
                events.append(HistoryEvent("kitchen", "ORDER_ACCEPTED", accepted, 0, rid, None, oid))
                if rng.random() < 0.1:
                    events.append(HistoryEvent("order", "CANCELLED", accepted + MIN, 0, rid, None, oid))
                else:
                    events.append(
                        HistoryEvent(
                            "kitchen",
                            "ORDER_READY",
                            accepted + rng.randrange(5, 25) * MIN,
                            0,
                            rid,
                            None,
                            oid,
                            lat,
                            lng,
                        )
                    )
            if rng.random() < 0.05:
                events.append(
                    HistoryEvent("kitchen", rng.choice(["BUSY", "OPENED"]), t + rng.randrange(MIN), 0, rid)
                )
        for d in range(10):
            if rng.random() < 0.3:
                events.append(
                    HistoryEvent(
                        "driver",
                        rng.choice(["ONLINE", "OFFLINE", "LOCATION", "ASSIGNED", "DELIVERED"]),
                        t + rng.randrange(MIN),
                        0,
                        driver_id=f"par-d{d}",
                        lat=CENTRE[0] + rng.uniform(-0.04, 0.04),
                        lng=CENTRE[1] + rng.uniform(-0.06, 0.06),
                    )
                )
    # arrival: mostly in order with jitter, some late beyond the allowed lateness, some duplicated
    out = []
    for ev in events:
        delay = rng.choice([rng.randrange(50, 3_000)] * 8 + [rng.randrange(3 * MIN, 4 * MIN), 7 * MIN])
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
        return DriverUpdate(ev.driver_id, ev.type, ev.event_ms, ev.lat, ev.lng)
    assert ev.restaurant_id is not None
    return RestaurantUpdate(ev.restaurant_id, ev.type, ev.order_id or "", ev.event_ms, ev.lat, ev.lng)


async def test_online_scripts_equal_offline_builder(stack: LocalStack) -> None:
    rng = random.Random(20261128)
    start = 1_800_000_000_000
    prefix = f"par{uuid.uuid4().hex[:6]}"
    timeline = _random_timeline(rng, start, minutes=150, prefix=prefix)
    # its own driver pool (city) and restaurant ids, so the test shares Redis with the running stack safely
    store = OnlineStore.from_url(stack.redis_url, city=f"parity-{uuid.uuid4().hex[:8]}")
    offline = OfflineFeatureBuilder()
    try:
        checkpoints = [start + m * MIN for m in range(20, 160, 7)]
        idx = 0
        compared = 0
        for checkpoint in checkpoints:
            batch = []
            while idx < len(timeline) and timeline[idx].ingest_ms <= checkpoint:
                ev = timeline[idx]
                idx += 1
                if F.is_late(ev.event_ms, ev.ingest_ms, F.DEFAULT_ALLOWED_LATENESS_MS):
                    continue  # the aggregator's rule, applied before the store (see aggregator.processor)
                batch.append(ev)
                offline.apply(ev)
            await store.apply([_update(ev) for ev in batch], now_ms=checkpoint)
            for rid in (f"{prefix}-r0", f"{prefix}-r1", f"{prefix}-r2"):
                online = await store.read_restaurant(rid, now_ms=checkpoint)
                assert online.location is not None
                expected = offline.features_at(FeatureQuery("q", rid, checkpoint, *online.location))
                for name, value in expected.items():
                    got = online.readings[name].value
                    if math.isnan(value):
                        assert math.isnan(got), (name, checkpoint)
                    else:
                        assert got == pytest.approx(value), (rid, name, checkpoint)
                    compared += 1
        assert compared > 300
        assert idx > 1000
    finally:
        await store.close()
