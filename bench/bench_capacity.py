"""Per-unit costs for the capacity model (``docs/capacity.md``, ``eta-capacity``).

The aggregator, Redis and PostgreSQL costs are measured here, **per event kind**, on the real stack
(Tansu broker, Redis, PostgreSQL, one aggregator process with its row maintenance, tracing off). Each kind
is a *segment* with its own topics (a topic prefix) and its own consumer group, so one aggregator process
sees only that kind:

* ``pings``: drivers go ONLINE once, then send LOCATION pings every 4 s (the platform's largest stream),
  only the pings the keep rule keeps (``features.ping_kept``: applied and archived);
* ``pings_not_kept``: the same drivers' pings the rule drops (once the aggregator applies the rule, the
  cost of dropping one; before, measured as applied and the drop cost is estimated instead);
* ``orders``: order lifecycles without pings — PLACED, dispatch (ASSIGNED, DELIVERED), kitchen ACCEPTED /
  READY, PICKED_UP, a few CANCELLED — over a set of restaurants (no duplicates, nothing late);
* ``restaurants``: one kitchen status event per restaurant of a fresh set (Redis memory per restaurant);
  10,000 of them (1,000 quick): ``/proc`` counts CPU in 10 ms ticks, which over the 2,000 of earlier runs
  was 5 µs per record of resolution per process, and the window's fixed costs (fetch wake-ups, the
  benchmark's own metrics scrapes) weighed on a 0.3 s window.

Every segment runs ``ROUNDS`` times (3; quick: 1), each round with ids of its own and on an emptied Redis
(marked initialized, as after a rebuild), and the round with the median aggregator CPU per record is
reported (every round's figure is in the notes): on this shared
2-core machine one window's figure moves by ±20 %.

For each segment an aggregator starts on the segment's empty topics; once it idles, the records are
sent as fast as the client can (a backlog builds, so the aggregator works in full batches) and the window
runs until every record is applied and archived, or dropped by the keep rule (its Prometheus counters).
Over the window, from ``/proc``: the CPU of the aggregator, of Redis and of PostgreSQL (process trees;
their idle background — the row maintenance, serverCron —, measured just before, is subtracted), Redis's
server-side script time (``INFO commandstats``: wall time around each script, so on a shared machine it
includes time Redis was descheduled) and, before and after, Redis's dataset (Σ ``MEMORY USAGE`` over the
keys) and the ``events`` table's size with its indexes (``pg_total_relation_size``).

Ingestion (CPU per event, streaming RPC) and prediction (CPU per PredictEta call, per restaurant of a
batch, Redis per call) come from the latest ``bench/results/ingestion.json`` and ``serving.json`` (their
own benchmarks; measured-at dates kept). Everything lands in ``bench/results/capacity.json``: ``figures``
holds the cost keys ``eta-capacity --costs`` reads.
"""

from __future__ import annotations

import asyncio
import json
import random
import shutil
import tempfile
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import redis.asyncio as aioredis
from aiokafka import AIOKafkaProducer

from bench.harness import load_average, tree_cpu_seconds
from bench.result import RESULTS_DIR, BenchResult
from devstack.infra import ChildProcess
from devstack.stack import LocalStack, ServicePorts
from devstack.synthetic import MIN, Sent, make_city, random_stream
from eta.v1 import events_pb2
from eta_common import features as F
from eta_common.config import KafkaSettings
from eta_common.kafka import Topics, ensure_topics, event_kind, record_key
from eta_common.online_store import OnlineStore
from eta_common.timeutil import now_ms, timestamp_from_ms

NAME = "capacity"
ROUNDS = 3  # every segment, fresh ids each time; the median round is reported (quick: 1)
# Records the aggregator consumed and dropped by the keep rule (0 before the rule is in its hot path).
_NOT_KEPT = ("eta_aggregator_records_total{", 'outcome="ping_not_kept"')
PING_INTERVAL_MS = 4_000
DriverType = events_pb2.DriverEvent
# Driver events that are not part of an order's lifecycle (the orders segment leaves them out).
_NOT_ORDER_EVENTS = {DriverType.LOCATION, DriverType.ONLINE, DriverType.OFFLINE}


