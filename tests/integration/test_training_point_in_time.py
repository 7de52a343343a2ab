"""The training set is point-in-time correct, on real PostgreSQL.

Every row's features are recomputed by brute force — straight from the feature definitions, over only the
events the online store could have seen at the order's placement time t (ingested at or before t, and no
later than the allowed lateness) — and must equal what ``trainer.dataset.load_training_set`` built. The
histories contain events after t, late-arriving events (happened before t, ingested after), events later
than the allowed lateness, duplicates of state events and cancelled orders:

* a hand-made history with the expected value of every feature written out;
* a random history (3 restaurants, 8 drivers, 6 hours, ~20 % of events late);
* a day of the city simulator's history.
"""

from __future__ import annotations

import math
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import numpy as np
import pytest

from devstack.infra import ChildProcess
from eta.v1 import events_pb2
from eta_common import customer_features as CF
from eta_common import features as F
from eta_common.db.archive import ArchivedEvent, archive_events
from eta_common.db.migrate import apply_migrations
from eta_common.timeutil import datetime_from_ms, timestamp_from_ms
from simulator.city import CityConfig
from simulator.seed import seed_history
from trainer.dataset import TrainingSet, load_training_set

pytestmark = pytest.mark.integration

MIN = 60_000
HOUR = 60 * MIN
DAY = 24 * HOUR
T_HAND = 1_740_787_200_000 + 10 * HOUR  # 2025-03-01 10:00 UTC
T_RANDOM = T_HAND + 3 * DAY
T_SIM_END = T_HAND + 10 * DAY
LATENESS = F.DEFAULT_ALLOWED_LATENESS_MS


@pytest.fixture(scope="module")
async def pool(postgres: ChildProcess) -> AsyncIterator[asyncpg.Pool]:
    await apply_migrations(postgres.url)
    p = await asyncpg.create_pool(postgres.url, min_size=1, max_size=2)
    try:
        yield p
    finally:
        await p.close()


# --- building events ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Ev:
    """One archived event as the test knows it (the brute force reads these, not the database)."""

    event_id: str
    kind: str
    type: str
    event_ms: int
    ingest_ms: int
    restaurant_id: str | None = None
    driver_id: str | None = None
    order_id: str | None = None
    lat: float | None = None
    lng: float | None = None
    customer: tuple[float, float] | None = None
    customer_id: str = "cust"

    def proto(self) -> events_pb2.Event:
        ts = timestamp_from_ms(self.event_ms)
        if self.kind == "driver":
            assert self.driver_id is not None
            assert self.lat is not None
            assert self.lng is not None
            return events_pb2.Event(
                driver=events_pb2.DriverEvent(
                    event_id=self.event_id,
                    event_time=ts,
                    driver_id=self.driver_id,
                    type=events_pb2.DriverEvent.Type.Value(self.type),
                    location=events_pb2.GeoPoint(lat=self.lat, lng=self.lng),
                    order_id=self.order_id or "",
                )
            )
        if self.kind == "kitchen":
            kitchen = events_pb2.KitchenEvent(
                event_id=self.event_id,
                event_time=ts,
                restaurant_id=self.restaurant_id or "",
                type=events_pb2.KitchenEvent.Type.Value(self.type),
                order_id=self.order_id or "",
            )
            if self.lat is not None and self.lng is not None:
                kitchen.restaurant_location.CopyFrom(events_pb2.GeoPoint(lat=self.lat, lng=self.lng))
            return events_pb2.Event(kitchen=kitchen)
        order = events_pb2.OrderEvent(
            event_id=self.event_id,
            event_time=ts,
            order_id=self.order_id or "",
            restaurant_id=self.restaurant_id or "",
            type=events_pb2.OrderEvent.Type.Value(self.type),
        )
        if self.type == "PLACED":
            assert self.lat is not None
            assert self.lng is not None
            assert self.customer is not None
            order.customer_id = self.customer_id
            order.restaurant_location.CopyFrom(events_pb2.GeoPoint(lat=self.lat, lng=self.lng))
            order.customer_location.CopyFrom(events_pb2.GeoPoint(lat=self.customer[0], lng=self.customer[1]))
        return events_pb2.Event(order=order)


async def _archive(pool: asyncpg.Pool, events: list[Ev]) -> None:
    await archive_events(pool, [ArchivedEvent(e.proto(), e.ingest_ms) for e in events])


