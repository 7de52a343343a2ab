"""Issue #3 guarantees on the real stack (Tansu broker, Redis, PostgreSQL, aggregator processes):
exact event-time windows with lateness, counted once, crash-safe under kill -9, scale-out through a
rebalance, rebuild after Redis loss, and an archive that loses nothing across a PostgreSQL outage.

"From-scratch recomputation" is the offline builder (the trainer's feature code) run over the exact
streams that were produced: every stream this module produced into its stack, because the tests share
one aggregator and one city, and a city-wide feature (the dispatch backlog) sees every test's orders."""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator, Sequence

import asyncpg
import pytest

from devstack import synthetic
from devstack.infra import ChildProcess, RedisCluster, start_postgres
from devstack.stack import LocalStack
from devstack.synthetic import (
    MIN,
    City,
    Sent,
    make_city,
    online_features,
    random_stream,
    unique_count,
)
from eta.v1 import events_pb2
from eta_common import customer_features as CF
from eta_common import features as F
from eta_common.config import KafkaSettings
from eta_common.kafka import ensure_topics
from eta_common.offline_features import FeatureQuery, OfflineFeatureBuilder
from eta_common.online_store import OnlineStore
from eta_common.timeutil import now_ms, timestamp_from_ms
from tests.integration.conftest import own_stack
from tests.integration.helpers import start_test_redis

pytestmark = pytest.mark.integration

AGGREGATOR_ENV = {
    "AGGREGATOR_SESSION_TIMEOUT_MS": "6000",
    "SHUTDOWN_GRACE_SECONDS": "2",
    "LOG_FORMAT": "json",
    "OTEL_TRACES_SAMPLER": "always_off",
    "AGGREGATOR_ACCURACY_SECONDS": "1",
}


# Every record produced into the module's stack (the offline recomputation's input).
PRODUCED: list[Sent] = []


async def produce(settings: KafkaSettings, stream: Sequence[Sent]) -> None:
    PRODUCED.extend(stream)
    await synthetic.produce(settings, stream)


@pytest.fixture(scope="module")
def fstack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    PRODUCED.clear()
    with own_stack(tmp_path_factory, "features", services=("aggregator",), extra_env=AGGREGATOR_ENV) as stack:
        yield stack


@pytest.fixture
async def store(fstack: LocalStack) -> AsyncIterator[OnlineStore]:
    online = OnlineStore.from_url(fstack.redis_url)
    yield online
    await online.close()


@pytest.fixture
async def db(fstack: LocalStack) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(fstack.database_url)
    yield conn
    await conn.close()


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return str(response.read().decode())


def kafka(stack: LocalStack) -> KafkaSettings:
    return KafkaSettings(bootstrap_servers=stack.kafka)


async def wait_archived(stack: LocalStack, prefix: str, expected: int, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    count = -1
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, asyncpg.PostgresError):
            conn = await asyncpg.connect(stack.database_url, timeout=2)
            try:
                count = await conn.fetchval(
                    "SELECT count(*) FROM events WHERE event_id LIKE $1", f"{prefix}-%" if prefix else "%"
                )
            finally:
                await conn.close()
            if count == expected:
                return
            assert count < expected, f"more archived rows than unique events: {count} > {expected}"
        await asyncio.sleep(0.25)
    raise AssertionError(f"archived {count} of {expected} events for {prefix} within {timeout}s")


def offline_values(stream: Sequence[Sent], city: City, at_ms: int) -> dict[str, dict[str, float]]:
    """``city``'s features recomputed from everything produced into the stack (``stream`` included)."""
    assert {id(s) for s in stream} <= {id(s) for s in PRODUCED}
    builder = OfflineFeatureBuilder()
    for item in sorted(PRODUCED, key=lambda s: s.ingest_ms):
        builder.apply(item.history())
    return {
        rid: builder.features_at(FeatureQuery(rid, rid, at_ms, lat, lng))
        for rid, (lat, lng) in city.restaurants.items()
    }


