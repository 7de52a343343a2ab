"""Per-customer history features on real PostgreSQL + Redis: the batch refresh (SQL → Redis) serves
exactly the values the offline point-in-time class computes from the same archive, for every customer and
every refresh boundary; the read helper handles customers absent from the latest refresh and a store that
was never refreshed; the lock, the start-up refresh of the aggregator's loop and the CLI work.

The random history has customers with orders inside and outside the 28-day window, late-archived events
(hours and days), undelivered orders, deliveries after the boundary, duplicate PLACED / DELIVERED events,
DELIVERED events without a customer id and drivers' DELIVERED events for the same orders."""

from __future__ import annotations

import asyncio
import math
import os
import random
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest
import redis.asyncio as aioredis

from aggregator.config import AggregatorSettings
from aggregator.customer_refresh import LOCK_KEY, due_boundary, refresh_if_due, refresh_loop
from devstack.infra import ChildProcess, start_postgres, start_redis
from eta.v1 import events_pb2
from eta_common import customer_features as CF
from eta_common.config import DatabaseSettings, KafkaSettings, RedisSettings, ServerSettings
from eta_common.db.archive import ArchivedEvent, archive_events
from eta_common.db.migrate import apply_migrations
from eta_common.timeutil import now_ms, timestamp_from_ms
from tests.integration.conftest import poll_until

pytestmark = pytest.mark.integration

MIN = 60_000
HOUR = 60 * MIN
DAY = 24 * HOUR
B = 1_740_787_200_000 + 10 * HOUR  # 2025-03-01 10:00 UTC, a refresh boundary
BOUNDARIES = (B, B + HOUR, B + 2 * HOUR, B + 5 * HOUR, B + 3 * DAY)
GONE = "cust-gone"  # only order: in the window at B, out of it from B + 1 h


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ChildProcess, ChildProcess]]:
    workdir: Path = tmp_path_factory.mktemp("customer-features")
    pg = start_postgres(workdir / "pgdata", workdir / "logs")
    try:
        rd = start_redis(workdir / "redis", workdir / "logs")
        try:
            yield pg, rd
        finally:
            rd.stop()
    finally:
        pg.stop()


@pytest.fixture(scope="module")
async def pool(servers: tuple[ChildProcess, ChildProcess]) -> AsyncIterator[asyncpg.Pool]:
    await apply_migrations(servers[0].url)
    p = await asyncpg.create_pool(servers[0].url, min_size=1, max_size=2)
    try:
        yield p
    finally:
        await p.close()


@pytest.fixture
async def redis_client(servers: tuple[ChildProcess, ChildProcess]) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(servers[1].url, decode_responses=False)
    await client.flushdb()
    try:
        yield client
    finally:
        await client.aclose()


# --- the random history ----------------------------------------------------------------------------------
def _order_event(
    event_id: str, etype: str, order_id: str, event_ms: int, customer: str | None
) -> events_pb2.Event:
    order = events_pb2.OrderEvent(
        event_id=event_id,
        event_time=timestamp_from_ms(event_ms),
        order_id=order_id,
        restaurant_id="rst-1",
        customer_id=customer or "",
        type=events_pb2.OrderEvent.Type.Value(etype),
    )
    if etype == "PLACED":
        order.restaurant_location.CopyFrom(events_pb2.GeoPoint(lat=52.52, lng=13.40))
        order.customer_location.CopyFrom(events_pb2.GeoPoint(lat=52.53, lng=13.42))
    return events_pb2.Event(order=order)


def _driver_delivered(event_id: str, order_id: str, event_ms: int) -> events_pb2.Event:
    return events_pb2.Event(
        driver=events_pb2.DriverEvent(
            event_id=event_id,
            event_time=timestamp_from_ms(event_ms),
            driver_id="drv-1",
            type=events_pb2.DriverEvent.DELIVERED,
            location=events_pb2.GeoPoint(lat=52.53, lng=13.42),
            order_id=order_id,
        )
    )


def _lag(rng: random.Random) -> int:
    """Ingest − event time: mostly seconds, sometimes hours, rarely days (batch features keep them)."""
    roll = rng.random()
    if roll < 0.75:
        return rng.randint(0, 5_000)
    if roll < 0.95:
        return rng.randint(5 * MIN, 4 * HOUR)
    return rng.randint(1 * DAY, 3 * DAY)


