"""The terminal view ``make run`` prints: live ETAs with their ranges, the features behind them and their
age, and where the time goes per hop (from the exported spans). It warns when the city's dispatch backlog
(orders waiting for a driver, a city-wide feature of every answer) keeps growing — a city with too few
drivers, whose delivery times then grow without bound — and shows a notice from ``make run`` (e.g. why
the trained model was not promoted)."""

from __future__ import annotations

import json
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from devstack.trace_report import hop_stats, render
from eta.v1 import eta_pb2, eta_pb2_grpc, events_pb2
from eta_common import customer_features as CF
from eta_common import features as F
from eta_common.redis_client import redis_from_url

__all__ = ["BacklogTrend", "LiveView", "SpanTail"]

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


class BacklogTrend:
    """The city's dispatch backlog over the last ``window_s`` seconds; :meth:`warning` says when it
    keeps growing: samples spanning at least ``min_span_s``, a least-squares slope of at least
    ``min_slope_per_min`` orders a minute, at least ``min_growth`` more orders waiting than at the
    window's low, and the latest value near the window's high (still rising, not a peak that passed)."""

    def __init__(
        self,
        *,
        window_s: float = 600.0,
        min_span_s: float = 120.0,
        min_slope_per_min: float = 0.5,
        min_growth: float = 5.0,
    ) -> None:
        self._window_s = window_s
        self._min_span_s = min_span_s
        self._min_slope = min_slope_per_min
        self._min_growth = min_growth
        self._samples: deque[tuple[float, float]] = deque()

    def add(self, at_s: float, backlog: float) -> None:
        if math.isnan(backlog):
            return
        self._samples.append((at_s, backlog))
        while self._samples and self._samples[0][0] < at_s - self._window_s:
            self._samples.popleft()

    def slope_per_min(self) -> float:
        n = len(self._samples)
        if n < 3:
            return 0.0
        t0 = self._samples[0][0]
        ts = [t - t0 for t, _ in self._samples]
        vs = [v for _, v in self._samples]
        mean_t, mean_v = sum(ts) / n, sum(vs) / n
        var = sum((t - mean_t) ** 2 for t in ts)
        if var == 0:
            return 0.0
        return 60.0 * sum((t - mean_t) * (v - mean_v) for t, v in zip(ts, vs, strict=True)) / var

    def warning(self) -> str | None:
        if len(self._samples) < 3:
            return None
        span = self._samples[-1][0] - self._samples[0][0]
        values = [v for _, v in self._samples]
        low, high, last = min(values), max(values), values[-1]
        slope = self.slope_per_min()
        growing = (
            span >= self._min_span_s
            and slope >= self._min_slope
            and last - low >= self._min_growth
            and last >= high - 0.25 * (high - low)
        )
        if not growing:
            return None
        return (
            f"WARNING: the city's dispatch backlog keeps growing: {low:.0f} → {last:.0f} orders waiting "
            f"for a driver in {span / 60:.0f} min (+{slope:.1f}/min).\n"
            "         Too few drivers for this city: delivery times and ETAs will keep rising "
            "(the fleet is 3 drivers per restaurant unless --drivers says otherwise)."
        )


@dataclass
class Restaurant:
    restaurant_id: str
    lat: float
    lng: float


async def discover_restaurants(redis_url: str, limit: int) -> list[Restaurant]:
    """Restaurants the online store knows (with a location), from their meta keys."""
    client = redis_from_url(redis_url, decode_responses=True)
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
    client = redis_from_url(redis_url, decode_responses=True)
    try:
        async for key in client.scan_iter(match="cust:{*}", count=500):
            return str(key)[len("cust:{") : -1]
    finally:
        await client.aclose()
    return ""


class LiveView:
    def __init__(
        self,
        prediction_target: str,
        redis_url: str,
        traces_dir: Path,
        *,
        restaurants: int = 6,
        notice: str = "",
        backlog: BacklogTrend | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._channel = grpc.aio.insecure_channel(prediction_target)
        self._stub = eta_pb2_grpc.EtaServiceStub(self._channel)
        self._redis_url = redis_url
        self._tail = SpanTail(traces_dir)
        self._count = restaurants
        self._customer = ""  # asks as one customer with history (its features are part of the answer)
        self.notice = notice  # shown under the header line while set
        self._backlog = backlog or BacklogTrend()
        self._clock = clock

    async def close(self) -> None:
        await self._channel.close()

    async def render(self, header: str) -> str:
        restaurants = await discover_restaurants(self._redis_url, self._count)
        if not self._customer:
            self._customer = await discover_customer(self._redis_url)
        rows: list[str] = []
        model = "?"
        city_backlog = math.nan
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
            waiting = values.get(F.ORDERS_WAITING_FOR_DRIVER)
            if waiting is not None and waiting.present and math.isnan(city_backlog):
                city_backlog = waiting.value  # city-wide: the same in every answer
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
        self._backlog.add(self._clock(), city_backlog)
        self._tail.poll()
        latency = render(hop_stats(list(self._tail.spans), last=1000))
        model_line = f"model {model}" if restaurants else "waiting for the first events…"
        notices = [line for line in (self.notice, self._backlog.warning()) if line]
        return "\n".join(
            [header + " | " + model_line, *notices, head, *rows, "", "where the time goes (spans):", latency]
        )


def _fmt(value: float, present: bool) -> str:
    if not present or math.isnan(value):
        return "-"
    return f"{value:.1f}" if value != int(value) else f"{int(value)}"