def ping_stream(
    rng: random.Random,
    n_drivers: int,
    kept_per_driver: int,
    start_ms: int,
    *,
    kept: bool = True,
    prefix: str = "cap",
) -> list[Sent]:
    """Drivers pinging every 4 s from a random walk around a city centre: with ``kept`` their first event
    is ONLINE and the stream holds only the pings the keep rule (``features.ping_kept``) keeps, else only
    the ones it drops (``kept_per_driver`` × 6 of them, the drivers already online)."""
    centre = (52.52, 13.405)
    events: list[tuple[int, events_pb2.Event]] = []
    want = kept_per_driver if kept else kept_per_driver * 6
    for d in range(n_drivers):
        driver = f"{prefix}-d{d}"
        lat = centre[0] + rng.uniform(-0.05, 0.05)
        lng = centre[1] + rng.uniform(-0.08, 0.08)
        when = start_ms + rng.randrange(PING_INTERVAL_MS)
        if not kept:
            when += 10 * F.PING_KEEP_PERIOD_MS * kept_per_driver  # after the kept segment's pings
        n = 0
        while n <= want:
            when += PING_INTERVAL_MS
            lat += rng.uniform(-0.0004, 0.0004)  # up to ~45 m between pings
            lng += rng.uniform(-0.0006, 0.0006)
            first = kept and n == 0
            if not first and F.ping_kept(driver, when) != kept:
                continue
            event = events_pb2.Event(
                driver=events_pb2.DriverEvent(
                    event_id=f"{prefix}-ping-{int(kept)}-{d}-{n}",
                    event_time=timestamp_from_ms(when),
                    driver_id=driver,
                    type=DriverType.ONLINE if first else DriverType.LOCATION,
                    location=events_pb2.GeoPoint(lat=lat, lng=lng),
                )
            )
            events.append((when + rng.randrange(20, 800), event))
            n += 1
    events.sort(key=lambda item: item[0])
    return [Sent(event, ingest) for ingest, event in events]


def order_stream(
    rng: random.Random,
    n_restaurants: int,
    minutes: int,
    per_minute: int,
    start_ms: int,
    prefix: str = "cap-o",
) -> list[Sent]:
    """Order lifecycles (no pings, no driver sessions, no duplicates, nothing late)."""
    city = make_city(rng, prefix, (48.85, 2.35), n_restaurants=n_restaurants, n_drivers=n_restaurants * 3)
    stream = random_stream(
        rng, city, start_ms=start_ms, minutes=minutes, orders_per_minute=per_minute, late_fraction=0.0,
        duplicate_fraction=0.0,
    )  # fmt: skip
    return [
        s for s in stream if not (s.event.HasField("driver") and s.event.driver.type in _NOT_ORDER_EVENTS)
    ]


def restaurant_stream(n_restaurants: int, start_ms: int, prefix: str = "cap") -> list[Sent]:
    """One OPENED status per restaurant (with its location): the restaurant's base state."""
    out = []
    for i in range(n_restaurants):
        event = events_pb2.Event(
            kitchen=events_pb2.KitchenEvent(
                event_id=f"{prefix}-rst-{i}",
                event_time=timestamp_from_ms(start_ms + i),
                restaurant_id=f"{prefix}-r{i}",
                type=events_pb2.KitchenEvent.OPENED,
                restaurant_location=events_pb2.GeoPoint(lat=45.0 + i * 1e-5, lng=9.0),
            )
        )
        out.append(Sent(event, start_ms + i + 50))
    return out


def _records(settings: KafkaSettings, stream: list[Sent]) -> list[tuple[str, bytes, bytes]]:
    """(topic, key, value) of each record, serialised as ingestion would (envelope with the ingest time)."""
    topics = Topics.from_settings(settings)
    out = []
    for item in stream:
        kind = event_kind(item.event)
        assert kind is not None
        envelope = events_pb2.EventEnvelope(
            event=item.event, ingest_time=timestamp_from_ms(item.ingest_ms), ingested_by="bench"
        )
        out.append((topics.for_kind(kind), record_key(item.event), envelope.SerializeToString()))
    return out


async def _send_all(producer: AIOKafkaProducer, records: list[tuple[str, bytes, bytes]]) -> None:
    """Send as fast as the client queues (futures awaited at the end): a backlog builds up quickly."""
    futures = [await producer.send(topic, value, key=key) for topic, key, value in records]
    for future in futures:
        await future


