"""Feature definitions — the single source of truth for the online aggregator (Redis), the prediction
service, and the offline training-set builder. Change a definition here and every path follows.

Time semantics
--------------
* Windowed features are over **event time**: a window of length W evaluated at time t counts the events
  whose ``event_time`` lies in the half-open interval ``(t - W, t]``.
* Each order counts once (the order id is the member of the window set), so re-sent events, broker
  retry duplicates and replays change nothing.
* **Lateness**: an event whose ``ingest_time - event_time`` exceeds ``ALLOWED_LATENESS_MS``
  (``AGGREGATOR_ALLOWED_LATENESS_SECONDS``, default 300 s) is not applied to online features (it is
  counted in a metric and still archived); the offline builder applies the same rule.
* State features (orders in the kitchen, kitchen status, free drivers) take an event only if it is newer
  (event time) than the last one applied for that entity: out-of-order stale updates are ignored.
* Set features (orders in the kitchen, orders waiting for a driver) are order-insensitive: an order's
  outcome (READY, CANCELLED, ASSIGNED) removes it whether it arrives before or after the event that
  opened it (ACCEPTED, PLACED), and each order is a set member, so duplicates change nothing.
"""

from __future__ import annotations

import functools
import math
import zlib
from dataclasses import dataclass
from datetime import UTC, datetime

from eta_common.customer_features import CUSTOMER_DEFAULTS, CUSTOMER_FEATURE_NAMES

__all__ = [
    "DEFAULTS",
    "DISTANCE_KM",
    "FEATURE_NAMES",
    "FREE_DRIVERS_NEARBY",
    "HOUR_OF_WEEK",
    "KITCHEN_BUSY",
    "MEAN_PICKUP_WAIT_30",
    "MEAN_PREP_MINUTES_24H",
    "MEAN_PREP_MINUTES_60",
    "NUM_ORDERS_10",
    "NUM_ORDERS_30",
    "ORDERS_IN_KITCHEN",
    "ORDERS_WAITING_FOR_DRIVER",
    "PICKUP_WAIT_MEANS",
    "PING_KEEP_PERIOD_MS",
    "PING_KEEP_WINDOW_MS",
    "SETTLED_ORDER_RETENTION_MS",
    "SUPPLY_AS_OF_LOG_KEY",
    "SUPPLY_RADIUS_KM",
    "WAITING_ORDER_TTL_MS",
    "PickupWaitMean",
    "WindowCount",
    "haversine_km",
    "hour_of_week",
    "ping_kept",
]

EARTH_RADIUS_M = 6372797.560856  # the radius Redis GEO uses, so offline distances match online ones


@dataclass(frozen=True)
class WindowCount:
    """Number of orders PLACED at the restaurant with event_time in (t - window, t]."""

    name: str
    window_ms: int


@dataclass(frozen=True)
class WindowMean:
    """Mean prep time (ORDER_ACCEPTED → ORDER_READY, minutes) of orders READY in (t - window, t]."""

    name: str
    window_ms: int


NUM_ORDERS_10 = WindowCount("num_orders_last_10_min", 10 * 60_000)
NUM_ORDERS_30 = WindowCount("num_orders_last_30_min", 30 * 60_000)
MEAN_PREP_MINUTES_60 = WindowMean("mean_prep_minutes_last_60_min", 60 * 60_000)
# The restaurant's typical prep time: the same mean over the last day (its persistent speed, which the
# 60-minute window misses whenever the restaurant had no order ready in the last hour).
MEAN_PREP_MINUTES_24H = WindowMean("mean_prep_minutes_last_24_hours", 24 * 60 * 60_000)
WINDOW_MEANS: tuple[WindowMean, ...] = (MEAN_PREP_MINUTES_60, MEAN_PREP_MINUTES_24H)


@dataclass(frozen=True)
class PickupWaitMean:
    """Mean minutes ready food waited for its driver — ORDER_READY (kitchen) → PICKED_UP (order event),
    floored at 0 — over the restaurant's orders PICKED_UP in (t - window, t]: how short of drivers the
    restaurant is right now. Order-insensitive: whichever of the two events arrives second completes it."""

    name: str
    window_ms: int