# --- the brute force ------------------------------------------------------------------------------------
def brute_force(events: list[Ev], restaurant_id: str, at: tuple[float, float], t: int) -> dict[str, float]:
    """The online features of ``restaurant_id`` at ``t``, from the definitions in eta_common.features,
    using only what the online store had seen by ``t``."""
    seen = sorted(
        (e for e in events if e.ingest_ms <= t and e.ingest_ms - e.event_ms <= LATENESS),
        key=lambda e: (e.ingest_ms, e.event_id),
    )
    mine = [e for e in seen if e.restaurant_id == restaurant_id and e.kind in ("order", "kitchen")]
    out: dict[str, float] = {}
    for window in F.WINDOW_COUNTS:
        out[window.name] = float(
            len({e.order_id for e in mine if e.type == "PLACED" and t - window.window_ms < e.event_ms <= t})
        )
    first: dict[tuple[str, str], int] = {}
    for e in mine:
        if e.order_id and e.type in ("ORDER_ACCEPTED", "ORDER_READY", "CANCELLED", "PICKED_UP"):
            first.setdefault((e.order_id, e.type), e.event_ms)
    orders = {oid for oid, _ in first}
    kitchen = 0
    # every windowed mean the definitions declare (ready in (t − W, t]), so a new one is checked too
    means = [m for m in vars(F).values() if isinstance(m, F.WindowMean)]
    preps: dict[str, list[float]] = {m.name: [] for m in means}
    for oid in orders:
        accepted = first.get((oid, "ORDER_ACCEPTED"))
        ready = first.get((oid, "ORDER_READY"))
        cancelled = first.get((oid, "CANCELLED"))
        if (
            accepted is not None
            and ready is None
            and cancelled is None
            and accepted > t - F.KITCHEN_ORDER_TTL_MS
        ):
            kitchen += 1
        for m in means:
            if accepted is not None and ready is not None and t - m.window_ms < ready <= t:
                preps[m.name].append((ready - accepted) / MIN)
    out[F.ORDERS_IN_KITCHEN] = float(kitchen)
    for name, values in preps.items():
        out[name] = sum(values) / len(values) if values else math.nan
    # pickup waits: READY → PICKED_UP (floored at 0) of orders picked up in (t − W, t]
    for wait in F.PICKUP_WAIT_MEANS:
        waits = [
            max(0, picked - ready) / MIN
            for oid in orders
            if (ready := first.get((oid, "ORDER_READY"))) is not None
            and (picked := first.get((oid, "PICKED_UP"))) is not None
            and t - wait.window_ms < picked <= t
        ]
        out[wait.name] = sum(waits) / len(waits) if waits else math.nan
    statuses = [e for e in mine if e.type in ("OPENED", "CLOSED", "BUSY")]
    latest = max(statuses, key=lambda e: e.event_ms, default=None)
    out[F.KITCHEN_BUSY] = 1.0 if latest is not None and latest.type == "BUSY" else 0.0
    drivers: dict[str, tuple[int, str, float, float]] = {}
    for e in (e for e in seen if e.kind == "driver"):
        assert e.driver_id is not None
        if e.type == "LOCATION" and not F.ping_kept(e.driver_id, e.event_ms):
            continue  # a ping the keep rule drops: neither applied nor archived
        last_ms, status, _, _ = drivers.get(e.driver_id, (-1, "offline", math.nan, math.nan))
        if e.event_ms <= last_ms:
            continue  # not newer than what the driver's state already reflects
        status = {"ONLINE": "free", "DELIVERED": "free", "OFFLINE": "offline", "ASSIGNED": "busy"}.get(
            e.type, status
        )
        drivers[e.driver_id] = (e.event_ms, status, float(e.lat or 0.0), float(e.lng or 0.0))
    out[F.FREE_DRIVERS_NEARBY] = (
        float(
            sum(
                1
                for _, status, lat, lng in drivers.values()
                if status == "free" and F.haversine_km(at[0], at[1], lat, lng) <= F.SUPPLY_RADIUS_KM
            )
        )
        if drivers
        else math.nan
    )
    # the city's dispatch backlog (every restaurant): orders PLACED in (t − 3 h, …] with no ASSIGNED (a
    # driver event carrying the order) and no CANCELLED seen, in whatever order those arrived
    first_placed: dict[str, int] = {}
    settled: set[str] = set()
    for e in seen:
        if not e.order_id:
            continue
        if e.kind == "order" and e.type == "PLACED":
            first_placed.setdefault(e.order_id, e.event_ms)
        elif (e.kind, e.type) in (("order", "CANCELLED"), ("driver", "ASSIGNED")):
            settled.add(e.order_id)
    out[F.ORDERS_WAITING_FOR_DRIVER] = (
        float(
            sum(
                1
                for oid, ms in first_placed.items()
                if oid not in settled and ms > t - F.WAITING_ORDER_TTL_MS
            )
        )
        if first_placed or settled
        else math.nan
    )
    return out