async def _dataset_bytes(redis: aioredis.Redis) -> float:
    """Σ ``MEMORY USAGE`` (every element sampled) over all keys: the dataset, without client buffers."""
    total = 0
    batch: list[bytes] = []

    async def flush() -> int:
        pipe = redis.pipeline(transaction=False)
        for key in batch:
            pipe.memory_usage(key, samples=0)
        sizes = await pipe.execute()
        batch.clear()
        return sum(int(size or 0) for size in sizes)

    async for key in redis.scan_iter(count=1000):
        batch.append(key)
        if len(batch) >= 1000:
            total += await flush()
    if batch:
        total += await flush()
    return float(total)


def _counter(url: str, prefix: str, label: str = "") -> float:
    """Sum of the samples of a Prometheus counter whose line starts with ``prefix`` (and holds ``label``)."""
    with urllib.request.urlopen(url, timeout=5) as response:
        body = response.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in body.splitlines()
        if line.startswith(prefix) and label in line
    )


@dataclass
class Segment:
    name: str
    records: int
    seconds: float
    cpu_us: dict[str, float]  # per record: aggregator, redis (net), postgres (net)
    redis_script_us: float  # per record, server-side (EVALSHA usec)
    redis_bytes: float  # Redis dataset (Σ MEMORY USAGE) delta over the segment
    archive_bytes: float  # events table + indexes delta
    aggregator_core_pct: float  # the aggregator's share of a core over the window (≈100: CPU-bound)
    produce_seconds: float  # of the window, how long sending the records took
    not_kept: float  # records the aggregator dropped by the keep rule (features.ping_kept)

    def summary(self) -> dict[str, Any]:
        return {
            "segment": self.name,
            "records": self.records,
            "rec/s": self.records / self.seconds,
            "agg µs/rec": self.cpu_us["aggregator"],
            "redis µs/rec": self.cpu_us["redis"],
            "redis script µs/rec": self.redis_script_us,
            "pg µs/rec": self.cpu_us["postgres"],
            "archive B/row": self.archive_bytes / self.records,
            "redis B/rec": self.redis_bytes / self.records,
            "agg core %": self.aggregator_core_pct,
            "produce s": self.produce_seconds,
            "window s": self.seconds,
        }


async def _reset_online_store(redis_url: str) -> None:
    """Empty Redis between rounds (marked initialized, as after a rebuild of nothing): every round starts
    from the state the first did. Otherwise the background work of the row maintenance (the supply refresh
    counts every restaurant each period) grows with the restaurants earlier rounds left, and bursts of it
    land unevenly in the idle measurement and the window."""
    store = OnlineStore.from_url(redis_url)
    try:
        await store.client.flushall()
        token = await store.begin_rebuild()
        await store.finish_rebuild(token, now_ms=now_ms())
    finally:
        await store.close()


def _aggregator_us(segment: Segment) -> float:
    return segment.cpu_us["aggregator"]


async def _script_usec(redis: aioredis.Redis) -> float:
    stats = await redis.info("commandstats")
    return float(stats.get("cmdstat_evalsha", {}).get("usec", 0))


async def _archive_bytes(database_url: str) -> float:
    conn = await asyncpg.connect(database_url)
    try:
        exists = await conn.fetchval("SELECT to_regclass('events') IS NOT NULL")
        return float(await conn.fetchval("SELECT pg_total_relation_size('events')")) if exists else 0.0
    finally:
        await conn.close()


