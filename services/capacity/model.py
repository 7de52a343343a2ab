"""The capacity model: a traffic profile and measured per-unit costs in, a sizing out.

Every rate is per second and every CPU figure is in cores (core-seconds per second) of the machine the
costs were measured on (``core_speed`` > 1 when the production cores are faster). The method, its
assumptions and a worked example are in ``docs/capacity.md``; the costs come from ``make bench``
(``bench/bench_capacity.py`` → ``bench/results/capacity.json``; a copy ships as ``capacity/costs.json``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from eta_common import features as F

__all__ = [
    "DEFAULT_UTILISATION",
    "Costs",
    "Profile",
    "Sizing",
    "load_costs",
    "size",
]

# The share of a core (of a Redis shard's main thread, of PostgreSQL's write capacity) a component is
# planned to use in steady state. The rest is headroom: catching up after an outage or a deploy at ~1/u
# times the steady rate (aggregator, ingestion), queueing kept short for latency (prediction, Redis),
# vacuum, checkpoints and the trainer's reads (PostgreSQL).
DEFAULT_UTILISATION: dict[str, float] = {
    "aggregator": 0.6,
    "ingestion": 0.6,
    "prediction": 0.5,
    "redis": 0.5,
    "postgres": 0.5,
}
MIN_REPLICAS = 2  # every stateless service: one may be down (rollout, node loss) without an outage
MIN_PARTITIONS = 6
PARTITIONS_PER_REPLICA = 2  # the group can double without repartitioning (which moves every key)
REDIS_SHARD_MEMORY_BYTES = 25 * 2**30  # usable dataset per shard (e.g. a 32 GB node, fork headroom)
REDIS_MEMORY_OVERHEAD = 1.3  # allocator fragmentation, replication and client buffers over the dataset
ORDER_STATE_HOURS = 24.0
# Rows/s one PostgreSQL primary is planned to take (WAL, checkpoints, vacuum and index maintenance grow
# with the row rate; beyond this, split the writes).
MAX_POSTGRES_ROWS_PER_S = (
    50_000  # an order's state in Redis lives at most this long (the 24-hour prep window)
)


@dataclass(frozen=True)
class Costs:
    """Per-unit costs (µs of CPU, bytes), as ``bench_capacity`` writes them."""

    aggregator_cpu_us_per_ping: float
    aggregator_cpu_us_per_dropped_ping: float
    aggregator_cpu_us_per_order_event: float
    redis_cpu_us_per_ping: float
    redis_cpu_us_per_order_event: float
    postgres_cpu_us_per_ping_row: float
    postgres_cpu_us_per_order_event_row: float
    archive_bytes_per_ping_row: float
    archive_bytes_per_order_event_row: float
    order_events_per_order: float
    redis_bytes_per_driver: float
    redis_bytes_per_order: float
    redis_bytes_per_restaurant: float
    ingestion_cpu_us_per_event: float
    prediction_cpu_us_per_call: float
    prediction_cpu_us_per_batch_restaurant: float
    redis_cpu_us_per_prediction: float
    redis_cpu_us_per_batch_restaurant: float
    measured_at: str = ""
    source: str = ""

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], *, measured_at: str = "", source: str = "") -> Costs:
        names = [f for f in cls.__dataclass_fields__ if f not in ("measured_at", "source")]
        missing = [name for name in names if name not in values]
        if missing:
            raise ValueError(f"costs lack {', '.join(missing)}")
        return cls(**{name: float(values[name]) for name in names}, measured_at=measured_at, source=source)


def load_costs(path: Path | None = None) -> Costs:
    """The costs shipped with this package, or a JSON file: a ``bench_capacity`` result
    (``bench/results/capacity.json``: costs under ``figures``) or ``{"costs": {...}}`` like the shipped
    one."""
    if path is None:
        text = resources.files("capacity").joinpath("costs.json").read_text()
        origin = "capacity/costs.json (shipped)"
    else:
        text = path.read_text()
        origin = str(path)
    data = json.loads(text)
    values = data.get("costs") or data.get("figures")
    if not isinstance(values, dict):
        raise ValueError(f"{origin}: no 'costs' or 'figures' object")
    return Costs.from_mapping(
        values, measured_at=str(data.get("measured_at", "")), source=str(data.get("source", origin))
    )


@dataclass(frozen=True)
class Profile:
    """A platform's traffic at its peak."""

    orders_per_min: float
    online_drivers: int
    feed_loads_per_s: float
    checkout_predictions_per_s: float
    markets: int = 1
    ping_interval_s: float = 4.0
    restaurants_per_feed: int = 50
    # restaurants on the platform (Redis memory); None: 5 per order/min at peak
    restaurants: int | None = None
    # the largest market's share of drivers and orders; None: twice the average (capped at 1)
    largest_market_share: float | None = None
    # apply the ping keep rule (features.ping_kept): kept pings / all pings
    ping_keep: bool = True
    # share of feed (batch) predictions written to the prediction log (PREDICTION_LOG_FEED_SAMPLE)
    feed_log_sample: float = 0.02
    core_speed: float = 1.0  # a production core's speed relative to the machine the costs come from
    utilisation: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_UTILISATION))

    @property
    def n_restaurants(self) -> int:
        return self.restaurants if self.restaurants is not None else round(5 * self.orders_per_min)

    @property
    def largest_share(self) -> float:
        if self.largest_market_share is not None:
            return self.largest_market_share
        return min(1.0, 2.0 / self.markets)

    @property
    def ping_keep_fraction(self) -> float:
        """Kept pings / all pings: the keep window's share of its period (in expectation over the fleet's
        phases, whatever the ping interval)."""
        return F.PING_KEEP_WINDOW_MS / F.PING_KEEP_PERIOD_MS if self.ping_keep else 1.0


