"""Shared by the prediction tests and ``bench/bench_serving.py``: a real quantile model trained on
synthetic data, its registration, and a city of restaurants and drivers written to the online store."""

from __future__ import annotations

import asyncio
import math
import random
from dataclasses import dataclass

import asyncpg
import numpy as np

from eta.v1 import events_pb2
from eta_common import customer_features as CF
from eta_common import features as F
from eta_common.db.archive import ArchivedEvent, archive_events
from eta_common.db.registry import promote, register_model
from eta_common.model_bundle import dump_bundle
from eta_common.online_store import DriverUpdate, OnlineStore, RestaurantUpdate
from eta_common.redis_client import redis_from_url
from eta_common.timeutil import timestamp_from_ms
from trainer.dataset import TrainingSet
from trainer.train import fit_quantile_models

__all__ = ["CENTRE", "City", "populate_city", "register", "synthetic_bundle"]

CENTRE = (52.52, 13.405)
MINUTE_MS = 60_000


def synthetic_bundle(*, rows: int = 4000, rounds: int = 40, seed: int = 7) -> bytes:
    """A LightGBM p10/p50/p90 bundle (the trainer's own fit) on data shaped like the real features."""
    rng = np.random.default_rng(seed)
    distance = rng.uniform(0.3, 8.0, rows)
    kitchen = rng.poisson(3.0, rows).astype(float)
    prep = rng.normal(14.0, 4.0, rows)
    prep[rng.random(rows) < 0.15] = np.nan
    busy = (rng.random(rows) < 0.1).astype(float)
    drivers = rng.poisson(6.0, rows).astype(float)
    drivers[rng.random(rows) < 0.05] = np.nan
    columns = {
        F.NUM_ORDERS_10.name: rng.poisson(2.0, rows).astype(float),
        F.NUM_ORDERS_30.name: rng.poisson(5.0, rows).astype(float),
        F.ORDERS_IN_KITCHEN: kitchen,
        F.MEAN_PREP_MINUTES_60.name: prep,
        F.MEAN_PREP_MINUTES_24H.name: np.where(np.isnan(prep), 14.0, prep) + rng.normal(0.0, 1.0, rows),
        F.KITCHEN_BUSY: busy,
        F.FREE_DRIVERS_NEARBY: drivers,
        F.DISTANCE_KM: distance,
        F.HOUR_OF_WEEK: rng.integers(0, 168, rows).astype(float),
    }
    # a feature added later gets noise: the model still has a column for every feature the service builds
    X = np.column_stack([columns.get(name, rng.normal(0.0, 1.0, rows)) for name in F.FEATURE_NAMES])
    y = (
        8.0
        + 2.6 * distance
        + 1.2 * kitchen
        + 0.6 * np.nan_to_num(prep, nan=14.0)
        + 6.0 * busy
        + 6.0 * np.exp(-np.nan_to_num(drivers, nan=3.0) / 3.0)
        + rng.gamma(2.0, 2.5, rows)
    )
    data = TrainingSet(list(F.FEATURE_NAMES), X, y, np.arange(rows, dtype=np.int64), ["r"] * rows)
    return dump_bundle(data.feature_names, fit_quantile_models(data, rounds=rounds))


async def register(database_url: str, version: str, blob: bytes, *, promote_now: bool = True) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        await register_model(
            conn,
            version=version,
            feature_names=list(F.FEATURE_NAMES),
            metrics={"synthetic": True},
            blob=blob,
            promote_now=False,
        )
        if promote_now:
            await promote(conn, version)
    finally:
        await conn.close()


@dataclass(frozen=True)
class City:
    restaurants: dict[str, tuple[float, float]]
    drivers: int


def _near(rng: random.Random, radius_km: float) -> tuple[float, float]:
    r = radius_km * math.sqrt(rng.random())
    angle = rng.uniform(0, 2 * math.pi)
    return (
        CENTRE[0] + r * math.sin(angle) / 111.2,
        CENTRE[1] + r * math.cos(angle) / (111.2 * math.cos(math.radians(CENTRE[0]))),
    )