async def _segment(stack: LocalStack, name: str, stream: list[Sent]) -> Segment:
    """Start an aggregator on the segment's (empty) topics, measure everyone's idle CPU, then produce the
    segment as fast as the client sends (a backlog builds: the aggregator works in full batches) and
    wait until every record is applied and archived."""
    settings = KafkaSettings(bootstrap_servers=stack.kafka, topic_prefix=f"cap-{name}.")
    await ensure_topics(settings)
    child: ChildProcess = await asyncio.to_thread(
        stack.start_service,
        "aggregator",
        extra_env={
            "KAFKA_TOPIC_PREFIX": settings.topic_prefix,
            "AGGREGATOR_GROUP_ID": f"cap-{name}",
            "OTEL_TRACES_SAMPLER": "always_off",
        },
        instance=f"cap-{name}",
    )
    url = f"http://127.0.0.1:{child.extra['metrics_port']}/metrics"
    redis_proc = next(p for p in stack.processes if p.name == "redis")
    pg_proc = next(p for p in stack.processes if p.name == "postgres")
    watched = {"aggregator": child.proc.pid, "redis": redis_proc.proc.pid, "postgres": pg_proc.proc.pid}
    redis = aioredis.Redis.from_url(stack.redis_url)
    total = len(stream)
    records = _records(settings, stream)
    producer = AIOKafkaProducer(bootstrap_servers=stack.kafka, acks="all", linger_ms=5)
    await producer.start()
    try:
        await asyncio.sleep(3.0)  # group join, first row-maintenance ticks
        # idle background (row maintenance, serverCron, autovacuum…), subtracted from the window below
        idle_before = {k: tree_cpu_seconds(v) for k, v in watched.items()}
        idle_started = time.perf_counter()
        await asyncio.sleep(3.0)
        idle_seconds = time.perf_counter() - idle_started
        idle_rate = {k: (tree_cpu_seconds(v) - idle_before[k]) / idle_seconds for k, v in watched.items()}
        memory_start = await _dataset_bytes(redis)
        script_start = await _script_usec(redis)
        archive_before = await _archive_bytes(stack.database_url)
        cpu_start = {k: tree_cpu_seconds(v) for k, v in watched.items()}
        started = time.perf_counter()
        await _send_all(producer, records)
        produce_seconds = time.perf_counter() - started
        while True:
            consumed = await asyncio.to_thread(_counter, url, "eta_aggregator_records_total{")
            if consumed >= total:
                # every record is archived but the pings the keep rule drops (once the aggregator applies it)
                dropped = await asyncio.to_thread(_counter, url, *_NOT_KEPT)
                archived = await asyncio.to_thread(_counter, url, "eta_aggregator_archived_events_total ")
                if archived >= total - dropped:
                    break
            await asyncio.sleep(0.25)  # scraping costs the aggregator CPU: poll gently
        seconds = time.perf_counter() - started
        cpu_end = {k: tree_cpu_seconds(v) for k, v in watched.items()}
        script_end = await _script_usec(redis)
    finally:
        await producer.stop()
        await asyncio.to_thread(child.stop)
    await asyncio.sleep(1.0)  # the last row-maintenance writes land before memory is read
    memory_end = await _dataset_bytes(redis)
    await redis.aclose()
    archive_after = await _archive_bytes(stack.database_url)
    used = {k: cpu_end[k] - cpu_start[k] - idle_rate[k] * seconds for k in cpu_end}
    return Segment(
        name=name,
        records=total,
        seconds=seconds,
        cpu_us={k: max(0.0, v) / total * 1e6 for k, v in used.items()},
        redis_script_us=(script_end - script_start) / total,
        redis_bytes=memory_end - memory_start,
        archive_bytes=archive_after - archive_before,
        aggregator_core_pct=100.0 * (cpu_end["aggregator"] - cpu_start["aggregator"]) / seconds,
        produce_seconds=produce_seconds,
        not_kept=dropped,
    )


def _dropped_ping_cost() -> tuple[float, str]:
    """CPU µs the aggregator would spend on a ping the keep rule (``features.ping_kept``) drops: the
    consume loop's share per record (``bench_aggregator``'s bare aiokafka loop, consumer + broker) plus
    parsing the envelope, reading its facts and the rule (timed here). An estimate until the rule runs
    in the aggregator's hot path, where the pings segment will measure it."""
    from eta_common.event_facts import event_facts

    event = ping_stream(random.Random(0), 1, 1, now_ms())[-1].event  # a LOCATION ping
    raw = events_pb2.EventEnvelope(event=event, ingest_time=event.driver.event_time).SerializeToString()
    parse = events_pb2.EventEnvelope.FromString

    def one() -> None:
        facts = event_facts(parse(raw).event)
        assert facts is not None
        assert facts.driver_id is not None
        F.ping_kept(facts.driver_id, facts.event_ms)

    n = 50_000
    started = time.process_time()
    for _ in range(n):
        one()
    decode_us = (time.process_time() - started) / n * 1e6
    aggregator = _sibling("aggregator")
    consume_us = float((aggregator or {}).get("figures", {}).get("bare_cpu_us_per_record", 3.5))
    return consume_us + decode_us, (
        f"aggregator_cpu_us_per_dropped_ping: estimate = consume loop {consume_us:.1f} µs/record "
        f"(bench_aggregator's bare loop) + parse, facts and keep rule {decode_us:.1f} µs (timed here)"
    )


