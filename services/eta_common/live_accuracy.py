"""Live accuracy: the ETAs customers were shown, against the delivery times that followed.

Every delivered order in the window (DELIVERED event time in ``(now − window, now]``) is joined to the
prediction served for it: ``predictions.request_id`` = order id (the app — live mode of the simulator —
asks for the ETA at checkout with the order id as request id). The checkout prediction is the last one
served no later than ``PLACED + grace`` (the grace absorbs clock skew between the app and the service;
ETAs asked while tracking a placed order are not the promise the customer ordered on). The actual time
is DELIVERED − PLACED by event time, as for training labels.

:func:`live_accuracy` computes it (one SQL query); :class:`AccuracyGauges` exports it as Prometheus
gauges, refreshed by the aggregator every ``AGGREGATOR_ACCURACY_SECONDS``; ``eta-trainer accuracy`` prints
it (or serves the gauges on its own).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import asyncpg
from prometheus_client import REGISTRY as DEFAULT_REGISTRY
from prometheus_client import CollectorRegistry, Gauge

from eta_common.timeutil import datetime_from_ms, now_ms

__all__ = ["AccuracyGauges", "LiveAccuracy", "VersionAccuracy", "live_accuracy"]

DEFAULT_GRACE_SECONDS = 60.0

_SQL = """
WITH delivered AS (
    SELECT order_id, min(event_time) AS delivered_at
    FROM events
    WHERE kind = 'order' AND type = 'DELIVERED' AND event_time > $1 AND event_time <= $2
    GROUP BY order_id
), placed AS (
    SELECT d.order_id, d.delivered_at, min(e.event_time) AS placed_at
    FROM delivered d JOIN events e ON e.order_id = d.order_id AND e.kind = 'order' AND e.type = 'PLACED'
    GROUP BY d.order_id, d.delivered_at
), served AS (
    SELECT DISTINCT ON (pl.order_id)
           pl.order_id, pl.placed_at, pl.delivered_at, p.model_version, p.eta_minutes,
           p.eta_low_minutes, p.eta_high_minutes, p.feature_quality
    FROM placed pl JOIN predictions p ON p.request_id = pl.order_id
    WHERE p.served_at <= pl.placed_at + make_interval(secs => $3)
    ORDER BY pl.order_id, p.served_at DESC, p.id DESC
)
SELECT model_version,
       extract(epoch FROM delivered_at - placed_at) / 60.0 AS actual,
       eta_minutes, eta_low_minutes, eta_high_minutes, feature_quality