def random_history(seed: int = 7) -> list[ArchivedEvent]:
    rng = random.Random(seed)
    items: list[ArchivedEvent] = []
    n = 0

    def add(event: events_pb2.Event, ingest_ms: int) -> None:
        items.append(ArchivedEvent(event, ingest_ms))

    for c in range(14):
        customer = f"cust-{c:02d}"
        for o in range(rng.randint(0, 14) if c else 0):  # cust-00 never orders
            order_id = f"{customer}-o{o}"
            if rng.random() < 0.5:  # before, across and after the windows
                placed = B - 30 * DAY + rng.randint(0, 33 * DAY)
            else:  # around the boundaries refreshed, where late events matter
                placed = B - 6 * HOUR + rng.randint(0, 12 * HOUR)
            n += 1
            add(_order_event(f"e{n}", "PLACED", order_id, placed, customer), placed + _lag(rng))
            if rng.random() < 0.15:  # the same PLACED re-sent (another event id), maybe a bit later
                n += 1
                again = placed + rng.choice((0, rng.randint(1, 2 * MIN)))
                add(_order_event(f"e{n}", "PLACED", order_id, again, customer), again + _lag(rng))
            if rng.random() < 0.8:
                done = placed + rng.randint(12 * MIN, 90 * MIN)
                n += 1
                no_customer = rng.random() < 0.5  # DELIVERED events need not carry the customer id
                add(
                    _order_event(f"e{n}", "DELIVERED", order_id, done, None if no_customer else customer),
                    done + _lag(rng),
                )
                n += 1
                add(_driver_delivered(f"e{n}", order_id, done - MIN), done - MIN + 100)  # a driver's
                if rng.random() < 0.15:
                    n += 1
                    later = done + rng.randint(1, 10 * MIN)
                    add(_order_event(f"e{n}", "DELIVERED", order_id, later, customer), later + _lag(rng))
    gone_placed = B - 28 * DAY + 30 * MIN
    add(_order_event("gone-1", "PLACED", f"{GONE}-o1", gone_placed, GONE), gone_placed + 1000)
    add(
        _order_event("gone-2", "DELIVERED", f"{GONE}-o1", gone_placed + 25 * MIN, None),
        gone_placed + 26 * MIN,
    )
    # an order never delivered; an order archived after the boundary it happened before
    add(
        _order_event("undelivered-1", "PLACED", "cust-undelivered-o1", B - 2 * HOUR, "cust-undelivered"),
        B - 2 * HOUR,
    )
    add(_order_event("late-1", "PLACED", "cust-late-o1", B - 10 * MIN, "cust-late"), B + 30 * MIN)
    edge = B + HOUR - CF.CUSTOMER_HISTORY_MS  # the window of B + 1 h is (edge, B + 1 h]
    add(_order_event("edge-1", "PLACED", "cust-edge-o1", edge, "cust-edge"), edge)
    add(_order_event("edge-2", "PLACED", "cust-edge-o2", edge + 1, "cust-edge"), edge + 1)
    add(_order_event("late-2", "PLACED", "cust-late-o2", B - HOUR, "cust-late"), B - HOUR)
    add(_order_event("late-3", "DELIVERED", "cust-late-o2", B - 30 * MIN, None), B + 10 * MIN)
    return items


def _history_from(items: list[ArchivedEvent]) -> CF.CustomerHistory:
    history = CF.CustomerHistory()
    for item in items:
        kind = item.event.WhichOneof("payload")
        if kind == "order":
            o = item.event.order
            etype = events_pb2.OrderEvent.Type.Name(o.type)
            event_ms = o.event_time.seconds * 1000 + o.event_time.nanos // 1_000_000
            history.add(
                CF.CustomerOrderEvent(
                    kind, etype, o.order_id, o.customer_id or None, event_ms, item.ingest_ms
                )
            )
        elif kind == "driver":
            d = item.event.driver
            event_ms = d.event_time.seconds * 1000 + d.event_time.nanos // 1_000_000
            history.add(CF.CustomerOrderEvent(kind, "DELIVERED", d.order_id, None, event_ms, item.ingest_ms))
    return history


