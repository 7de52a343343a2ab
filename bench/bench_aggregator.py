"""Aggregator throughput versus a bare aiokafka consume loop over the same topics, and ingest-ack →
feature-visible latency at about 1k events/s through the real ingestion API.

Setup (all real, on this machine): Tansu broker, Redis, PostgreSQL; one aggregator process (tracing off).
1. N events (mixed orders / kitchen / drivers, ~3% duplicates) are produced to the topics first.
2. Baseline: a bare aiokafka consumer (own group) reads all N records, decoding nothing. For context, the
   same loop again parsing each record's protobuf envelope (the least any consumer of these topics does).
3. Aggregator: a fresh consumer group processes the same N records; records/s from its Prometheus
   counters (Redis-applied) and until every event is archived in PostgreSQL.
4. Where the time goes, per record: the CPU of each process (aggregator, Redis, PostgreSQL, broker;
   from ``/proc``), Redis' server-side script time (``INFO commandstats``: what any client would pay
   for these updates: its inverse is a ceiling no client-side optimisation can lift) and the archive's
   wall time per row
   (``eta_aggregator_batch_seconds{stage="postgres"}``: the INSERT, plus waits for the shared event loop).
5. Latency: events sent through ``PublishEvents`` at ~1k/s (batches of 10 every 10 ms); latency is the
   aggregator's recorded Redis apply time (``events.applied_at``) minus the client's ack time.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import grpc
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer

from bench.result import BenchResult
from devstack.stack import LocalStack, ServicePorts
from devstack.synthetic import make_city, produce, random_stream, unique_count
from eta.v1 import events_pb2, ingestion_pb2, ingestion_pb2_grpc
from eta_common.config import KafkaSettings
from eta_common.kafka import Topics, ensure_topics
from eta_common.timeutil import now_ms, timestamp_from_ms

NAME = "aggregator"
MIN = 60_000


def _group_cpu_seconds(leader: int) -> float:
    """User + system CPU seconds of a server we started: every live process in its process group, plus
    its direct children (PostgreSQL's backends leave the postmaster's group with setsid())."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process exited meanwhile
            continue
        # fields after "pid (comm)": state ppid pgrp … utime(11) stime(12)
        if int(fields[2]) == leader or int(fields[1]) == leader:
            total += int(fields[11]) + int(fields[12])
    return total / tick


class CpuMeter:
    """CPU seconds used by the stack's servers (and this process) between two readings."""

    def __init__(self, stack: LocalStack) -> None:
        self._groups = {child.name: child.proc.pid for child in stack.processes}

    def read(self) -> dict[str, float]:
        out = {name: _group_cpu_seconds(pgid) for name, pgid in self._groups.items()}
        out["bench client"] = time.process_time()
        return out

    @staticmethod
    def per_record_us(before: dict[str, float], after: dict[str, float], records: float) -> dict[str, float]:
        return {name: (after[name] - before.get(name, 0.0)) / records * 1e6 for name in after}


def _counter(url: str, prefix: str) -> float:
    with urllib.request.urlopen(url, timeout=5) as response:
        body = response.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in body.splitlines() if line.startswith(prefix))