MEAN_PICKUP_WAIT_30 = PickupWaitMean("mean_pickup_wait_minutes_last_30_min", 30 * 60_000)
PICKUP_WAIT_MEANS: tuple[PickupWaitMean, ...] = (MEAN_PICKUP_WAIT_30,)
# Orders the kitchen accepted and has not finished (READY or CANCELLED). An accepted order older than
# KITCHEN_ORDER_TTL_MS with no outcome is considered abandoned and no longer counted.
ORDERS_IN_KITCHEN = "orders_in_kitchen"
KITCHEN_ORDER_TTL_MS = 3 * 60 * 60_000
# 1 when the last kitchen status event was BUSY, else 0 (OPENED/CLOSED or none).
KITCHEN_BUSY = "kitchen_busy"
# Drivers whose last state is free (ONLINE or DELIVERED, not since ASSIGNED/OFFLINE) within the radius
# of the restaurant, at their last known position.
SUPPLY_RADIUS_KM = 3.0
FREE_DRIVERS_NEARBY = "free_drivers_within_3km"
# Driver LOCATION pings at platform scale (README, "The archive at platform scale"): a ping is applied
# online and archived only when its event time falls in its driver's keep window — the first
# PING_KEEP_WINDOW_MS of every PING_KEEP_PERIOD_MS, shifted by a per-driver phase so the kept pings of a
# fleet spread evenly over the period. With the apps pinging every 4 s (the window must be at least the
# ping interval) that keeps one ping in 7.5: a free driver's position is at most ~30 s old (~250 m at
# 30 km/h, against the 3 km radius). Every other driver event (ONLINE, OFFLINE, ASSIGNED, DELIVERED, …)
# is always kept. The rule reads nothing but the ping itself, so it is the same decision for a duplicate,
# a replay, an out-of-order or a late arrival, online and offline.
PING_KEEP_PERIOD_MS = 30_000
PING_KEEP_WINDOW_MS = 4_000
# In a logged prediction's features: the instant a materialised free-driver count was exact for (the
# online/offline check judges the count there, not at the serving time).
SUPPLY_AS_OF_LOG_KEY = "@" + FREE_DRIVERS_NEARBY
# The city-wide dispatch backlog: orders PLACED (anywhere in the city) that no driver has been ASSIGNED to
# (a DriverEvent ASSIGNED carrying the order_id) and that were not CANCELLED. Like a kitchen order, an
# order PLACED more than WAITING_ORDER_TTL_MS ago (event time) with no assignment is considered abandoned
# (e.g. its ASSIGNED event was lost or too late) and no longer counted. The order's outcome may arrive
# before its PLACED event: it is remembered, so that PLACED never counts. Events without an order_id do
# not affect it.
ORDERS_WAITING_FOR_DRIVER = "orders_waiting_for_driver"
WAITING_ORDER_TTL_MS = KITCHEN_ORDER_TTL_MS
# How long (event time, plus the allowed lateness) an order's outcome is remembered for the backlog; twice
# the TTL, so a PLACED can only outlive its ASSIGNED/CANCELLED marker when it is too old to count anyway.
SETTLED_ORDER_RETENTION_MS = 2 * WAITING_ORDER_TTL_MS
# Request-time features.
DISTANCE_KM = "distance_km"
HOUR_OF_WEEK = "hour_of_week"

WINDOW_COUNTS: tuple[WindowCount, ...] = (NUM_ORDERS_10, NUM_ORDERS_30)
# How long window members are kept: the longest window plus the allowed lateness (set at runtime).
MAX_WINDOW_MS = max(w.window_ms for w in WINDOW_COUNTS)
MAX_PREP_WINDOW_MS = max(w.window_ms for w in WINDOW_MEANS)
MAX_PICKUP_WINDOW_MS = max(w.window_ms for w in PICKUP_WAIT_MEANS)
DEFAULT_ALLOWED_LATENESS_MS = 300_000

