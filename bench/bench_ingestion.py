"""Ingestion throughput (batch RPC and streaming RPC) versus a bare aiokafka producer, in one run.

Setup (all real): the Tansu broker and Redis from wheels; one ``eta-ingestion`` process with its default
settings and the production trace sampling of the Helm chart (``parentbased_traceidratio`` at 5 %).

Payloads: a mix like a city's (60 % driver location pings, 25 % order events, 15 % kitchen events), every
event valid and with a fresh event_id (so each one is validated, deduplicated in Redis, published and
acknowledged, none short-cut as a duplicate).

Measured, each phase on fresh topics (its own topic prefix) with the same number of events:
1. batch RPC: ``CLIENTS`` concurrent clients, each calling PublishEvents with ``BATCH`` events, one call
   at a time; events/s = ACCEPTED events / wall time;
2. streaming RPC: ``STREAMS`` concurrent StreamEvents streams of ``BATCH``-event chunks, each client
   keeping up to 8 chunks unanswered (the server's default window);
3. baseline: a bare ``AIOKafkaProducer`` (the very producer configuration ingestion uses:
   ``eta_common.kafka.make_producer``, acks=all) in its own process, sending the same EventEnvelope bytes
   with the same keys to the same kind of topics, and awaiting every acknowledgement.

CPU layout (this machine has 2 cores): the process under test — ingestion, or the bare producer — is
pinned to core 0 and alone there; the load generator, the broker and Redis share core 1. The server's
CPU use during each phase is reported, so a client-bound run would show (server < ~95 %).

Role used internally: ``python -m bench.bench_ingestion bare <bootstrap> <prefix> <payload file>``.
"""

from __future__ import annotations

import asyncio
import json
import os
import pickle
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.result import BenchResult
from devstack.infra import ChildProcess, free_port, start_broker, start_redis, wait_for_port
from eta.v1 import events_pb2, ingestion_pb2
from eta_common.config import KafkaSettings
from eta_common.kafka import Topics, ensure_topics, event_kind, make_producer, record_key
from eta_common.timeutil import now_ms, timestamp_from_ms
from ingestion.publisher import envelope_bytes, envelope_suffix

NAME = "ingestion"
BATCH = 100
CLIENTS = 8
STREAMS = 4
STREAM_WINDOW = 8
WARMUP_EVENTS = 3_000
PUBLISH = "/eta.v1.IngestionService/PublishEvents"
STREAM = "/eta.v1.IngestionService/StreamEvents"
SERVER_CORE, OTHER_CORE = 0, 1
Kind = str
Payload = tuple[Kind, bytes, bytes]  # (event kind, record key, EventEnvelope bytes)


# ------------------------------------------------------------------------------------------ events ---


def city_events(count: int, *, seed: int, tag: str) -> list[events_pb2.Event]:
    """Valid events with fresh ids: 60 % driver pings, 25 % order events, 15 % kitchen events."""
    rng = random.Random(seed)
    now = now_ms()
    out: list[events_pb2.Event] = []
    for i in range(count):
        at = timestamp_from_ms(now - rng.randrange(0, 60_000))
        here = events_pb2.GeoPoint(lat=52.52 + rng.uniform(-0.05, 0.05), lng=13.40 + rng.uniform(-0.08, 0.08))
        event_id = f"{tag}-{i:08d}"
        roll = rng.random()
        if roll < 0.60:
            out.append(
                events_pb2.Event(
                    driver=events_pb2.DriverEvent(
                        event_id=event_id,
                        event_time=at,
                        driver_id=f"drv-{rng.randrange(2000):04d}",
                        type=events_pb2.DriverEvent.LOCATION,
                        location=here,
                    )
                )
            )
        elif roll < 0.85:
            out.append(
                events_pb2.Event(
                    order=events_pb2.OrderEvent(
                        event_id=event_id,
                        event_time=at,
                        order_id=f"ord-{tag}-{i:08d}",
                        restaurant_id=f"rest-{rng.randrange(400):03d}",
                        customer_id=f"cust-{rng.randrange(100_000):06d}",
                        type=events_pb2.OrderEvent.PLACED,
                        restaurant_location=here,
                        customer_location=events_pb2.GeoPoint(lat=here.lat + 0.01, lng=here.lng - 0.01),
                    )
                )
            )
        else:
            out.append(
                events_pb2.Event(
                    kitchen=events_pb2.KitchenEvent(
                        event_id=event_id,
                        event_time=at,
                        restaurant_id=f"rest-{rng.randrange(400):03d}",
                        type=events_pb2.KitchenEvent.ORDER_ACCEPTED,
                        order_id=f"ord-{tag}-{i:08d}",
                    )
                )
            )
    return out