async def assert_online_equals_offline(
    store: OnlineStore, city: City, stream: Sequence[Sent], at_ms: int
) -> int:
    expected = offline_values(stream, city, at_ms)
    online = await online_features(store, city, at_ms)
    mismatches = []
    compared = 0
    for rid, values in expected.items():
        for name, value in values.items():
            got = online[rid].readings[name].value
            compared += 1
            same = math.isnan(got) if math.isnan(value) else got == pytest.approx(value)
            if not same:
                mismatches.append((rid, name, got, value))
    assert mismatches == [], f"{len(mismatches)} of {compared} feature values differ: {mismatches[:10]}"
    return compared


async def test_windows_are_exact_over_event_time_and_late_events_are_archived_not_applied(
    fstack: LocalStack, store: OnlineStore, db: asyncpg.Connection
) -> None:
    t = now_ms() - MIN
    rid, prefix = "edge-r1", "edge"
    loc = events_pb2.GeoPoint(lat=40.0, lng=-3.7)

    def placed(name: str, event_ms: int, ingest_ms: int) -> Sent:
        return Sent(
            events_pb2.Event(
                order=events_pb2.OrderEvent(
                    event_id=f"{prefix}-{name}",
                    event_time=timestamp_from_ms(event_ms),
                    order_id=f"{prefix}-{name}",
                    restaurant_id=rid,
                    customer_id="c",
                    type=events_pb2.OrderEvent.PLACED,
                    restaurant_location=loc,
                    customer_location=loc,
                )
            ),
            ingest_ms,
        )

    stream = [
        placed(
            "at-30m", t - 30 * MIN, t - 30 * MIN + 100
        ),  # exactly on the open edge: out of the 30-min window
        placed("after-30m", t - 30 * MIN + 1, t - 30 * MIN + 50),
        placed("at-10m", t - 10 * MIN, t - 10 * MIN + 100),  # out of the 10-min window, in the 30-min one
        placed("after-10m", t - 10 * MIN + 1, t - 9 * MIN),
        placed("at-t", t, t + 10),
        placed("late", t - 20 * MIN, t - 20 * MIN + 6 * MIN),  # 6 min after its event time: beyond lateness
        placed("just-in-time", t - 25 * MIN, t - 25 * MIN + 5 * MIN),  # exactly the allowed lateness
    ]
    random.Random(3).shuffle(stream)  # out of order on the topic
    await produce(kafka(fstack), stream)
    await wait_archived(fstack, prefix, len(stream))

    features = (await store.read_restaurant(rid, now_ms=t)).readings
    assert features[F.NUM_ORDERS_30.name].value == 5  # after-30m, at-10m, after-10m, at-t, just-in-time
    assert features[F.NUM_ORDERS_10.name].value == 2  # after-10m, at-t
    # one millisecond earlier the window (t-1-10m, t-1] holds at-10m and after-10m but not at-t
    assert (await store.read_restaurant(rid, now_ms=t - 1)).readings[F.NUM_ORDERS_10.name].value == 2
    # one millisecond later (t+1-10m, t+1] has lost after-10m (on the open edge): only at-t
    assert (await store.read_restaurant(rid, now_ms=t + 1)).readings[F.NUM_ORDERS_10.name].value == 1
    late_row = await db.fetchrow("SELECT applied_at FROM events WHERE event_id = 'edge-late'")
    assert late_row is not None
    assert late_row["applied_at"] is None  # archived, never applied online
    metrics_port = fstack.processes[-1].extra["metrics_port"]
    body = await asyncio.to_thread(scrape, f"http://127.0.0.1:{metrics_port}/metrics")
    late_lines = [
        line
        for line in body.splitlines()
        if line.startswith('eta_aggregator_late_events_total{kind="order"}')
    ]
    assert late_lines, "late-event metric missing"
    assert float(late_lines[0].split()[-1]) >= 1
    # the live-accuracy gauges are refreshed by the aggregator every AGGREGATOR_ACCURACY_SECONDS
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    deadline = time.monotonic() + 15
    while "eta_live_window_seconds 3600.0" not in body:
        assert time.monotonic() < deadline, "live accuracy gauges never refreshed"
        await asyncio.sleep(0.5)
        body = await asyncio.to_thread(scrape, url)
    assert "eta_live_delivered_orders 0.0" in body  # nothing delivered in this stream