def _sibling(name: str) -> dict[str, Any] | None:
    path = RESULTS_DIR / f"{name}.json"
    if not path.exists():
        return None
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def _ingestion_costs() -> tuple[dict[str, float], str]:
    data = _sibling("ingestion")
    if data is None:
        return {}, "ingestion: no bench/results/ingestion.json (run `python -m bench ingestion`)"
    out: dict[str, float] = {}
    for row in data["rows"]:
        rate, cpu = row.get("events/s (median)"), row.get("process CPU %")
        if not rate or cpu is None:
            continue
        if str(row.get("path", "")).startswith("streaming"):
            out["ingestion_cpu_us_per_event"] = cpu / 100 / rate * 1e6
        elif str(row.get("path", "")).startswith("batch"):
            out["ingestion_batch_cpu_us_per_event"] = cpu / 100 / rate * 1e6
    return out, f"ingestion: from bench/results/ingestion.json measured {data.get('measured_at')}"


def _serving_costs() -> tuple[dict[str, float], str]:
    """Prediction costs for sizing a busy fleet: back-to-back figures (replicas run near their target
    utilisation), and — where the run measured them — those of the server with the client-side cache off:
    at platform scale every replica misses once per row version (the supply refresh alone rewrites every
    row each 5 s), so the bench's hit share (one server, 200 restaurants) is not assumed."""
    data = _sibling("serving")
    if data is None:
        return {}, "prediction: no bench/results/serving.json (run `python -m bench serving`)"
    f = data["figures"]
    out: dict[str, float] = {}
    single = f.get("nocache_server_cpu_us_per_call") or f.get("eta_server_cpu_us_per_call")
    if single:
        out["prediction_cpu_us_per_call"] = single
    batch_ms = (
        f.get("nocache_batch50_server_cpu_ms_at_max")
        or f.get("batch50_server_cpu_ms_at_max")
        or f.get("batch50_server_cpu_ms")
    )
    if single and batch_ms:
        # a batch of 50 = one call's fixed cost + 50 restaurants' share
        out["prediction_cpu_us_per_batch_restaurant"] = max(0.0, (batch_ms * 1000 - single) / 50)
    redis_single = f.get("nocache_redis_cpu_us_per_prediction") or f.get("redis_cpu_us_per_prediction")
    if redis_single:
        out["redis_cpu_us_per_prediction"] = redis_single
    redis_batch = f.get("nocache_batch50_redis_cpu_us") or f.get("batch50_redis_cpu_us")
    if redis_batch:
        out["redis_cpu_us_per_batch_restaurant"] = redis_batch / 50
    return out, (
        f"prediction: from bench/results/serving.json measured {data.get('measured_at')} (back to back, "
        "client-side cache off where measured: every read a miss)"
    )