def _same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


@pytest.fixture(scope="module")
async def archived(pool: asyncpg.Pool) -> list[ArchivedEvent]:
    items = random_history()
    assert await archive_events(pool, items) == len(items)
    return items


# --- tests ----------------------------------------------------------------------------------------------
async def test_redis_equals_the_offline_class_for_every_customer_and_boundary(
    pool: asyncpg.Pool, redis_client: aioredis.Redis, archived: list[ArchivedEvent]
) -> None:
    loaded = await CF.load_customer_history(pool, since_ms=BOUNDARIES[0], until_ms=BOUNDARIES[-1])
    in_memory = _history_from(archived)
    customers = [*in_memory.customers(), "cust-00", "never-seen"]
    assert set(loaded.customers()) <= set(in_memory.customers())  # only orders placed near the range
    assert GONE in customers

    never = await CF.read_customer_features(redis_client, "cust-01")  # nothing refreshed yet: unknown
    assert never.as_of_ms is None
    assert math.isnan(never.orders_last_28_days)
    assert math.isnan(never.mean_delivery_minutes_last_28_days)

    compared = mismatches = 0
    samples: list[tuple[int, str, object, object]] = []
    seen_values: set[tuple[float, bool]] = set()
    for r in BOUNDARIES:
        stats = await CF.refresh_customer_features(pool, redis_client, r, chunk_size=5)  # several chunks
        assert stats.as_of_ms == r
        offline_with_orders = 0
        for customer in customers:
            offline = loaded.features_as_of(customer, r)
            from_memory = in_memory.features_as_of(customer, r)  # the loader's SQL misses nothing
            assert all(_same(offline[k], from_memory[k]) for k in CF.CUSTOMER_FEATURE_NAMES)
            offline_with_orders += offline[CF.CUSTOMER_ORDERS_28D] > 0
            online = await CF.read_customer_features(redis_client, customer)
            compared += 1
            seen_values.add(
                (offline[CF.CUSTOMER_ORDERS_28D], math.isnan(offline[CF.CUSTOMER_MEAN_DELIVERY_28D]))
            )
            got = online.values()
            if online.as_of_ms != r or not all(_same(got[k], offline[k]) for k in CF.CUSTOMER_FEATURE_NAMES):
                mismatches += 1
                samples.append((r, customer, online, offline))
        assert stats.customers == offline_with_orders
    assert compared == len(BOUNDARIES) * len(customers)
    assert mismatches == 0, samples[:5]
    # the history exercised the interesting cases: no orders, orders without any delivery, both
    assert (0.0, True) in seen_values
    assert any(orders > 0 and nan for orders, nan in seen_values)
    assert any(orders > 0 and not nan for orders, nan in seen_values)
    assert loaded.features_as_of("cust-edge", B + HOUR)[CF.CUSTOMER_ORDERS_28D] == 1.0
    # the late-archived order and delivery count from the next boundary on
    late_at_b = loaded.features_as_of("cust-late", B)
    assert late_at_b[CF.CUSTOMER_ORDERS_28D] == 1.0
    assert math.isnan(late_at_b[CF.CUSTOMER_MEAN_DELIVERY_28D])
    assert loaded.features_as_of("cust-late", B + HOUR) == {
        CF.CUSTOMER_ORDERS_28D: 2.0,
        CF.CUSTOMER_MEAN_DELIVERY_28D: 30.0,
    }


async def test_customer_absent_from_the_latest_refresh_reads_zero(
    pool: asyncpg.Pool, redis_client: aioredis.Redis, archived: list[ArchivedEvent]
) -> None:
    await CF.refresh_customer_features(pool, redis_client, B)
    at_b = await CF.read_customer_features(redis_client, GONE)
    assert (at_b.orders_last_28_days, at_b.mean_delivery_minutes_last_28_days, at_b.as_of_ms) == (
        1.0,
        25.0,
        B,
    )

    await CF.refresh_customer_features(pool, redis_client, B + HOUR)
    raw = await redis_client.hmget(CF.customer_key(GONE), ["orders", "as_of"])
    assert raw == [b"1", str(B).encode()]  # its hash from B is still there, older than the marker
    after = await CF.read_customer_features(redis_client, GONE)
    assert after.orders_last_28_days == 0.0
    assert math.isnan(after.mean_delivery_minutes_last_28_days)
    assert after.as_of_ms == B + HOUR
    never_ordered = await CF.read_customer_features(redis_client, "cust-00")
    assert never_ordered.orders_last_28_days == 0.0
    assert math.isnan(never_ordered.mean_delivery_minutes_last_28_days)
    assert 0 < await redis_client.pttl(CF.customer_key("cust-01")) <= CF.CUSTOMER_KEY_TTL_MS
    assert 0 < await redis_client.pttl(CF.MARKER_KEY) <= CF.MARKER_TTL_MS

    with pytest.raises(CF.StaleRefreshError):  # the marker never moves backwards
        await CF.refresh_customer_features(pool, redis_client, B)
    assert await CF.read_marker(redis_client) == B + HOUR