async def test_duplicates_change_nothing(
    fstack: LocalStack, store: OnlineStore, db: asyncpg.Connection
) -> None:
    t = now_ms()
    event = events_pb2.Event(
        order=events_pb2.OrderEvent(
            event_id="dup-1",
            event_time=timestamp_from_ms(t - MIN),
            order_id="dup-o1",
            restaurant_id="dup-r1",
            customer_id="c",
            type=events_pb2.OrderEvent.PLACED,
            restaurant_location=events_pb2.GeoPoint(lat=41.0, lng=2.1),
            customer_location=events_pb2.GeoPoint(lat=41.01, lng=2.1),
        )
    )
    # the same record three times (a producer retry without idempotence), and once more in a later batch
    await produce(kafka(fstack), [Sent(event, t - MIN + 10)] * 3)
    await wait_archived(fstack, "dup", 1)
    await produce(kafka(fstack), [Sent(event, t - MIN + 10)])
    await asyncio.sleep(1.0)  # give the last copy time to be consumed: nothing may change
    assert await db.fetchval("SELECT count(*) FROM events WHERE event_id = 'dup-1'") == 1
    assert (await store.read_restaurant("dup-r1", now_ms=t)).readings[F.NUM_ORDERS_30.name].value == 1


async def test_kill_9_at_random_points_loses_and_doubles_nothing(
    fstack: LocalStack, store: OnlineStore
) -> None:
    rng = random.Random(99)
    city = make_city(rng, "crash", (48.85, 2.35))
    start = now_ms() - 240 * MIN
    stream = random_stream(rng, city, start_ms=start, minutes=235, orders_per_minute=25)
    assert len(stream) >= 20_000
    pieces = [stream[i : i + 2500] for i in range(0, len(stream), 2500)]

    async def producer() -> None:
        for piece in pieces:
            await produce(kafka(fstack), piece)
            await asyncio.sleep(0.3)

    async def killer() -> int:
        kills = 0
        for _ in range(3):
            await asyncio.sleep(rng.uniform(0.5, 2.5))
            victim = next(
                p for p in reversed(fstack.processes) if p.name.startswith("aggregator") and p.alive()
            )
            victim.kill()
            kills += 1
            await asyncio.to_thread(
                fstack.start_service, "aggregator", extra_env=AGGREGATOR_ENV, instance=f"restart{kills}"
            )
        return kills

    kills, _ = await asyncio.gather(killer(), producer())
    assert kills == 3
    await wait_archived(fstack, "crash", unique_count(stream))
    compared = await assert_online_equals_offline(store, city, stream, max(s.ingest_ms for s in stream) + 1)
    # every streaming feature of every restaurant (the customer features are batch: not from this stream)
    streaming = [name for name in F.DEFAULTS if name not in CF.CUSTOMER_FEATURE_NAMES]
    assert compared == len(city.restaurants) * len(streaming)


def records_consumed(child: ChildProcess) -> float:
    """Records an aggregator process has consumed (its ``eta_aggregator_records_total``, all outcomes)."""
    body = scrape(f"http://127.0.0.1:{child.extra['metrics_port']}/metrics")
    prefix = "eta_aggregator_records_total{"
    return sum(float(line.rsplit(" ", 1)[1]) for line in body.splitlines() if line.startswith(prefix))