def requests_of(events: Sequence[events_pb2.Event]) -> list[bytes]:
    return [
        ingestion_pb2.PublishEventsRequest(
            events=events[i : i + BATCH], sequence=i // BATCH
        ).SerializeToString()
        for i in range(0, len(events), BATCH)
    ]


def payloads_of(events: Sequence[events_pb2.Event]) -> list[Payload]:
    """What ingestion would write for these events: the same envelope bytes, keys and topics."""
    suffix = envelope_suffix(timestamp_from_ms(now_ms()), "bench")
    out: list[Payload] = []
    for event in events:
        kind = event_kind(event)
        assert kind is not None
        out.append((kind, record_key(event), envelope_bytes(event.SerializeToString(), suffix)))
    return out


# --------------------------------------------------------------------------------- process control ---


def _pin(pid: int, core: int) -> None:
    """Pin every thread of ``pid`` (threads started later inherit the mask)."""
    if (os.cpu_count() or 1) < 2:
        return
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            os.sched_setaffinity(int(task.name), {core})
        except (ProcessLookupError, PermissionError):
            continue


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Infra:
    workdir: Path
    broker: ChildProcess
    redis: ChildProcess

    def stop(self) -> None:
        for child in (self.redis, self.broker):
            child.stop()


def start_infra(workdir: Path) -> Infra:
    broker = start_broker(workdir / "logs")
    redis = start_redis(workdir / "redis", workdir / "logs")
    for child in (broker, redis):
        _pin(child.proc.pid, OTHER_CORE)
    return Infra(workdir, broker, redis)