async def test_lock_lets_one_process_refresh(
    pool: asyncpg.Pool, redis_client: aioredis.Redis, archived: list[ArchivedEvent]
) -> None:
    await redis_client.set(LOCK_KEY, "another-replica", ex=60)
    held = await refresh_if_due(pool, redis_client, due_ms=B, lock_seconds=60, trigger="test")
    assert held.outcome == "locked"
    assert await CF.read_marker(redis_client) is None
    await redis_client.delete(LOCK_KEY)

    done = await refresh_if_due(pool, redis_client, due_ms=B, lock_seconds=60, trigger="test")
    assert done.outcome == "refreshed"
    assert done.stats is not None
    assert await redis_client.get(LOCK_KEY) is None  # released
    again = await refresh_if_due(pool, redis_client, due_ms=B, lock_seconds=60, trigger="test")
    assert again.outcome == "up_to_date"
    forced = await refresh_if_due(pool, redis_client, due_ms=B, lock_seconds=60, trigger="test", force=True)
    assert forced.outcome == "refreshed"


async def test_aggregator_loop_refreshes_at_startup(
    pool: asyncpg.Pool,
    redis_client: aioredis.Redis,
    servers: tuple[ChildProcess, ChildProcess],
    archived: list[ArchivedEvent],
) -> None:
    await CF.refresh_customer_features(pool, redis_client, B)  # an old refresh: out of date now
    settings = AggregatorSettings(
        server=ServerSettings(grpc_port=0, metrics_port=0),
        kafka=KafkaSettings(),
        redis=RedisSettings(url=servers[1].url),
        database=DatabaseSettings(url=servers[0].url),
        customer_refresh_delay_seconds=0.0,
    )
    task = asyncio.create_task(refresh_loop(pool, redis_client, settings))
    try:
        due = due_boundary(now_ms(), 0)
        marker = await poll_until(lambda: CF.read_marker(redis_client), lambda m: m is not None and m >= due)
        assert marker in (due, due + CF.CUSTOMER_REFRESH_MS)  # (an hour boundary may pass meanwhile)
        assert not task.done()  # it waits for the next boundary instead of returning
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    # the history is from 2025: nobody has an order in the current window
    current = await CF.read_customer_features(redis_client, "cust-01")
    assert current.orders_last_28_days == 0.0
    assert current.as_of_ms == marker


def test_cli_refreshes_and_respects_the_lock(
    servers: tuple[ChildProcess, ChildProcess], archived: list[ArchivedEvent]
) -> None:
    import redis

    env = {**os.environ, "DATABASE_URL": servers[0].url, "REDIS_URL": servers[1].url, "LOG_FORMAT": "text"}
    sync = redis.Redis.from_url(servers[1].url)
    try:
        sync.flushdb()
        command = [sys.executable, "-m", "aggregator", "refresh-customer-features", "--as-of-ms", str(B + 17)]
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120, check=False)
        assert done.returncode == 0, done.stderr
        assert f"as of {B}" in done.stdout
        assert sync.get(CF.MARKER_KEY) == str(B).encode()
        sync.set(LOCK_KEY, "another-replica", ex=60)
        command[-1] = str(B + HOUR)
        locked = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120, check=False)
        assert locked.returncode == 1
        assert "holds" in locked.stderr
        assert sync.get(CF.MARKER_KEY) == str(B).encode()
    finally:
        sync.flushdb()
        sync.close()