@pytest.mark.parametrize(
    ("partitions", "aggregators"),
    [
        pytest.param(3, 2, id="3-partitions-2-aggregators"),
        pytest.param(6, 3, id="6-partitions-3-aggregators"),
    ],
)
async def test_aggregators_with_a_rebalance_mid_stream_equal_one(
    fstack: LocalStack, store: OnlineStore, partitions: int, aggregators: int
) -> None:
    """Partitions are the parallelism: ``aggregators`` processes of one consumer group over topics of
    ``partitions`` partitions, joining one at a time while the stream flows (a rebalance at each join),
    each consuming a share of it, give the features of one process (the offline recomputation).

    Its own topics (prefix) and group, so the count of partitions and of processes is the test's; the
    stack's Redis and PostgreSQL are shared (the city-wide features see every test's stream, as the
    recomputation does)."""
    tag = f"p{partitions}x{aggregators}"
    settings = KafkaSettings(bootstrap_servers=fstack.kafka, topic_prefix=f"{tag}.", partitions=partitions)
    await ensure_topics(settings)
    env = AGGREGATOR_ENV | {
        "KAFKA_TOPIC_PREFIX": settings.topic_prefix,
        "KAFKA_TOPIC_PARTITIONS": str(partitions),
        "AGGREGATOR_GROUP_ID": f"eta-aggregator-{tag}",
    }
    rng = random.Random(7)
    city = make_city(rng, f"scale{tag}", (51.5, -0.12), n_drivers=30)
    stream = random_stream(rng, city, start_ms=now_ms() - 120 * MIN, minutes=115, orders_per_minute=20)
    pieces = [stream[i : i + 120] for i in range(0, len(stream), 120)]
    started: list[ChildProcess] = []
    produced = asyncio.Event()

    async def producer() -> None:
        for piece in pieces:
            await produce(settings, piece)
            await asyncio.sleep(0.25)
        produced.set()

    async def join_one_by_one() -> None:
        for i in range(aggregators):
            child = await asyncio.to_thread(
                fstack.start_service, "aggregator", extra_env=env, instance=f"{tag}-{i}"
            )
            started.append(child)
            # the next one joins (another rebalance) once this one owns partitions and consumes
            while await asyncio.to_thread(records_consumed, child) == 0:
                assert not produced.is_set(), f"the stream ended before aggregator {i} consumed anything"
                await asyncio.sleep(0.1)

    try:
        await asyncio.gather(producer(), join_one_by_one())
        await wait_archived(fstack, city.prefix, unique_count(stream))
        await assert_online_equals_offline(store, city, stream, max(s.ingest_ms for s in stream) + 1)
        shares = [await asyncio.to_thread(records_consumed, child) for child in started]
        assert all(share > 0 for share in shares), f"records consumed per aggregator: {shares}"
        conn = await asyncpg.connect(fstack.database_url)
        try:
            used = await conn.fetchval(
                "SELECT count(DISTINCT kafka_partition) FROM events "
                "WHERE event_id LIKE $1 AND kind = 'driver'",
                f"{city.prefix}-%",
            )
        finally:
            await conn.close()
        assert used == partitions  # the drivers' records spread over every partition of the topic
    finally:
        for child in started:
            child.stop()


async def test_rebuild_after_redis_loss_restores_identical_features(
    fstack: LocalStack, store: OnlineStore
) -> None:
    rng = random.Random(11)
    city = make_city(rng, "rebuild", (45.46, 9.19))
    stream = random_stream(rng, city, start_ms=now_ms() - 90 * MIN, minutes=85, orders_per_minute=15)
    await produce(kafka(fstack), stream)
    await wait_archived(fstack, "rebuild", unique_count(stream))
    at = max(s.ingest_ms for s in stream) + 1
    before = await online_features(store, city, at)
    await assert_online_equals_offline(store, city, stream, at)

    # 1. the documented command
    await store.client.flushall()
    assert await store.read_restaurants([(r, loc) for r, loc in city.restaurants.items()], now_ms=at) != []
    env = fstack.env() | {"LOG_FORMAT": "text"}
    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "aggregator", "rebuild", "--since-hours", "24"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "rebuilt online store" in result.stdout
    await assert_online_equals_offline(store, city, stream, at)
    after = await online_features(store, city, at)
    for rid, features in after.items():
        lost, rebuilt = before[rid].vector(list(F.DEFAULTS)), features.vector(list(F.DEFAULTS))
        assert [None if math.isnan(v) else round(v, 9) for v in rebuilt] == [
            None if math.isnan(v) else round(v, 9) for v in lost
        ], rid

    # 2. automatic detection by the running aggregator (watchdog), no command
    await store.client.flushall()
    deadline = time.monotonic() + 60
    while not await store.is_initialized():
        assert time.monotonic() < deadline, "aggregator did not notice the flushed online store"
        await asyncio.sleep(0.5)
    await assert_online_equals_offline(store, city, stream, at)