def brute_force_customer(events: list[Ev], customer_id: str, t: int) -> dict[str, float]:
    """The customer's batch features served at ``t``: as of the hourly boundary at or before ``t``, from
    what was archived (ingested) by then, late or not (eta_common.customer_features)."""
    r = t - t % CF.CUSTOMER_REFRESH_MS
    placed: dict[str, int] = {}
    for e in events:
        oid = e.order_id or ""
        if (
            oid
            and (e.kind, e.type) == ("order", "PLACED")
            and e.customer_id == customer_id
            and e.ingest_ms <= r
            and r - CF.CUSTOMER_HISTORY_MS < e.event_ms <= r
        ):
            placed[oid] = min(e.event_ms, placed.get(oid, e.event_ms))
    delivered: dict[str, int] = {}
    for e in events:
        oid = e.order_id or ""
        if (e.kind, e.type) == ("order", "DELIVERED") and oid in placed and max(e.event_ms, e.ingest_ms) <= r:
            delivered[oid] = min(e.event_ms, delivered.get(oid, e.event_ms))
    minutes = [(delivered[o] - placed[o]) / MIN for o in delivered]
    return {
        CF.CUSTOMER_ORDERS_28D: float(len(placed)),
        CF.CUSTOMER_MEAN_DELIVERY_28D: sum(minutes) / len(minutes) if minutes else math.nan,
    }


def _assert_rows_match(data: TrainingSet, events: list[Ev], *, sample: int | None = None) -> int:
    placed = {e.order_id: e for e in events if e.type == "PLACED" and e.kind == "order"}
    indices = list(range(len(data)))
    if sample is not None and len(indices) > sample:
        indices = random.Random(5).sample(indices, sample)
    for i in indices:
        p = placed[data.order_ids[i]]
        assert p.lat is not None
        assert p.lng is not None
        assert p.customer is not None
        assert data.placed_ms[i] == p.event_ms
        expected = brute_force(events, p.restaurant_id or "", (p.lat, p.lng), p.event_ms)
        expected[F.DISTANCE_KM] = F.haversine_km(p.lat, p.lng, *p.customer)
        expected[F.HOUR_OF_WEEK] = float(F.hour_of_week(p.event_ms))
        expected.update(brute_force_customer(events, p.customer_id, p.event_ms))
        got = dict(zip(data.feature_names, data.X[i].tolist(), strict=True))
        for name in F.FEATURE_NAMES:
            want, have = expected[name], got[name]
            assert (math.isnan(want) and math.isnan(have)) or have == pytest.approx(want, abs=1e-9), (
                f"order {data.order_ids[i]} feature {name}: training set {have}, brute force {want}"
            )
    return len(indices)