def start_ingestion(infra: Infra, prefix: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = dict(os.environ)
    env.update(
        {
            "KAFKA_BOOTSTRAP_SERVERS": infra.broker.url,
            "KAFKA_TOPIC_PREFIX": prefix,
            "REDIS_URL": infra.redis.url,
            "GRPC_PORT": str(port),
            "METRICS_PORT": "0",
            "LOG_LEVEL": "WARNING",
            "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
            "OTEL_TRACES_SAMPLER_ARG": "0.05",
            "SHUTDOWN_GRACE_SECONDS": "1",
        }
    )
    log = open(infra.workdir / "logs" / f"ingestion-{prefix.strip('.')}.log", "ab")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "ingestion"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    log.close()
    _pin(proc.pid, SERVER_CORE)  # at once, before it starts threads (they inherit the mask)
    wait_for_port(port, timeout=60, proc=proc, what="eta-ingestion")
    return proc, f"127.0.0.1:{port}"


async def _serving(target: str) -> None:
    async with grpc.aio.insecure_channel(target) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


# ---------------------------------------------------------------------------------- load generator ---


async def batch_load(target: str, requests: list[bytes], clients: int) -> int:
    """``clients`` concurrent callers, one PublishEvents at a time each; returns the ACCEPTED count."""

    async def client(share: list[bytes]) -> int:
        async with grpc.aio.insecure_channel(target) as channel:
            call = channel.unary_unary(
                PUBLISH, response_deserializer=ingestion_pb2.PublishEventsResponse.FromString
            )
            accepted = 0
            for raw in share:
                accepted += (await call(raw, timeout=60)).accepted
            return accepted

    return sum(await asyncio.gather(*(client(requests[i::clients]) for i in range(clients))))


async def stream_load(target: str, requests: list[bytes], streams: int) -> int:
    """``streams`` concurrent StreamEvents streams, each with up to STREAM_WINDOW chunks unanswered."""

    async def client(share: list[bytes]) -> int:
        async with grpc.aio.insecure_channel(target) as channel:
            call = channel.stream_stream(
                STREAM, response_deserializer=ingestion_pb2.PublishEventsResponse.FromString
            )(timeout=600)
            window = asyncio.Semaphore(STREAM_WINDOW)

            async def write() -> None:
                for raw in share:
                    await window.acquire()
                    await call.write(raw)
                await call.done_writing()

            writer = asyncio.create_task(write())
            accepted = 0
            while (answer := await call.read()) != grpc.aio.EOF:
                accepted += answer.accepted
                window.release()
            await writer
            return accepted

    return sum(await asyncio.gather(*(client(requests[i::streams]) for i in range(streams))))


@dataclass
class Phase:
    name: str
    events: int  # acknowledged (ACCEPTED) events
    seconds: float
    server_cpu: float
    not_accepted: int = 0

    @property
    def events_per_s(self) -> float:
        return self.events / self.seconds


async def measure_rpc(infra: Infra, target: str, pid: int, count: int, seed: int, streaming: bool) -> Phase:
    name = "streaming RPC" if streaming else "batch RPC"
    load = stream_load if streaming else batch_load
    clients = STREAMS if streaming else CLIENTS
    warm = requests_of(city_events(WARMUP_EVENTS, seed=seed + 1000, tag=f"warm{seed}"))
    await load(target, warm, clients)
    requests = requests_of(city_events(count, seed=seed, tag=f"p{seed}"))
    cpu, started = _cpu_seconds(pid), time.perf_counter()
    accepted = await load(target, requests, clients)
    seconds = time.perf_counter() - started
    # Goodput: only ACCEPTED events count. Anything else (UNAVAILABLE when this shared machine stalls the
    # broker or Redis for seconds) is reported, not hidden.
    return Phase(name, accepted, seconds, (_cpu_seconds(pid) - cpu) / seconds, count - accepted)


def measure_bare(infra: Infra, count: int, seed: int) -> Phase:
    payload_file = infra.workdir / "payloads.pickle"
    warm = payloads_of(city_events(WARMUP_EVENTS, seed=seed + 1000, tag=f"warm{seed}"))
    payload_file.write_bytes(pickle.dumps((warm, payloads_of(city_events(count, seed=seed, tag=f"p{seed}")))))
    argv = [sys.executable, "-m", "bench.bench_ingestion", "bare", infra.broker.url, f"bench{seed}."]
    proc = subprocess.Popen([*argv, str(payload_file)], stdout=subprocess.PIPE, text=True)
    _pin(proc.pid, SERVER_CORE)
    stdout, _ = proc.communicate(timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"bare producer failed with exit code {proc.returncode}")
    figures = json.loads(stdout.strip().splitlines()[-1])
    return Phase("bare producer", count, figures["seconds"], figures["cpu"])


async def _bare_producer(
    bootstrap: str, prefix: str, warm: list[Payload], payloads: list[Payload]
) -> dict[str, float]:
    settings = KafkaSettings(bootstrap_servers=bootstrap, topic_prefix=prefix)
    await ensure_topics(settings)
    topics = Topics.from_settings(settings)
    producer = make_producer(settings, client_id="bench-bare")
    await producer.start()
    try:

        async def send(items: list[Payload]) -> None:
            pending = []
            for kind, key, value in items:
                pending.append(await producer.send(topics.for_kind(kind), value, key=key))  # type: ignore[arg-type]
                if len(pending) >= 10_000:
                    await asyncio.gather(*pending)
                    pending.clear()
            await asyncio.gather(*pending)

        await send(warm)
        cpu, started = time.process_time(), time.perf_counter()
        await send(payloads)
        seconds = time.perf_counter() - started
        return {"seconds": seconds, "cpu": (time.process_time() - cpu) / seconds}
    finally:
        await producer.stop()


# ------------------------------------------------------------------------------------------ runner ---


async def _run(quick: bool) -> BenchResult:
    rounds, count = (2, 15_000) if quick else (5, 60_000)
    if (os.cpu_count() or 1) >= 2:
        os.sched_setaffinity(0, {OTHER_CORE})  # the load generator; its threads inherit this
    workdir = Path(tempfile.mkdtemp(prefix="bench-ingestion-"))
    infra = start_infra(workdir)
    phases: dict[str, list[Phase]] = {"batch RPC": [], "streaming RPC": [], "bare producer": []}
    try:
        # Rounds interleave the three paths, so a noisy neighbour on this machine hits them alike.
        for round_ in range(rounds):
            prefix = f"bench{round_}."
            await ensure_topics(KafkaSettings(bootstrap_servers=infra.broker.url, topic_prefix=prefix))
            proc, target = start_ingestion(infra, prefix)
            try:
                await _serving(target)
                phases["batch RPC"].append(
                    await measure_rpc(infra, target, proc.pid, count, 10 * round_, False)
                )
                phases["streaming RPC"].append(
                    await measure_rpc(infra, target, proc.pid, count, 10 * round_ + 1, True)
                )
            finally:
                proc.terminate()
                proc.wait(15)
            phases["bare producer"].append(
                await asyncio.to_thread(measure_bare, infra, count, 10 * round_ + 2)
            )
    finally:
        infra.stop()

    median = {path: statistics.median(p.events_per_s for p in runs) for path, runs in phases.items()}
    best = {path: max(p.events_per_s for p in runs) for path, runs in phases.items()}
    bare_median, bare_best = median["bare producer"], best["bare producer"]
    labels = {
        "batch RPC": f"batch RPC ({CLIENTS} clients x {BATCH} events/call)",
        "streaming RPC": f"streaming RPC ({STREAMS} streams x {BATCH} events/chunk)",
        "bare producer": "bare aiokafka producer (baseline)",
    }
    rows = [
        {
            "path": labels[path],
            "events/s (median)": round(median[path]),
            "events/s (best)": round(best[path]),
            "x bare (median)": round(median[path] / bare_median, 3),
            "x bare (best)": round(best[path] / bare_best, 3),
            "process CPU %": round(100 * statistics.median(p.server_cpu for p in runs)),
        }
        for path, runs in phases.items()
    ]
    per_round = [
        round(b.events_per_s / p.events_per_s, 3)
        for b, p in zip(phases["batch RPC"], phases["bare producer"], strict=True)
    ]
    return BenchResult(
        name=NAME,
        rows=rows,
        figures={
            "batch_events_per_s": median["batch RPC"],
            "stream_events_per_s": median["streaming RPC"],
            "bare_producer_events_per_s": bare_median,
            "batch_ratio": median["batch RPC"] / bare_median,
            "stream_ratio": median["streaming RPC"] / bare_median,
            "batch_ratio_best": best["batch RPC"] / bare_best,
            "stream_ratio_best": best["streaming RPC"] / bare_best,
        },
        baseline="bare aiokafka producer (same producer settings, EventEnvelope bytes and keys; acks=all)",
        notes=[
            "target: >= 0.3x the bare producer, for batch and streaming",
            f"{rounds} rounds x {count} valid events per path (fresh event ids), each round on fresh "
            f"topics; {WARMUP_EVENTS} warm-up events per path not timed; ratios of medians (and of bests)",
            f"batch/bare per round: {per_round}",
            "events not ACCEPTED (answered UNAVAILABLE), per round: "
            + ", ".join(
                f"{path} {[p.not_accepted for p in runs]}"
                for path, runs in phases.items()
                if path != "bare producer"
            ),
            "ingestion per event: decode, validate, Redis dedup claim + settle (2 round trips of Lua "
            "scripts per call/chunk), envelope, PRODUCER span (5 % sampled), broker ack (acks=all), answer",
            "process under test pinned to core 0; load generator, broker and Redis on core 1",
        ],
    )


def run(quick: bool) -> BenchResult:
    return asyncio.run(_run(quick))


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "bare":
        warm_payloads, timed_payloads = pickle.loads(Path(sys.argv[4]).read_bytes())
        print(
            json.dumps(asyncio.run(_bare_producer(sys.argv[2], sys.argv[3], warm_payloads, timed_payloads)))
        )
    else:
        sys.exit("usage: python -m bench.bench_ingestion bare <bootstrap> <prefix> <payload file>")