async def test_archive_survives_a_postgres_outage(fstack: LocalStack, store: OnlineStore) -> None:
    rng = random.Random(5)
    city = make_city(rng, "pgout", (52.37, 4.9))
    stream = random_stream(rng, city, start_ms=now_ms() - 60 * MIN, minutes=55, orders_per_minute=10)
    pg = next(p for p in fstack.processes if p.name == "postgres")
    pg.kill()
    fstack.processes.remove(pg)
    outage_started = time.monotonic()
    try:
        await produce(kafka(fstack), stream)
        # online features keep flowing while the archive cannot write
        at = max(s.ingest_ms for s in stream) + 1
        deadline = time.monotonic() + 30
        while True:
            try:
                await assert_online_equals_offline(store, city, stream, at)
                break
            except AssertionError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.5)
        await asyncio.sleep(max(0.0, 20 - (time.monotonic() - outage_started)))  # tens of seconds down
    finally:
        restarted = await asyncio.to_thread(
            start_postgres, fstack.workdir / "pgdata", fstack.log_dir, pg.port
        )
        fstack.processes.insert(0, restarted)
    await wait_archived(fstack, "pgout", unique_count(stream))


async def test_redis_outage_the_aggregator_waits_then_rebuilds(
    fstack: LocalStack, store: OnlineStore
) -> None:
    """Redis dies mid-stream and comes back empty: the aggregator neither crashes nor skips anything — it
    retries the batch in hand, its watchdog rebuilds the lost state from the archive, and the features
    end up equal to the from-scratch recomputation."""
    rng = random.Random(17)
    city = make_city(rng, "redisout", (41.39, 2.17))
    stream = random_stream(rng, city, start_ms=now_ms() - 60 * MIN, minutes=55, orders_per_minute=10)
    aggregators = [p for p in fstack.processes if p.name.startswith("aggregator") and p.alive()]
    assert aggregators
    metrics_url = f"http://127.0.0.1:{aggregators[0].extra['metrics_port']}/metrics"
    redis = fstack.redis
    assert redis is not None
    nodes = redis.nodes if isinstance(redis, RedisCluster) else [redis]  # in cluster mode, every shard
    half = len(stream) // 2
    await produce(kafka(fstack), stream[:half])
    await wait_archived(fstack, "redisout", unique_count(stream[:half]))  # applied online, then archived
    redis.kill()
    for node in nodes:
        fstack.processes.remove(node)
    try:
        await produce(kafka(fstack), stream[half:])  # consumed while Redis is down
        deadline = time.monotonic() + 30
        while "eta_aggregator_redis_retries_total 0.0" in scrape(metrics_url):
            assert time.monotonic() < deadline, "the aggregator never retried against the dead Redis"
            await asyncio.sleep(0.25)
        await asyncio.sleep(5)  # down for a while
        assert all(p.alive() for p in aggregators), "an aggregator exited during the Redis outage"
    finally:
        restarted = await asyncio.to_thread(
            start_test_redis, fstack.workdir / "redis", fstack.log_dir, like=redis
        )
        fstack.redis = restarted
        fstack.processes[1:1] = restarted.nodes if isinstance(restarted, RedisCluster) else [restarted]
    await wait_archived(fstack, "redisout", unique_count(stream))
    at = max(s.ingest_ms for s in stream) + 1
    deadline = time.monotonic() + 60
    while True:  # the watchdog notices the empty store and rebuilds the first half from the archive
        try:
            assert await store.is_initialized()
            await assert_online_equals_offline(store, city, stream, at)
            break
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)
    assert all(p.alive() for p in aggregators)