FROM served
"""

_DELIVERED_SQL = """
SELECT count(DISTINCT order_id) FROM events
WHERE kind = 'order' AND type = 'DELIVERED' AND event_time > $1 AND event_time <= $2
"""


@dataclass(frozen=True)
class VersionAccuracy:
    model_version: str
    orders: int  # delivered orders joined to a served prediction
    mae: float  # minutes
    p90_abs_error: float
    coverage: float  # share of actual times inside [low, high]
    bias: float  # mean(predicted - actual), minutes


@dataclass(frozen=True)
class LiveAccuracy:
    window_minutes: float
    until_ms: int
    delivered: int  # delivered orders in the window
    joined: int  # of which had a checkout prediction
    overall: VersionAccuracy | None
    by_version: list[VersionAccuracy] = field(default_factory=list)
    by_quality: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def render(self) -> str:
        lines = [
            f"live accuracy, orders delivered in the last {self.window_minutes:g} min: {self.delivered} "
            f"delivered, {self.joined} with a checkout ETA"
        ]
        if self.overall is None:
            lines.append("  (no delivered order could be joined to a served prediction)")
            return "\n".join(lines)
        lines.append(
            f"{'model version':<24} {'orders':>7} {'MAE':>7} {'p90 err':>8} {'coverage':>9} {'bias':>7}"
        )
        for row in [*self.by_version, self.overall]:
            lines.append(
                f"{row.model_version:<24} {row.orders:>7} {row.mae:>7.2f} {row.p90_abs_error:>8.2f} "
                f"{100 * row.coverage:>8.1f}% {row.bias:>+7.2f}"
            )
        if self.by_quality:
            lines.append(
                "feature quality: " + ", ".join(f"{k} {v}" for k, v in sorted(self.by_quality.items()))
            )
        return "\n".join(lines)


def _summarise(version: str, rows: list[tuple[float, float, float, float]]) -> VersionAccuracy:
    errors = sorted(abs(eta - actual) for actual, eta, _, _ in rows)
    n = len(rows)
    p90 = errors[min(n - 1, math.ceil(0.9 * n) - 1)]
    inside = sum(1 for actual, _, low, high in rows if low <= actual <= high)
    bias = sum(eta - actual for actual, eta, _, _ in rows) / n
    return VersionAccuracy(version, n, sum(errors) / n, p90, inside / n, bias)


async def live_accuracy(
    conn: asyncpg.Connection | asyncpg.Pool,
    *,
    window_minutes: float = 60.0,
    until_ms: int | None = None,
    grace_seconds: float = DEFAULT_GRACE_SECONDS,
) -> LiveAccuracy:
    """Rolling MAE and range coverage of the served ETAs for orders delivered in the window."""
    until = until_ms if until_ms is not None else now_ms()
    since = until - round(window_minutes * 60_000)
    lo, hi = datetime_from_ms(since), datetime_from_ms(until)
    rows = await conn.fetch(_SQL, lo, hi, float(grace_seconds))
    delivered = int(await conn.fetchval(_DELIVERED_SQL, lo, hi) or 0)
    per_version: dict[str, list[tuple[float, float, float, float]]] = {}
    quality: dict[str, int] = {}
    everything: list[tuple[float, float, float, float]] = []
    for r in rows:
        item = (
            float(r["actual"]),
            float(r["eta_minutes"]),
            float(r["eta_low_minutes"]),
            float(r["eta_high_minutes"]),
        )
        per_version.setdefault(str(r["model_version"]), []).append(item)
        everything.append(item)
        quality[str(r["feature_quality"])] = quality.get(str(r["feature_quality"]), 0) + 1
    return LiveAccuracy(
        window_minutes=window_minutes,
        until_ms=until,
        delivered=delivered,
        joined=len(everything),
        overall=_summarise("all", everything) if everything else None,
        by_version=[_summarise(v, items) for v, items in sorted(per_version.items())],
        by_quality=quality,
    )


class AccuracyGauges:
    """Prometheus gauges of the last :func:`live_accuracy` result, labelled by model version (``all`` =
    every version). Call :meth:`update` after each computation (e.g. every 30 s)."""

    def __init__(self, registry: CollectorRegistry | None = None, *, prefix: str = "eta_live") -> None:
        reg = registry if registry is not None else DEFAULT_REGISTRY
        self.mae = Gauge(
            f"{prefix}_mae_minutes",
            "Rolling MAE of served ETAs vs actual delivery time (delivered orders in the window)",
            ["model_version"],
            registry=reg,
        )
        self.coverage = Gauge(
            f"{prefix}_interval_coverage_ratio",
            "Share of delivered orders whose actual time fell inside the served [low, high] range",
            ["model_version"],
            registry=reg,
        )
        self.orders = Gauge(
            f"{prefix}_joined_orders",
            "Delivered orders in the window joined to their checkout prediction",
            ["model_version"],
            registry=reg,
        )
        self.delivered = Gauge(
            f"{prefix}_delivered_orders", "Delivered orders in the accuracy window", registry=reg
        )
        self.window = Gauge(f"{prefix}_window_seconds", "Length of the live accuracy window", registry=reg)

    def update(self, result: LiveAccuracy) -> None:
        for gauge in (self.mae, self.coverage, self.orders):
            gauge.clear()
        self.delivered.set(result.delivered)
        self.window.set(result.window_minutes * 60.0)
        rows = [*result.by_version, *([result.overall] if result.overall else [])]
        for row in rows:
            self.mae.labels(row.model_version).set(row.mae)
            self.coverage.labels(row.model_version).set(row.coverage)
            self.orders.labels(row.model_version).set(row.orders)
