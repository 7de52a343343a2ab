"""Event builders for the integration tests, and the Redis they run against (one Redis or a Redis Cluster)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import re
import signal
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster as RedisCluster_

from devstack.infra import (
    ChildProcess,
    RedisCluster,
    RedisServer,
    cluster_ports,
    start_postgres,
    start_redis,
    start_redis_cluster,
)
from eta.v1 import events_pb2
from eta_common.redis_client import redis_from_url
from eta_common.timeutil import datetime_from_ms, now_ms, timestamp_from_ms
from prediction.tests.support import RedisProxy

BERLIN = events_pb2.GeoPoint(lat=52.52, lng=13.405)
NEARBY = events_pb2.GeoPoint(lat=52.53, lng=13.42)


@contextlib.contextmanager
def redis_and_postgres(tmp_path_factory: Any, name: str) -> Iterator[tuple[Path, ChildProcess, ChildProcess]]:
    """A workdir with a Redis and a PostgreSQL of its own, stopped on exit (for a module's services)."""
    workdir = tmp_path_factory.mktemp(name)
    redis = start_redis(workdir / "redis", workdir / "logs")
    postgres = start_postgres(workdir / "pgdata", workdir / "logs")
    try:
        yield workdir, redis, postgres
    finally:
        postgres.stop()
        redis.stop()


async def log_served(
    conn: Any,
    served_ms: int,
    request_id: str,
    restaurant_id: str,
    values: dict[str, float],
    market_id: str | None = None,
) -> None:
    """A served prediction's row as the prediction service logs it (the consistency check's input)."""
    await conn.execute(
        "INSERT INTO predictions (served_at, request_id, restaurant_id, model_version, eta_minutes,"
        " eta_low_minutes, eta_high_minutes, feature_quality, features, market_id)"
        " VALUES ($1, $2, $3, 'consistency-test', 0, 0, 0, 'COMPLETE', $4::jsonb, $5)",
        datetime_from_ms(served_ms),
        request_id,
        restaurant_id,
        json.dumps({k: None if math.isnan(v) else v for k, v in values.items()}),
        market_id,
    )


async def check_day(conn: Any, end_ms: int) -> Any:
    """The strict online/offline check over a simulated day ending at ``end_ms`` (ingest visibility)."""
    from aggregator.consistency import load_and_check

    return await load_and_check(
        conn,
        since_ms=end_ms - 25 * 3_600_000,
        until_ms=end_ms + 1,
        limit=10_000,
        lookback_ms=2 * 3_600_000,
        visibility="ingest",
        strict=True,
    )


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def placed(
    restaurant_id: str, *, order_id: str | None = None, ago_ms: int = 0, event_id: str | None = None
) -> events_pb2.Event:
    return events_pb2.Event(
        order=events_pb2.OrderEvent(
            event_id=event_id or new_id("ev"),
            event_time=timestamp_from_ms(now_ms() - ago_ms),
            order_id=order_id or new_id("order"),
            restaurant_id=restaurant_id,
            customer_id=new_id("cust"),
            type=events_pb2.OrderEvent.PLACED,
            restaurant_location=BERLIN,
            customer_location=NEARBY,
        )
    )


def driver_online(driver_id: str, location: events_pb2.GeoPoint = BERLIN) -> events_pb2.Event:
    return events_pb2.Event(
        driver=events_pb2.DriverEvent(
            event_id=new_id("ev"),
            event_time=timestamp_from_ms(now_ms()),
            driver_id=driver_id,
            type=events_pb2.DriverEvent.ONLINE,
            location=location,
        )
    )


# --- Redis mode: the same tests against one Redis or a Redis Cluster ------------------------------------
#
# ``pytest --redis-mode=cluster`` (or ETA_TEST_REDIS=cluster) runs the integration tests against a local
# Redis Cluster of 3 primaries wherever they start a Redis: the shared and private stacks (conftest) and
# the modules that start their own through :func:`start_test_redis`.

REDIS_MODE_ENV = "ETA_TEST_REDIS"


def redis_mode() -> str:
    mode = os.environ.get(REDIS_MODE_ENV, "single") or "single"
    if mode not in ("single", "cluster"):
        raise ValueError(f"{REDIS_MODE_ENV}={mode!r}: expected 'single' or 'cluster'")
    return mode


def redis_cluster_mode() -> bool:
    return redis_mode() == "cluster"


def start_test_redis(
    data_dir: Path,
    log_dir: Path,
    *,
    like: RedisServer | None = None,
    announce_ports: list[int] | None = None,
) -> RedisServer:
    """One Redis, or a Redis Cluster in cluster mode; ``like``: on the same port(s) as a previous one (a
    restart)."""
    if redis_cluster_mode():
        ports = like.ports if isinstance(like, RedisCluster) else None
        return start_redis_cluster(data_dir, log_dir, ports, announce_ports=announce_ports)
    return start_redis(data_dir, log_dir, like.port if like is not None else None)


def direct_client(server: RedisServer, **kwargs: Any) -> aioredis.Redis:
    """A redis-py client straight to ``server``: a cluster whose nodes announce proxies' ports is reached
    without the proxies (so a test's own traffic is not counted as the service's)."""
    if isinstance(server, RedisCluster) and server.announced:
        remap = server.announced

        def to_node(address: tuple[str, int]) -> tuple[str, int]:
            return "127.0.0.1", remap.get(address[1], address[1])

        client = RedisCluster_(host="127.0.0.1", port=server.port, address_remap=to_node, **kwargs)
        return cast(aioredis.Redis, client)
    return redis_from_url(server.url, **kwargs)


class ProxiedRedis:
    """Counting, black-holing proxies (:class:`prediction.tests.support.RedisProxy`) in front of the Redis
    under test: one for one Redis; one per node of a Redis Cluster whose nodes announce the proxies'
    ports, so a cluster client reaches every shard through them. ``turns`` sums round trips over them."""

    def __init__(self, proxies: list[RedisProxy]) -> None:
        self.proxies = proxies

    @property
    def url(self) -> str:
        return self.proxies[0].url

    @property
    def turns(self) -> int:
        return sum(proxy.turns for proxy in self.proxies)

    @turns.setter
    def turns(self, value: int) -> None:
        for proxy in self.proxies:
            proxy.turns = 0
        self.proxies[0].turns = value

    def shard_turns(self) -> list[int]:
        return [proxy.turns for proxy in self.proxies]

    @property
    def blackhole(self) -> bool:
        return all(proxy.blackhole for proxy in self.proxies)

    @blackhole.setter
    def blackhole(self, value: bool) -> None:
        for proxy in self.proxies:
            proxy.blackhole = value

    async def close(self) -> None:
        for proxy in self.proxies:
            await proxy.close()


async def start_proxied_redis(data_dir: Path, log_dir: Path) -> tuple[RedisServer, ProxiedRedis]:
    """The Redis under test (or a cluster, in cluster mode) and proxies in front of it."""
    if not redis_cluster_mode():
        server = start_redis(data_dir, log_dir)
        proxy = RedisProxy(server.port)
        await proxy.start()
        return server, ProxiedRedis([proxy])
    ports = cluster_ports(3)
    proxies = [RedisProxy(port) for port in ports]
    for proxy in proxies:
        await proxy.start()
    announce = [proxy.port for proxy in proxies]
    cluster = await asyncio.to_thread(start_redis_cluster, data_dir, log_dir, ports, announce_ports=announce)
    return cluster, ProxiedRedis(proxies)


class FrozenRedis:
    """A hung Redis for cluster mode, where a single proxy cannot stand in front of every shard: setting
    ``blackhole`` SIGSTOPs every node (connections are accepted by the kernel, nothing is answered) and
    clearing it SIGCONTs them. Same surface as :class:`prediction.tests.support.RedisProxy`. ``server``:
    the Redis, or a function giving the current one (a test may restart it)."""

    def __init__(self, server: RedisServer | Callable[[], RedisServer]) -> None:
        self._server = server
        self._frozen = False

    @property
    def server(self) -> RedisServer:
        return self._server() if callable(self._server) else self._server

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def blackhole(self) -> bool:
        return self._frozen

    @blackhole.setter
    def blackhole(self, value: bool) -> None:
        nodes = self.server.nodes if isinstance(self.server, RedisCluster) else [self.server]
        for node in nodes:
            with contextlib.suppress(ProcessLookupError):
                os.kill(node.proc.pid, signal.SIGSTOP if value else signal.SIGCONT)
        self._frozen = value

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        if self._frozen:
            self.blackhole = False


def metric_total(port: int, name: str, **labels: str) -> float:
    """The sum of a Prometheus metric's samples served on ``port`` whose labels include ``labels``."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    total = 0.0
    for line in text.splitlines():
        match = re.match(rf"{name}(?:\{{(.*)\}})? (\S+)$", line)
        if match and all(f'{k}="{v}"' in (match[1] or "") for k, v in labels.items()):
            total += float(match[2])
    return total
