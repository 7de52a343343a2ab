"""The terminal view ``make run`` prints: live ETAs with their ranges, the features behind them and their
age, and where the time goes per hop (from the exported spans)."""

from __future__ import annotations

import json
import math
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import redis.asyncio as aioredis

from devstack.trace_report import hop_stats, render
from eta.v1 import eta_pb2, eta_pb2_grpc, events_pb2
from eta_common import customer_features as CF
from eta_common import features as F

__all__ = ["LiveView", "SpanTail"]

SHORT = {
    F.NUM_ORDERS_10.name: "ord10",
    F.NUM_ORDERS_30.name: "ord30",
    F.ORDERS_IN_KITCHEN: "kitchen",
    F.MEAN_PREP_MINUTES_60.name: "prep60",
    F.MEAN_PREP_MINUTES_24H.name: "prep24h",
    F.KITCHEN_BUSY: "busy",
    F.FREE_DRIVERS_NEARBY: "drivers",
    F.ORDERS_WAITING_FOR_DRIVER: "backlog",
    F.MEAN_PICKUP_WAIT_30.name: "pickup30",
    CF.CUSTOMER_ORDERS_28D: "c.orders",
}


class SpanTail:
    """Incrementally reads span files, keeping the most recent spans in memory."""

    def __init__(self, folder: Path, keep: int = 20_000) -> None:
        self._folder = folder
        self._offsets: dict[Path, int] = {}
        self.spans: deque[dict[str, Any]] = deque(maxlen=keep)

    def poll(self) -> None:
        for path in sorted(self._folder.glob("*.jsonl")):
            offset = self._offsets.get(path, 0)
            with open(path, "rb") as fh:
                fh.seek(offset)
                chunk = fh.read()
            end = chunk.rfind(b"\n") + 1  # only complete lines
            for line in chunk[:end].splitlines():
                try:
                    self.spans.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
            self._offsets[path] = offset + end


@dataclass
class Restaurant:
    restaurant_id: str
    lat: float
    lng: float


async def discover_restaurants(redis_url: str, limit: int) -> list[Restaurant]:
    """Restaurants the online store knows (with a location), from their meta keys."""
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    found: list[Restaurant] = []
    try:
        async for key in client.scan_iter(match="rst:{*}:meta", count=500):
            lat, lng = await client.hmget(key, "lat", "lng")
            if lat and lng:
                found.append(Restaurant(key[len("rst:{") : -len("}:meta")], float(lat), float(lng)))
    finally:
        await client.aclose()
    found.sort(key=lambda r: r.restaurant_id)
    return found[:limit]


async def discover_customer(redis_url: str) -> str:
    """A customer with history features in the online store ('' when the batch refresh has not run)."""
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        async for key in client.scan_iter(match="cust:{*}", count=500):
            return str(key)[len("cust:{") : -1]
    finally:
        await client.aclose()
    return ""


class LiveView:
    def __init__(
        self, prediction_target: str, redis_url: str, traces_dir: Path, *, restaurants: int = 6
    ) -> None:
        self._channel = grpc.aio.insecure_channel(prediction_target)
        self._stub = eta_pb2_grpc.EtaServiceStub(self._channel)
        self._redis_url = redis_url
        self._tail = SpanTail(traces_dir)
        self._count = restaurants
        self._customer = ""  # asks as one customer with history (its features are part of the answer)

    async def close(self) -> None:
        await self._channel.close()

    async def render(self, header: str) -> str:
        restaurants = await discover_restaurants(self._redis_url, self._count)
        if not self._customer:
            self._customer = await discover_customer(self._redis_url)
        rows: list[str] = []
        model = "?"
        names = list(SHORT)
        head = (
            f"{'restaurant':<14} {'ETA min (range)':<17} {'quality':<9} "
            + " ".join(f"{SHORT[n]:>8}" for n in names)
            + f" {'max age s':>9}"
        )
        for r in restaurants:
            # a customer ~2.5 km north-east of the restaurant
            request = eta_pb2.PredictEtaRequest(
                restaurant_id=r.restaurant_id,
                restaurant_location=events_pb2.GeoPoint(lat=r.lat, lng=r.lng),
                customer_location=events_pb2.GeoPoint(lat=r.lat + 0.016, lng=r.lng + 0.026),
                customer_id=self._customer,
            )
            try:
                reply = await self._stub.PredictEta(request, timeout=2)
            except grpc.aio.AioRpcError as exc:
                rows.append(f"{r.restaurant_id:<14} error: {exc.code().name} {exc.details()}")
                continue
            values = {f.name: f for f in reply.features}
            cells = [_fmt(values[n].value, values[n].present) if n in values else "-" for n in names]
            ages = [f.age_seconds for f in reply.features if f.present and f.age_seconds > 0]
            rng = f"{reply.eta_minutes:4.0f} ({reply.eta_low_minutes:.0f}–{reply.eta_high_minutes:.0f})"
            quality = eta_pb2.PredictEtaResponse.FeatureQuality.Name(reply.feature_quality)
            rows.append(
                f"{r.restaurant_id:<14} {rng:<17} {quality:<9} "
                + " ".join(f"{c:>8}" for c in cells)
                + f" {max(ages) if ages else 0:>9.1f}"
            )
            model = reply.model_version
        self._tail.poll()
        latency = render(hop_stats(list(self._tail.spans), last=1000))
        model_line = f"model {model}" if restaurants else "waiting for the first events…"
        return "\n".join(
            [header + " | " + model_line, head, *rows, "", "where the time goes (spans):", latency]
        )


def _fmt(value: float, present: bool) -> str:
    if not present or math.isnan(value):
        return "-"
    return f"{value:.1f}" if value != int(value) else f"{int(value)}"