async def _run(quick: bool) -> BenchResult:
    load_start = load_average()
    workdir = Path(tempfile.mkdtemp(prefix="bench-capacity-"))
    stack = LocalStack(
        workdir,
        ports=ServicePorts.free(),
        use_env_endpoints=False,
        extra_env={"LOG_FORMAT": "json", "LOG_LEVEL": "WARNING"},
    )
    rng = random.Random(14)
    start_ms = now_ms() - 90 * MIN
    n_drivers, kept_per_driver = (500, 10) if quick else (4000, 15)
    n_rest, minutes, per_minute = (100, 20, 50) if quick else (600, 60, 200)
    n_restaurants = 1_000 if quick else 10_000
    rounds = 1 if quick else ROUNDS

    def streams(r: int) -> list[tuple[str, list[Sent]]]:
        """Round ``r``'s segments, with ids of their own (a round must not replay an earlier one)."""
        tag = f"cap{r}" if r else "cap"
        pings = ping_stream(rng, n_drivers, kept_per_driver, start_ms, prefix=tag)
        not_kept = ping_stream(rng, n_drivers, kept_per_driver, start_ms, kept=False, prefix=tag)
        return [
            ("pings", pings),
            ("pings_not_kept", not_kept),
            ("orders", order_stream(rng, n_rest, minutes, per_minute, start_ms, prefix=f"{tag}-o")),
            ("restaurants", restaurant_stream(n_restaurants, start_ms, prefix=tag)),
        ]

    runs: dict[str, list[Segment]] = {}
    orders: list[Sent] = []
    try:
        await asyncio.to_thread(stack.start_infra)
        for round_ in range(rounds):
            if round_:
                await _reset_online_store(stack.redis_url)
            for name, stream in streams(round_):
                if name == "orders" and not orders:
                    orders = stream
                segment = await _segment(stack, f"{name}-{round_}" if round_ else name, stream)
                runs.setdefault(name, []).append(segment)
    finally:
        await asyncio.to_thread(stack.stop)
        shutil.rmtree(workdir, ignore_errors=True)
    # per segment, the round with the median aggregator CPU per record (its other figures come with it)
    segments = {
        name: sorted(found, key=lambda s: s.cpu_us["aggregator"])[len(found) // 2]
        for name, found in runs.items()
    }
    n_orders = sum(
        1 for s in orders if s.event.HasField("order") and s.event.order.type == events_pb2.OrderEvent.PLACED
    )
    kinds = Counter(str(s.event.WhichOneof("payload")) for s in orders)
    p, o, r = segments["pings"], segments["orders"], segments["restaurants"]
    events_per_order = len(orders) / n_orders
    figures: dict[str, float] = {
        "aggregator_cpu_us_per_ping": p.cpu_us["aggregator"],
        "aggregator_cpu_us_per_order_event": o.cpu_us["aggregator"],
        "redis_cpu_us_per_ping": p.cpu_us["redis"],
        "redis_cpu_us_per_order_event": o.cpu_us["redis"],
        "redis_script_us_per_ping": p.redis_script_us,
        "redis_script_us_per_order_event": o.redis_script_us,
        "postgres_cpu_us_per_ping_row": p.cpu_us["postgres"],
        "postgres_cpu_us_per_order_event_row": o.cpu_us["postgres"],
        "archive_bytes_per_ping_row": p.archive_bytes / p.records,
        "archive_bytes_per_order_event_row": o.archive_bytes / o.records,
        "order_events_per_order": events_per_order,
        "redis_bytes_per_driver": p.redis_bytes / n_drivers,
        "redis_bytes_per_order": o.redis_bytes / n_orders,
        "redis_bytes_per_restaurant": r.redis_bytes / r.records,
        "aggregator_records_per_s_pings": p.records / p.seconds,
        "aggregator_records_per_s_orders": o.records / o.seconds,
    }
    notes = [
        f"{rounds} round(s) of every segment, each with ids of its own; per segment the round with the "
        "median aggregator CPU per record is reported (all rounds: "
        + "; ".join(
            f"{name} " + ", ".join(f"{_aggregator_us(s):.1f}" for s in found) for name, found in runs.items()
        )
        + " µs/record)",
        f"load average at start {load_start}, at end {load_average()} (2 cores shared with other work: "
        "per-unit CPU figures move by ±20 % between runs)",
        "agg core %: the aggregator's share of one core over the window; well under 100 means it waited "
        "(on Redis, PostgreSQL or other work on the machine), so its µs/record is still its own CPU",
        f"orders segment: {len(orders)} records for {n_orders} orders ({dict(kinds)}); "
        "redis_bytes_per_order holds every order's state (window entries, per-order hash, dispatch sets) "
        "as written, before any of it expires: an upper bound per order retained",
        "redis_bytes_per_restaurant: a restaurant's base state (meta hash, ready row, due-bucket entry)",
    ]
    d = segments["pings_not_kept"]
    if d.not_kept >= d.records:  # the aggregator applies the keep rule: measured
        figures["aggregator_cpu_us_per_dropped_ping"] = d.cpu_us["aggregator"]
        notes.append("aggregator_cpu_us_per_dropped_ping: measured (pings_not_kept segment)")
    else:
        dropped, dropped_note = _dropped_ping_cost()
        figures["aggregator_cpu_us_per_dropped_ping"] = dropped
        notes.append(
            f"{dropped_note}; the pings_not_kept segment was applied and archived ({d.not_kept:.0f} of "
            f"{d.records} dropped): this aggregator does not apply the keep rule yet"
        )
    for costs, note in (_ingestion_costs(), _serving_costs()):
        figures.update(costs)
        notes.append(note)
    return BenchResult(
        name=NAME,
        baseline="none: per-unit costs for docs/capacity.md and eta-capacity",
        rows=[s.summary() for s in segments.values()],
        figures=figures,
        notes=notes,
        extra={
            "segments": {name: s.__dict__ for name, s in segments.items()},
            "rounds": {name: [s.__dict__ for s in found] for name, found in runs.items()},
            "n_drivers": n_drivers,
        },
    )


def run(quick: bool = False) -> BenchResult:
    return asyncio.run(_run(quick))