# --- 1. hand-made ---------------------------------------------------------------------------------------
def _hand_made() -> tuple[list[Ev], int]:
    t = T_HAND + 2 * HOUR
    home = (48.137, 11.575)  # far from every other test history
    near1, near2, far = (48.146, 11.575), (48.137, 11.602), (48.237, 11.575)  # 1 km, 2 km, 11 km
    customer = (48.164, 11.575)  # 3 km
    n = iter(range(1000))

    def ev(kind: str, type_: str, event_ms: int, ingest_ms: int | None = None, **kw: Any) -> Ev:
        return Ev(
            f"h-{next(n)}", kind, type_, event_ms, event_ms + 100 if ingest_ms is None else ingest_ms, **kw
        )

    def placed(oid: str, event_ms: int, ingest_ms: int | None = None) -> Ev:
        return ev("order", "PLACED", event_ms, ingest_ms, restaurant_id="H", order_id=oid, lat=home[0],
                  lng=home[1], customer=customer)  # fmt: skip

    def kitchen(type_: str, event_ms: int, ingest_ms: int | None = None, oid: str | None = None) -> Ev:
        return ev("kitchen", type_, event_ms, ingest_ms, restaurant_id="H", order_id=oid)

    def driver(
        did: str,
        type_: str,
        event_ms: int,
        at: tuple[float, float],
        ingest_ms: int | None = None,
        oid: str | None = None,
    ) -> Ev:
        return ev("driver", type_, event_ms, ingest_ms, driver_id=did, lat=at[0], lng=at[1], order_id=oid)

    events = [
        # window counts at t: 10 min → a1, a6; 30 min → a1, a2, a6
        placed("a1", t - 5 * MIN),
        placed("a2", t - 25 * MIN),
        placed("a2", t - 25 * MIN, t - 20 * MIN),  # the same order sent twice: counts once
        placed("a3", t - 2 * MIN, t + 30_000),  # happened before t, arrived after: not seen at t
        placed("a4", t - 15 * MIN, t - 1 * MIN),  # 14 min late > allowed lateness: never applied
        placed("a5", t + 1 * MIN),  # after t
        placed("a6", t - 1 * MIN, t),  # ingested exactly at t: seen
        placed("a7", t - 31 * MIN),  # outside the 30 min window
        # kitchen: b1 prepared in 20 min (ready inside the hour); b2's READY arrives late; b3 cooking
        kitchen("ORDER_ACCEPTED", t - 30 * MIN, oid="b1"),
        kitchen("ORDER_READY", t - 10 * MIN, oid="b1"),
        kitchen("ORDER_ACCEPTED", t - 20 * MIN, oid="b2"),
        kitchen("ORDER_READY", t - 4 * MIN, t + 2 * MIN, oid="b2"),
        kitchen("ORDER_ACCEPTED", t - 8 * MIN, oid="b3"),
        kitchen("ORDER_READY", t + 3 * MIN, oid="b3"),
        kitchen("ORDER_ACCEPTED", t - 50 * MIN, oid="b4"),
        ev("order", "CANCELLED", t - 40 * MIN, restaurant_id="H", order_id="b4"),  # cancelled: not cooking
        kitchen("ORDER_ACCEPTED", t - 5 * HOUR, oid="b5"),  # abandoned (older than the kitchen TTL)
        # status: BUSY at t-6; the OPENED that ended it arrived after t
        kitchen("OPENED", t - 2 * HOUR),
        kitchen("BUSY", t - 6 * MIN),
        kitchen("OPENED", t - 1 * MIN, t + MIN),
        # drivers: d1 and d2 free nearby at t; d3 too far; d4 online only after t; d5 busy; d6 stale ONLINE
        driver("d1", "ONLINE", t - 30 * MIN, near1),
        driver("d1", "ASSIGNED", t - 2 * MIN, near1, t + 10_000, oid="a2"),
        driver("d2", "ONLINE", t - 20 * MIN, near2),
        driver("d2", "OFFLINE", t + 5 * MIN, near2),
        driver("d3", "ONLINE", t - 20 * MIN, far),
        driver("d4", "ONLINE", t + MIN, near1),
        driver("d5", "ONLINE", t - 40 * MIN, near1),
        driver("d5", "ASSIGNED", t - 10 * MIN, near1, oid="a7"),
        driver("d6", "OFFLINE", t - 5 * MIN, near2),
        driver("d6", "ONLINE", t - 9 * MIN, near2, t - 4 * MIN),  # older than the OFFLINE it follows
        # dispatch backlog at t: a1, a2 (its ASSIGNED arrived after t), a6; a7 assigned; a8's ASSIGNED
        # arrived before its PLACED; a9 cancelled; a0 abandoned (placed more than 3 h ago)
        driver("d7", "ASSIGNED", t - 39 * MIN, far, t - 39 * MIN + 100, oid="a8"),
        placed("a8", t - 40 * MIN, t - 37 * MIN),
        placed("a9", t - 45 * MIN),
        ev("order", "CANCELLED", t - 42 * MIN, restaurant_id="H", order_id="a9"),
        placed("a0", t - 3 * HOUR - 10 * MIN),
        # the row: placed at t, delivered 40 min later; a1 delivered too (another row)
        placed("o", t, t + 200),
        ev("order", "DELIVERED", t + 40 * MIN, restaurant_id="H", order_id="o"),
        ev("order", "DELIVERED", t + 30 * MIN, restaurant_id="H", order_id="a1"),
        ev("order", "DELIVERED", t + 50 * MIN, restaurant_id="H", order_id="a5"),
    ]
    return events, t