async def populate_city(
    store: OnlineStore,
    *,
    now_ms: int,
    restaurants: int = 200,
    drivers: int = 60,
    orders_per_hour: float = 6.0,
    prefix: str = "rest",
    seed: int = 11,
) -> City:
    """A busy dinner hour: per restaurant ~``orders_per_hour`` orders placed, accepted and (most) ready
    over the last hour, a kitchen status, and ``drivers`` free drivers across a 5 km disc."""
    rng = random.Random(seed)
    located: dict[str, tuple[float, float]] = {}
    updates: list[RestaurantUpdate | DriverUpdate] = []
    for i in range(restaurants):
        rid = f"{prefix}-{i:03d}"
        lat, lng = located[rid] = _near(rng, 5.0)
        for j in range(max(1, round(rng.gauss(orders_per_hour, 2)))):
            oid = f"{rid}-o{j}"
            placed = now_ms - rng.randrange(1, 60 * MINUTE_MS)
            accepted = placed + rng.randrange(30_000, 120_000)
            updates.append(RestaurantUpdate(rid, "PLACED", oid, placed, lat, lng))
            if accepted < now_ms:
                updates.append(RestaurantUpdate(rid, "ORDER_ACCEPTED", oid, accepted))
                ready = accepted + rng.randrange(6, 25) * MINUTE_MS
                if ready < now_ms:
                    updates.append(RestaurantUpdate(rid, "ORDER_READY", oid, ready))
        updates.append(
            RestaurantUpdate(rid, rng.choice(["OPENED"] * 9 + ["BUSY"]), "", now_ms - 3 * 3600_000)
        )
    for d in range(drivers):
        dlat, dlng = _near(rng, 5.0)
        updates.append(
            DriverUpdate(f"{prefix}-drv-{d}", "ONLINE", now_ms - rng.randrange(1_000, 30_000), dlat, dlng)
        )
    for start in range(0, len(updates), 500):
        await store.apply(updates[start : start + 500], now_ms=now_ms)
    return City(located, drivers)


class RedisProxy:
    """A TCP proxy in front of Redis for black-box tests: counts round trips ("turns": the client speaks
    after the server did; a subscribed connection's pings are not counted) and can black-hole traffic
    (accepts and reads, never answers) like a hung or partitioned Redis."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.blackhole = False
        self.turns = 0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def drop_connections(self) -> None:
        """Close every proxied connection (the client sees Redis go away)."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        state = {"last": "server"}
        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        try:
            if not self.blackhole:
                upstream = await asyncio.open_connection("127.0.0.1", self.upstream_port)

            async def client_to_server() -> None:
                while data := await reader.read(65536):
                    if self.blackhole or upstream is None:
                        continue  # swallow: nobody answers
                    if b"SUBSCRIBE" in data:  # a client-side cache's invalidation channel: not a read
                        state["pubsub"] = "yes"
                    if state["last"] == "server" and "pubsub" not in state:
                        self.turns += 1
                    state["last"] = "client"
                    upstream[1].write(data)
                    await upstream[1].drain()

            async def server_to_client() -> None:
                if upstream is None:
                    await asyncio.get_running_loop().create_future()  # black hole: never answers
                    return
                while data := await upstream[0].read(65536):
                    if self.blackhole:
                        continue
                    state["last"] = "server"
                    writer.write(data)
                    await writer.drain()

            # Either side closing (e.g. Redis killed) closes the other, as a direct connection would.
            pumps = [asyncio.ensure_future(client_to_server()), asyncio.ensure_future(server_to_client())]
            try:
                await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for pump in pumps:
                    pump.cancel()
                await asyncio.gather(*pumps, return_exceptions=True)
        except OSError:
            pass
        finally:
            self._tasks.discard(task)
            writer.close()
            if upstream is not None:
                upstream[1].close()


DAY_MS = 24 * 3_600_000
# What seed_customer's history gives: two orders in the last 28 days, one delivered in 30 minutes.
SEEDED_CUSTOMER: dict[str, float] = {CF.CUSTOMER_ORDERS_28D: 2.0, CF.CUSTOMER_MEAN_DELIVERY_28D: 30.0}


async def seed_customer(database_url: str, redis_url: str, customer_id: str, now_ms: int) -> None:
    """Archive a small order history for ``customer_id`` in PostgreSQL and serve it through the real hourly
    batch refresh (values: :data:`SEEDED_CUSTOMER`)."""
    boundary = CF.as_of_boundary(now_ms)
    at = events_pb2.GeoPoint(lat=52.5, lng=13.4)

    def order(
        event_id: str, order_id: str, kind: events_pb2.OrderEvent.Type.ValueType, event_ms: int
    ) -> ArchivedEvent:
        event = events_pb2.Event(
            order=events_pb2.OrderEvent(
                event_id=f"{customer_id}-{event_id}", event_time=timestamp_from_ms(event_ms),
                order_id=f"{customer_id}-{order_id}", restaurant_id="seeded", customer_id=customer_id,
                type=kind, restaurant_location=at, customer_location=at, driver_id="seeded-driver",
            )
        )  # fmt: skip
        return ArchivedEvent(event, event_ms + 1_000)

    placed, delivered = events_pb2.OrderEvent.PLACED, events_pb2.OrderEvent.DELIVERED
    history = [
        order("e1", "o1", placed, boundary - 2 * DAY_MS),
        order("e2", "o1", delivered, boundary - 2 * DAY_MS + 30 * 60_000),
        order("e3", "o2", placed, boundary - DAY_MS),
    ]
    conn = await asyncpg.connect(database_url)
    client = redis_from_url(redis_url)  # a Redis or a Redis Cluster
    try:
        await archive_events(conn, history)
        await CF.refresh_customer_features(conn, client, boundary)
    finally:
        await conn.close()
        await client.aclose()