# Model input order. Append only; the registry stores the names each model was trained with.
FEATURE_NAMES: tuple[str, ...] = (
    NUM_ORDERS_10.name,
    NUM_ORDERS_30.name,
    ORDERS_IN_KITCHEN,
    MEAN_PREP_MINUTES_60.name,
    KITCHEN_BUSY,
    FREE_DRIVERS_NEARBY,
    DISTANCE_KM,
    HOUR_OF_WEEK,
    MEAN_PREP_MINUTES_24H.name,
    ORDERS_WAITING_FOR_DRIVER,
    MEAN_PICKUP_WAIT_30.name,
    # per customer, batch (eta_common.customer_features)
    *CUSTOMER_FEATURE_NAMES,
)

# Value used when the online store has nothing for a feature (documented fallback). NaN lets LightGBM
# route missing values the way it learnt during training.
DEFAULTS: dict[str, float] = {
    NUM_ORDERS_10.name: 0.0,
    NUM_ORDERS_30.name: 0.0,
    ORDERS_IN_KITCHEN: 0.0,
    MEAN_PREP_MINUTES_60.name: math.nan,
    MEAN_PREP_MINUTES_24H.name: math.nan,
    KITCHEN_BUSY: 0.0,
    FREE_DRIVERS_NEARBY: math.nan,
    # NaN, like the other city-level feature: the backlog's freshness fields persist once anything was
    # seen, so "nothing in the store" means an empty/lost store or an unreachable Redis — an unknown
    # backlog, not an idle city. 0 would claim the most optimistic dispatch state exactly when the store
    # cannot tell; NaN lets LightGBM route it (a model trained without missing values treats it as 0, a
    # model that saw cold starts learns where it belongs).
    ORDERS_WAITING_FOR_DRIVER: math.nan,
    # no order picked up in the window: unknown, like the prep means
    MEAN_PICKUP_WAIT_30.name: math.nan,
    # no customer on the request, or no refresh yet: unknown
    **CUSTOMER_DEFAULTS,
}


def haversine_km(lat1: float, lng1: float, lat2: float, lng2: float) -> float:
    """Great-circle distance in km (same formula and radius as Redis GEO)."""
    phi1, phi2 = math.radians(lat1), math.radians(lat2)
    dphi = phi2 - phi1
    dlmb = math.radians(lng2 - lng1)
    a = math.sin(dphi / 2) ** 2 + math.cos(phi1) * math.cos(phi2) * math.sin(dlmb / 2) ** 2
    return 2 * EARTH_RADIUS_M * math.asin(math.sqrt(a)) / 1000.0


def hour_of_week(ms: int) -> int:
    """0 = Monday 00:00–00:59 UTC … 167 = Sunday 23:00–23:59 UTC."""
    return _hour_of_week(ms // 3_600_000)  # UTC hours are whole epoch hours: one answer per hour


@functools.lru_cache(maxsize=512)
def _hour_of_week(epoch_hour: int) -> int:
    moment = datetime.fromtimestamp(epoch_hour * 3600, UTC)
    return moment.weekday() * 24 + moment.hour


def ping_kept(driver_id: str, event_ms: int) -> bool:
    """Whether a driver LOCATION ping changes features and is archived (the rule above; other driver
    events are always kept). Both paths call it: the aggregator before Redis and the archive, the offline
    builder before it applies the event."""
    phase = zlib.crc32(driver_id.encode()) % PING_KEEP_PERIOD_MS  # ~0.1 µs: no cache for 1M drivers
    return (event_ms + phase) % PING_KEEP_PERIOD_MS < PING_KEEP_WINDOW_MS


def is_late(event_ms: int, ingest_ms: int, allowed_lateness_ms: int) -> bool:
    """True when the event arrived later than allowed and must not change online features."""
    return ingest_ms - event_ms > allowed_lateness_ms