async def test_hand_made_history_with_late_and_future_events(pool: asyncpg.Pool) -> None:
    events, t = _hand_made()
    await _archive(pool, events)
    data = await load_training_set(pool, since_ms=T_HAND, until_ms=T_HAND + 6 * HOUR)
    assert sorted(data.order_ids) == ["a1", "a5", "o"]
    row = data.order_ids.index("o")
    got = dict(zip(data.feature_names, data.X[row].tolist(), strict=True))
    assert got[F.NUM_ORDERS_10.name] == 2  # a1, a6 (a3 late, a4 too late, a5 after t)
    assert got[F.NUM_ORDERS_30.name] == 3  # + a2 (once)
    assert got[F.ORDERS_IN_KITCHEN] == 2  # b2 (its READY not seen yet), b3
    assert got[F.MEAN_PREP_MINUTES_60.name] == pytest.approx(20.0)  # b1 only
    assert got[F.KITCHEN_BUSY] == 1  # the OPENED after BUSY arrived after t
    assert got[F.FREE_DRIVERS_NEARBY] == 2  # d1 (ASSIGNED not seen), d2
    assert got[F.ORDERS_WAITING_FOR_DRIVER] == 3  # a1, a2, a6
    assert got[F.DISTANCE_KM] == pytest.approx(3.0, abs=0.01)
    assert data.y[row] == pytest.approx(40.0)
    assert _assert_rows_match(data, events) == 3
    # the same rows with every event not visible at t removed give the same features (no leakage)
    visible = [e for e in events if e.ingest_ms <= t or e.order_id == "o"]
    assert brute_force(visible, "H", (48.137, 11.575), t) == brute_force(events, "H", (48.137, 11.575), t)
    # a history cut at until_ms loses the labels after it: "o" was delivered at t + 40 min
    cut = await load_training_set(pool, since_ms=T_HAND, until_ms=t + 35 * MIN)
    assert sorted(cut.order_ids) == ["a1"]


# --- 2. random ------------------------------------------------------------------------------------------
def _random_history(rng: random.Random) -> list[Ev]:
    centre = (50.0, 8.0)
    restaurants = {
        f"r{i}": (centre[0] + rng.uniform(-0.03, 0.03), centre[1] + rng.uniform(-0.05, 0.05))
        for i in range(3)
    }
    events: list[Ev] = []
    n = iter(range(1_000_000))

    def ingest(event_ms: int) -> int:
        u = rng.random()
        if u < 0.15:
            return event_ms + rng.randrange(MIN, 4 * MIN)  # late but within the allowed lateness
        if u < 0.20:
            return event_ms + rng.randrange(6 * MIN, 20 * MIN)  # later than the allowed lateness
        return event_ms + rng.randrange(50, 500)

    def add(kind: str, type_: str, event_ms: int, **kw: Any) -> None:
        events.append(Ev(f"r-{next(n)}", kind, type_, event_ms, ingest(event_ms), **kw))

    for rid, (lat, lng) in restaurants.items():
        for k in range(70):
            oid = f"{rid}-o{k}"
            t0 = T_RANDOM + rng.randrange(6 * HOUR)
            customer = (lat + rng.uniform(-0.03, 0.03), lng + rng.uniform(-0.04, 0.04))
            add("order", "PLACED", t0, restaurant_id=rid, order_id=oid, lat=lat, lng=lng, customer=customer,
                customer_id=f"cust-{k % 7}")  # fmt: skip
            accepted = t0 + rng.randrange(30_000, 180_000)
            add("kitchen", "ORDER_ACCEPTED", accepted, restaurant_id=rid, order_id=oid)
            if rng.random() < 0.1:
                add(
                    "order",
                    "CANCELLED",
                    accepted + rng.randrange(MIN, 10 * MIN),
                    restaurant_id=rid,
                    order_id=oid,
                )
                continue
            ready = accepted + rng.randrange(5 * MIN, 25 * MIN)
            add("kitchen", "ORDER_READY", ready, restaurant_id=rid, order_id=oid, lat=lat, lng=lng)
            picked = ready + rng.randrange(-MIN, 12 * MIN)  # a clock may say "before ready": waited 0
            add("order", "PICKED_UP", picked, restaurant_id=rid, order_id=oid, driver_id="rd0")
            add(
                "order",
                "DELIVERED",
                picked + rng.randrange(5 * MIN, 30 * MIN),
                restaurant_id=rid,
                order_id=oid,
            )
        status_times = sorted(rng.sample(range(T_RANDOM, T_RANDOM + 6 * HOUR, 1000), 12))
        for ms in status_times:
            add("kitchen", rng.choice(["BUSY", "OPENED", "CLOSED"]), ms, restaurant_id=rid, lat=lat, lng=lng)
    placed = sorted((e.event_ms, e.order_id or "") for e in events if e.type == "PLACED")
    for d in range(8):
        times = sorted(rng.sample(range(T_RANDOM - HOUR, T_RANDOM + 6 * HOUR, 1000), 60))
        for ms in times:
            at = (centre[0] + rng.uniform(-0.05, 0.05), centre[1] + rng.uniform(-0.07, 0.07))
            type_ = rng.choice(["ONLINE", "LOCATION", "LOCATION", "ASSIGNED", "DELIVERED", "OFFLINE"])
            # an ASSIGNED takes an order placed in the last 15 min (or up to 30 s later: device clocks)
            recent = [oid for p, oid in placed if ms - 15 * MIN < p <= ms + 30_000]
            taken = rng.choice(recent) if type_ == "ASSIGNED" and recent else None
            add("driver", type_, ms, driver_id=f"rd{d}", lat=at[0], lng=at[1], order_id=taken)
    return events