@dataclass
class Line:
    what: str
    value: float
    unit: str
    how: str


@dataclass
class Sizing:
    profile: Profile
    costs: Costs
    lines: list[Line]
    warnings: list[str]

    def get(self, what: str) -> float:
        return next(line.value for line in self.lines if line.what == what)

    def as_dict(self) -> dict[str, Any]:
        return {
            "profile": asdict(self.profile),
            "costs": asdict(self.costs),
            "sizing": {
                line.what: {"value": line.value, "unit": line.unit, "how": line.how} for line in self.lines
            },
            "warnings": self.warnings,
        }

    def table(self) -> str:
        width = max(len(line.what) for line in self.lines)
        out = []
        for line in self.lines:
            if line.what.startswith("#"):
                out.append(f"\n{line.what[1:].strip()}")
                continue
            value = (
                f"{line.value:,.0f}"
                if abs(line.value) >= 100 or line.value == int(line.value)
                else f"{line.value:,.2f}"
            )
            out.append(f"  {line.what.ljust(width)}  {value:>14} {line.unit:<10} {line.how}")
        return "\n".join(out)


def _replicas(cores: float, utilisation: float) -> int:
    return max(MIN_REPLICAS, math.ceil(cores / utilisation - 1e-9))


def size(profile: Profile, costs: Costs) -> Sizing:
    """The sizing of a profile (see docs/capacity.md for every formula)."""
    c, p, u = costs, profile, profile.utilisation
    speed = p.core_speed
    lines: list[Line] = []
    warnings: list[str] = []

    def add(what: str, value: float, unit: str = "", how: str = "") -> float:
        lines.append(Line(what, value, unit, how))
        return value

    def section(title: str) -> None:
        lines.append(Line(f"# {title}", 0.0, "", ""))

    section("traffic")
    pings = add("driver pings", p.online_drivers / p.ping_interval_s, "/s", "online drivers / ping interval")
    kept = add(
        "pings kept", pings * p.ping_keep_fraction, "/s",
        f"× {p.ping_keep_fraction:.3f} (features.ping_kept)" if p.ping_keep else "every ping (--all-pings)",
    )  # fmt: skip
    order_events = add(
        "order events", p.orders_per_min / 60 * c.order_events_per_order, "/s",
        f"orders/min / 60 × {c.order_events_per_order:.2f} events per order (order, kitchen, dispatch)",
    )  # fmt: skip
    events = add("events ingested", pings + order_events, "/s", "every ping and order event")
    feed_restaurants = add(
        "feed restaurant predictions", p.feed_loads_per_s * p.restaurants_per_feed, "/s",
        f"feed loads/s × {p.restaurants_per_feed} restaurants (PredictEtaBatch)",
    )  # fmt: skip

    section("Kafka and the aggregator")
    agg_cores = add(
        "aggregator CPU",
        (kept * c.aggregator_cpu_us_per_ping + (pings - kept) * c.aggregator_cpu_us_per_dropped_ping
         + order_events * c.aggregator_cpu_us_per_order_event) / 1e6 / speed,
        "cores",
        f"kept × {c.aggregator_cpu_us_per_ping:.1f} + dropped × {c.aggregator_cpu_us_per_dropped_ping:.1f} "
        f"+ order events × {c.aggregator_cpu_us_per_order_event:.1f} µs",
    )  # fmt: skip
    agg = add(
        "aggregator replicas", _replicas(agg_cores, u["aggregator"]), "",
        f"CPU / {u['aggregator']:.0%} per process (one core each), at least {MIN_REPLICAS}",
    )  # fmt: skip
    partitions = max(MIN_PARTITIONS, math.ceil(PARTITIONS_PER_REPLICA * agg / 6) * 6)
    add(
        "partitions per topic", partitions, "",
        f"{PARTITIONS_PER_REPLICA} × replicas rounded up to a multiple of 6, at least {MIN_PARTITIONS} "
        "(KAFKA_TOPIC_PARTITIONS)",
    )  # fmt: skip

    section("Redis (online store)")
    redis_write = kept * c.redis_cpu_us_per_ping + order_events * c.redis_cpu_us_per_order_event
    redis_read = (
        p.checkout_predictions_per_s * c.redis_cpu_us_per_prediction
        + feed_restaurants * c.redis_cpu_us_per_batch_restaurant
    )
    redis_cores = add(
        "Redis CPU", (redis_write + redis_read) / 1e6 / speed, "cores",
        f"writes {redis_write / 1e6:.2f} (pings × {c.redis_cpu_us_per_ping:.1f}, order events × "
        f"{c.redis_cpu_us_per_order_event:.1f} µs) + reads {redis_read / 1e6:.2f}",
    )  # fmt: skip
    dataset = (
        p.online_drivers * c.redis_bytes_per_driver
        + p.n_restaurants * c.redis_bytes_per_restaurant
        + p.orders_per_min * 60 * ORDER_STATE_HOURS * c.redis_bytes_per_order
    )
    memory = add(
        "Redis memory", dataset * REDIS_MEMORY_OVERHEAD / 2**30, "GiB",
        f"(drivers × {c.redis_bytes_per_driver:.0f} B + {p.n_restaurants:,} restaurants × "
        f"{c.redis_bytes_per_restaurant:.0f} B + {ORDER_STATE_HOURS:.0f} h of orders × "
        f"{c.redis_bytes_per_order:.0f} B) × {REDIS_MEMORY_OVERHEAD}",
    )  # fmt: skip
    by_cpu = math.ceil(redis_cores / u["redis"] - 1e-9)
    by_memory = math.ceil(memory * 2**30 / REDIS_SHARD_MEMORY_BYTES - 1e-9)
    shards = add(
        "Redis shards (primaries)", max(1, by_cpu, by_memory), "",
        f"max(CPU / {u['redis']:.0%} of a core = {by_cpu}, "
        f"memory / {REDIS_SHARD_MEMORY_BYTES / 2**30:.0f} GiB = {by_memory})",
    )  # fmt: skip
    add("Redis memory per shard", memory / shards, "GiB", "spread by hash slot")
    # A market's drivers and dispatch backlog share one hash tag: one slot, one shard's core.
    market_cores = add(
        "largest market's driver slot", p.largest_share * (kept * c.redis_cpu_us_per_ping) / 1e6 / speed,
        "cores", f"{p.largest_share:.0%} of the pings on one hash slot (drv:{{market}})",
    )  # fmt: skip
    if market_cores > u["redis"]:
        warnings.append(
            f"the largest market's driver updates need {market_cores:.2f} cores of one Redis shard "
            f"(> {u['redis']:.0%}): split it into smaller markets (a market is one hash slot), or keep fewer "
            "pings (features.PING_KEEP_PERIOD_MS)"
        )

    section("PostgreSQL (offline store)")
    logged = p.checkout_predictions_per_s + feed_restaurants * p.feed_log_sample
    rows = add("archive rows", kept + order_events, "/s", "kept pings + order events (one row per event_id)")
    add("prediction log rows", logged, "/s", f"checkouts + {p.feed_log_sample:.1%} of feed restaurants")
    pg_cores = add(
        "PostgreSQL write CPU",
        (kept * c.postgres_cpu_us_per_ping_row
         + (order_events + logged) * c.postgres_cpu_us_per_order_event_row) / 1e6 / speed,
        "cores",
        f"rows × {c.postgres_cpu_us_per_ping_row:.1f} (pings) / "
        f"{c.postgres_cpu_us_per_order_event_row:.1f} µs (others)",
    )  # fmt: skip
    add(
        "PostgreSQL cores", max(2, math.ceil(pg_cores / u["postgres"] - 1e-9)), "",
        f"write CPU / {u['postgres']:.0%}, at least 2",
    )  # fmt: skip
    growth = (
        kept * c.archive_bytes_per_ping_row + order_events * c.archive_bytes_per_order_event_row
    ) * 86_400
    add("archive growth", growth / 1e12, "TB/day", f"rows × {c.archive_bytes_per_ping_row:.0f} / "
        f"{c.archive_bytes_per_order_event_row:.0f} B (table + indexes)")  # fmt: skip
    if rows + logged > MAX_POSTGRES_ROWS_PER_S:
        warnings.append(
            f"{rows + logged:,.0f} rows/s ({rows:,.0f} archive + {logged:,.0f} prediction log) is more than "
            f"one PostgreSQL primary should take (~{MAX_POSTGRES_ROWS_PER_S:,}/s): lower the feed log sample "
            "(PREDICTION_LOG_FEED_SAMPLE), keep fewer pings, or shard the archive by market"
        )

    section("ingestion and prediction")
    ing_cores = add(
        "ingestion CPU", events * c.ingestion_cpu_us_per_event / 1e6 / speed, "cores",
        f"events × {c.ingestion_cpu_us_per_event:.1f} µs (StreamEvents)",
    )  # fmt: skip
    add(
        "ingestion replicas", _replicas(ing_cores, u["ingestion"]), "",
        f"CPU / {u['ingestion']:.0%} per process, at least {MIN_REPLICAS}",
    )  # fmt: skip
    pred_cores = add(
        "prediction CPU",
        (p.checkout_predictions_per_s * c.prediction_cpu_us_per_call
         + p.feed_loads_per_s * c.prediction_cpu_us_per_call
         + feed_restaurants * c.prediction_cpu_us_per_batch_restaurant) / 1e6 / speed,
        "cores",
        f"calls × {c.prediction_cpu_us_per_call:.0f} µs + feed restaurants × "
        f"{c.prediction_cpu_us_per_batch_restaurant:.0f} µs",
    )  # fmt: skip
    add(
        "prediction replicas", _replicas(pred_cores, u["prediction"]), "",
        f"CPU / {u['prediction']:.0%} per process, at least {MIN_REPLICAS}",
    )  # fmt: skip
    return Sizing(profile, costs, lines, warnings)