async def _bare_consume(
    settings: KafkaSettings, total: int, meter: CpuMeter, *, parse: bool = False
) -> tuple[float, dict[str, float]]:
    """Records/s of a bare consume loop, and the CPU µs per record it and the broker used."""
    consumer = AIOKafkaConsumer(
        *Topics.from_settings(settings).all(),
        bootstrap_servers=settings.bootstrap_servers,
        group_id=f"bare-{random.random()}",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    try:
        seen = first = 0
        started = 0.0
        cpu_start: dict[str, float] = {}
        while seen < total:
            batches = await consumer.getmany(timeout_ms=200, max_records=500)
            got = sum(len(records) for records in batches.values())
            if parse:
                for records in batches.values():
                    for record in records:
                        events_pb2.EventEnvelope.FromString(record.value)
            if got and not started:  # the clock starts once data flows (group join excluded)
                started, first = time.perf_counter(), got
                cpu_start = meter.read()
            seen += got
        elapsed = time.perf_counter() - started
        return (total - first) / elapsed, CpuMeter.per_record_us(cpu_start, meter.read(), total - first)
    finally:
        await consumer.stop()


@dataclass
class AggregatorRun:
    online_rate: float
    archived_rate: float
    redis_us_per_record: float
    postgres_us_per_record: float
    # CPU µs per record of each process (aggregator, redis, postgres, broker) over the run
    cpu_us: dict[str, float]


async def _aggregator_rate(stack: LocalStack, total_records: int, unique: int) -> AggregatorRun:
    child = stack.start_service(
        "aggregator", extra_env={"AGGREGATOR_GROUP_ID": "bench-agg", "OTEL_TRACES_SAMPLER": "always_off"}
    )
    url = f"http://127.0.0.1:{child.extra['metrics_port']}/metrics"
    redis = aioredis.Redis.from_url(stack.redis_url)
    prefix = "eta_aggregator_records_total{"
    started = None
    while True:
        done = await asyncio.to_thread(_counter, url, prefix)
        if done and started is None:
            started = (time.perf_counter(), done)
            redis_start = await _evalsha_usec(redis)
            meter = CpuMeter(stack)
            meter_start = meter.read()
        if done >= total_records:
            break
        # Scraping /metrics costs the aggregator CPU: poll gently (the stream runs for several seconds).
        await asyncio.sleep(0.25)
    assert started is not None
    online_rate = (done - started[1]) / max(time.perf_counter() - started[0], 1e-9)
    conn = await asyncpg.connect(stack.database_url)
    try:
        archived = 0
        while archived < unique:  # polling PostgreSQL: there is no event to wait on
            archived = await conn.fetchval("SELECT count(*) FROM events")
            await asyncio.sleep(0.1)
    finally:
        await conn.close()
    archived_rate = (unique - started[1]) / max(time.perf_counter() - started[0], 1e-9)
    meter_end = meter.read()
    redis_usec = await _evalsha_usec(redis) - redis_start
    await redis.aclose()
    postgres_s = await asyncio.to_thread(_counter, url, 'eta_aggregator_batch_seconds_sum{stage="postgres"}')
    records = total_records - started[1]
    return AggregatorRun(
        online_rate,
        archived_rate,
        redis_usec / records,
        postgres_s / unique * 1e6,
        CpuMeter.per_record_us(meter_start, meter_end, records),
    )


async def _evalsha_usec(redis: aioredis.Redis) -> float:
    stats = await redis.info("commandstats")
    return float(stats.get("cmdstat_evalsha", {}).get("usec", 0))


async def _latency(stack: LocalStack, seconds: float, rate: int) -> tuple[list[float], int]:
    stack.start_service("ingestion", extra_env={"OTEL_TRACES_SAMPLER": "always_off"})
    acks: dict[str, int] = {}
    loc = events_pb2.GeoPoint(lat=52.5, lng=13.4)
    async with grpc.aio.insecure_channel(stack.target("ingestion")) as channel:
        stub = ingestion_pb2_grpc.IngestionServiceStub(channel)
        batch, interval = 10, 10 / rate
        n = 0
        deadline = time.perf_counter() + seconds
        next_at = time.perf_counter()
        pending: set[asyncio.Task[None]] = set()

        async def send(events: list[events_pb2.Event]) -> None:
            reply = await stub.PublishEvents(ingestion_pb2.PublishEventsRequest(events=events), timeout=10)
            ack = now_ms()
            for result in reply.results:
                if result.status == ingestion_pb2.EventResult.ACCEPTED:
                    acks[result.event_id] = ack

        while time.perf_counter() < deadline:
            events = []
            for _ in range(batch):
                n += 1
                events.append(
                    events_pb2.Event(
                        order=events_pb2.OrderEvent(
                            event_id=f"lat-{n}",
                            event_time=timestamp_from_ms(now_ms()),
                            order_id=f"lat-o{n}",
                            restaurant_id=f"lat-r{n % 50}",
                            customer_id="c",
                            type=events_pb2.OrderEvent.PLACED,
                            restaurant_location=loc,
                            customer_location=loc,
                        )
                    )
                )
            task = asyncio.create_task(send(events))
            pending.add(task)
            task.add_done_callback(pending.discard)
            next_at += interval
            await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
        await asyncio.gather(*pending)
    conn = await asyncpg.connect(stack.database_url)
    try:
        for _ in range(200):
            rows = await conn.fetch(
                "SELECT event_id, (extract(epoch FROM applied_at) * 1000)::bigint AS applied FROM events "
                "WHERE event_id LIKE 'lat-%' AND applied_at IS NOT NULL"
            )
            if len(rows) >= len(acks):
                break
            await asyncio.sleep(0.1)
    finally:
        await conn.close()
    latencies = sorted(float(r["applied"] - acks[r["event_id"]]) for r in rows if r["event_id"] in acks)
    return latencies, len(acks)


def _row(what: str, records: int, value: float, unit: str) -> dict[str, object]:
    return {"what": what, "records": records, "value": value, "unit": unit}


def _pct(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


async def _run(quick: bool) -> BenchResult:
    workdir = Path(tempfile.mkdtemp(prefix="bench-agg-"))
    stack = LocalStack(
        workdir,
        ports=ServicePorts.free(),
        use_env_endpoints=False,
        extra_env={"LOG_FORMAT": "json", "LOG_LEVEL": "WARNING"},
    )
    try:
        await asyncio.to_thread(stack.start_infra)
        settings = KafkaSettings(bootstrap_servers=stack.kafka)
        await ensure_topics(settings)
        rng = random.Random(1)
        city = make_city(rng, "bench", (52.52, 13.405), n_restaurants=30, n_drivers=100)
        minutes = 60 if quick else 480
        stream = random_stream(
            rng, city, start_ms=now_ms() - (minutes + 5) * MIN, minutes=minutes, orders_per_minute=40
        )
        await produce(settings, stream)
        meter = CpuMeter(stack)
        bare, bare_cpu = await _bare_consume(settings, len(stream), meter)
        parsing, _ = await _bare_consume(settings, len(stream), meter, parse=True)
        agg = await _aggregator_rate(stack, len(stream), unique_count(stream))
        latencies, sent = await _latency(stack, 5.0 if quick else 20.0, 1000)
    finally:
        await asyncio.to_thread(stack.stop)
        shutil.rmtree(workdir, ignore_errors=True)
    p50, p99 = _pct(latencies, 0.5), _pct(latencies, 0.99)
    n, unique = len(stream), unique_count(stream)
    cores = os.cpu_count() or 1
    pipeline = {name: us for name, us in agg.cpu_us.items() if name != "bench client"}
    pipeline_cpu, bare_cpu_total = sum(pipeline.values()), sum(bare_cpu.values())
    cpu_rows = [_row(f"  CPU: {name}", n, us, "us/rec") for name, us in sorted(pipeline.items())]
    return BenchResult(
        name=NAME,
        baseline="bare aiokafka consume loop (no decoding) over the same records, same run",
        rows=[
            _row("bare aiokafka consume loop (baseline)", n, bare, "rec/s"),
            _row("  CPU: consumer + broker", n, bare_cpu_total, "us/rec"),
            _row("bare loop + protobuf parse (context)", n, parsing, "rec/s"),
            _row("aggregator, applied to Redis", n, agg.online_rate, "rec/s"),
            _row("aggregator, archived in PostgreSQL", unique, agg.archived_rate, "rec/s"),
            *cpu_rows,
            _row("  CPU: whole pipeline", n, pipeline_cpu, "us/rec"),
            _row(f"  ceiling on {cores} cores (cores / CPU)", n, cores * 1e6 / pipeline_cpu, "rec/s"),
            _row("  Redis server-side script time", n, agg.redis_us_per_record, "us/rec"),
            _row("  archive batch time (wall)", unique, agg.postgres_us_per_record, "us/rec"),
            _row("ingest ack -> visible in Redis p50", len(latencies), p50, "ms"),
            _row("ingest ack -> visible in Redis p99", len(latencies), p99, "ms"),
        ],
        figures={
            "bare_consume_records_per_s": bare,
            "bare_consume_parse_records_per_s": parsing,
            "aggregator_records_per_s": agg.online_rate,
            "aggregator_archived_per_s": agg.archived_rate,
            "ratio_vs_bare": agg.online_rate / bare,
            "archived_ratio_vs_bare": agg.archived_rate / bare,
            "bare_cpu_us_per_record": bare_cpu_total,
            "pipeline_cpu_us_per_record": pipeline_cpu,
            **{f"cpu_us_per_record_{name}": us for name, us in pipeline.items()},
            "pipeline_ceiling_records_per_s": cores * 1e6 / pipeline_cpu,
            "redis_script_us_per_record": agg.redis_us_per_record,
            "redis_ceiling_records_per_s": 1e6 / agg.redis_us_per_record,
            "archive_wall_us_per_record": agg.postgres_us_per_record,
            "ack_to_visible_p50_ms": p50,
            "ack_to_visible_p99_ms": p99,
            "latency_events": float(len(latencies)),
            "latency_events_sent": float(sent),
        },
        notes=[
            "targets: ratio >= 0.5, ack-to-visible p99 <= 100 ms at ~1k events/s",
            "CPU rows: user+system CPU of each server's process group per record over the run (/proc)",
            "ceilings: the machine cannot run the pipeline faster than cores / its CPU per record, nor Redis"
            " faster than 1 / its script time, whatever the client does",
        ],
    )


def run(quick: bool = False) -> BenchResult:
    return asyncio.run(_run(quick))