async def test_random_history_matches_the_brute_force(pool: asyncpg.Pool) -> None:
    events = _random_history(random.Random(11))
    late = sum(1 for e in events if e.ingest_ms - e.event_ms > 1000)
    assert late > 0.15 * len(events)
    await _archive(pool, events)
    data = await load_training_set(pool, since_ms=T_RANDOM, until_ms=T_RANDOM + 8 * HOUR)
    delivered = {e.order_id for e in events if e.type == "DELIVERED" and e.kind == "order"}
    assert set(data.order_ids) == delivered
    assert _assert_rows_match(data, events) == len(delivered) > 150
    # not trivially empty: every feature varies across rows
    for j, name in enumerate(data.feature_names):
        assert len(np.unique(data.X[~np.isnan(data.X[:, j]), j])) > 1, name


# --- 3. the simulator's history -------------------------------------------------------------------------
async def test_a_simulated_day_matches_the_brute_force(pool: asyncpg.Pool, postgres: ChildProcess) -> None:
    stats = await seed_history(postgres.url, CityConfig(), days=1.0, end_ms=T_SIM_END, progress=False)
    rows = await pool.fetch(
        "SELECT event_id, kind, type, (extract(epoch FROM event_time) * 1000)::bigint AS e, "
        "(extract(epoch FROM ingest_time) * 1000)::bigint AS i, restaurant_id, driver_id, order_id, "
        "lat, lng, customer_lat, customer_lng, coalesce(customer_id, '') AS customer_id FROM events "
        "WHERE event_time >= $1",
        datetime_from_ms(T_SIM_END - 2 * DAY),
    )
    events = [
        Ev(
            r["event_id"],
            r["kind"],
            r["type"],
            r["e"],
            r["i"],
            r["restaurant_id"],
            r["driver_id"],
            r["order_id"],
            r["lat"],
            r["lng"],
            None if r["customer_lat"] is None else (r["customer_lat"], r["customer_lng"]),
            r["customer_id"],
        )
        for r in rows
    ]
    data = await load_training_set(pool, since_ms=T_SIM_END - DAY, until_ms=T_SIM_END)
    assert len(data) == stats.orders_delivered > 300
    assert _assert_rows_match(data, events, sample=60) == 60
    oracle = {o.order_id: o for o in stats.outcomes}
    for i in range(len(data)):
        assert data.y[i] == pytest.approx(oracle[data.order_ids[i]].actual_minutes)
