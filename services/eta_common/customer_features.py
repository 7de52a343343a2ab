"""Per-customer history features — batch-computed from the PostgreSQL archive, served from Redis.

The single definition used by the aggregator's batch refresh (:func:`refresh_customer_features`, the SQL
below), the prediction service's read (:func:`queue_customer_read` / :func:`parse_customer_read`) and the
trainer's point-in-time builder (:class:`CustomerHistory`). Change it here and every path follows.

Features
--------
* ``customer_orders_last_28_days``: the number of distinct orders the customer PLACED.
* ``customer_mean_delivery_minutes_last_28_days``: the mean minutes PLACED → DELIVERED over those of
  these orders that were DELIVERED.

Batch semantics (point in time)
-------------------------------
The values are refreshed in batch every ``CUSTOMER_REFRESH_MS`` (1 hour), on boundaries aligned to the
Unix epoch. A value served or trained at time ``t`` is the value *as of* the boundary
``r = as_of_boundary(t) = floor(t / CUSTOMER_REFRESH_MS) * CUSTOMER_REFRESH_MS``, computed only from
events archived with ``ingest_time <= r``, so nothing after ``r`` (nor after ``t``) can leak in:

* only order events count (``kind = 'order'``; a driver's DELIVERED is not an order's);
* an order counts for a customer when one of its PLACED events that carries a ``customer_id`` and was
  ingested at or before ``r`` has its ``event_time`` in ``(r − 28 days, r]``. Its placement time is the
  earliest such event time and its customer is that event's ``customer_id`` (on a tie, the smallest
  ``customer_id``), so duplicates and re-sent PLACED events count once;
* the order was DELIVERED when one of its order DELIVERED events has ``event_time <= r`` and
  ``ingest_time <= r``; its delivery time is the earliest such event time. DELIVERED events are joined to
  the order's placement by ``order_id`` (they need not carry the customer id). Its delivery minutes are
  ``(delivered − placed) / 60 000`` ms, as they are (a DELIVERED stamped before its PLACED is not
  filtered out);
* late events are **not** excluded: unlike the streaming features (``AGGREGATOR_ALLOWED_LATENESS_SECONDS``)
  a batch feature sees everything archived by ``r``, however late it arrived. An event ingested after
  ``r`` counts from the next boundary on (if it is still in the window then);
* a customer with no such order: orders = 0, mean = NaN. When no refresh has ever landed (or the
  refreshed values expired), the values are unknown: both NaN.

The mean is ``sum of delivery milliseconds / delivered orders / 60 000`` computed in Python from integer
sums on both paths, so online and offline values are bit-for-bit equal.

Online store (Redis)
--------------------
=========================  ======  ========================================================================
key                        type    content
=========================  ======  ========================================================================
``cust:{<customer_id>}``   hash    ``orders``, ``mean_minutes`` (``''`` = NaN), ``as_of`` (boundary, ms);
                                   written only for customers with at least one order in the window;
                                   TTL ``CUSTOMER_KEY_TTL_MS`` (4 refresh periods)
``eta:customers:as_of``    string  the boundary of the latest *complete* refresh, written last (never moves
                                   backwards); TTL ``MARKER_TTL_MS`` (3 periods: it expires before the
                                   hashes it vouches for, so "no refresh" reads as unknown, never as 0)
=========================  ======  ========================================================================

Reading a customer: no marker → unknown (NaN, NaN); a hash whose ``as_of`` is older than the marker, or
no hash → the customer had no order in the latest refresh (0, NaN, as of the marker); otherwise the hash's
values as of its ``as_of`` (which may be newer than the marker while a refresh is being written).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import asyncpg
import redis.asyncio as aioredis

from eta_common.timeutil import datetime_from_ms

__all__ = [
    "CUSTOMER_DEFAULTS",
    "CUSTOMER_FEATURE_NAMES",
    "CUSTOMER_HISTORY_MS",
    "CUSTOMER_KEY_TTL_MS",
    "CUSTOMER_MEAN_DELIVERY_28D",
    "CUSTOMER_ORDERS_28D",
    "CUSTOMER_READ_REPLIES",
    "CUSTOMER_REFRESH_MS",
    "MARKER_KEY",
    "MARKER_TTL_MS",
    "CustomerFeatures",
    "CustomerHistory",
    "CustomerOrderEvent",
    "CustomerRefreshStats",
    "StaleRefreshError",
    "as_of_boundary",
    "customer_key",
    "customer_values_as_of",
    "load_customer_history",
    "parse_customer_read",
    "queue_customer_read",
    "read_customer_features",
    "read_marker",
    "refresh_customer_features",
]

log = logging.getLogger(__name__)

CUSTOMER_ORDERS_28D = "customer_orders_last_28_days"
CUSTOMER_MEAN_DELIVERY_28D = "customer_mean_delivery_minutes_last_28_days"
CUSTOMER_FEATURE_NAMES: tuple[str, ...] = (CUSTOMER_ORDERS_28D, CUSTOMER_MEAN_DELIVERY_28D)
CUSTOMER_HISTORY_MS = 28 * 24 * 3_600_000
CUSTOMER_REFRESH_MS = 3_600_000
# Unknown (no refresh has landed): NaN for both, so LightGBM routes it as missing.
CUSTOMER_DEFAULTS: dict[str, float] = {CUSTOMER_ORDERS_28D: math.nan, CUSTOMER_MEAN_DELIVERY_28D: math.nan}

MARKER_KEY = "eta:customers:as_of"
CUSTOMER_KEY_TTL_MS = 4 * CUSTOMER_REFRESH_MS
# Shorter than the hashes' TTL by one period (longer than any refresh takes), so the marker of a refresh
# always expires before the hashes it wrote.
MARKER_TTL_MS = CUSTOMER_KEY_TTL_MS - CUSTOMER_REFRESH_MS
_FIELDS = ("orders", "mean_minutes", "as_of")
# Replies queue_customer_read() adds to a pipeline.
CUSTOMER_READ_REPLIES = 2
_MS_PER_MINUTE = 60_000.0


def as_of_boundary(t_ms: int) -> int:
    """The refresh boundary whose values are served at ``t_ms``: ``floor(t / REFRESH) * REFRESH``."""
    return (t_ms // CUSTOMER_REFRESH_MS) * CUSTOMER_REFRESH_MS


def customer_key(customer_id: str) -> str:
    return f"cust:{{{customer_id}}}"


def customer_values_as_of(orders: int, delivered: int, delivery_ms: int) -> dict[str, float]:
    """Feature values from the integer aggregates (shared by both paths: identical floats)."""
    mean = delivery_ms / delivered / _MS_PER_MINUTE if delivered else math.nan
    return {CUSTOMER_ORDERS_28D: float(orders), CUSTOMER_MEAN_DELIVERY_28D: mean}


# --- batch refresh: archive (SQL) → Redis ---------------------------------------------------------------
# $1 = r, $2 = r − 28 days. One set-based statement: the window's placements (one per order: its earliest
# in-window PLACED with a customer), their earliest DELIVERED known by r, aggregated per customer.
# Indexes: events_order_placed_idx / events_order_delivered_idx (migration 0005).
CUSTOMER_SQL = """
WITH placed AS (
    SELECT DISTINCT ON (order_id) order_id, customer_id, event_time AS placed_at
    FROM events
    WHERE kind = 'order' AND type = 'PLACED' AND order_id <> '' AND customer_id <> ''
      AND event_time > $2 AND event_time <= $1 AND ingest_time <= $1
    ORDER BY order_id, event_time, customer_id
), delivered AS (
    SELECT e.order_id, min(e.event_time) AS delivered_at
    FROM events e JOIN placed p ON p.order_id = e.order_id
    WHERE e.kind = 'order' AND e.type = 'DELIVERED' AND e.event_time <= $1 AND e.ingest_time <= $1
    GROUP BY e.order_id
)
SELECT p.customer_id,
       count(*) AS orders,
       count(d.delivered_at) AS delivered,
       coalesce(sum((extract(epoch FROM d.delivered_at - p.placed_at) * 1000)::bigint), 0)::bigint
           AS delivery_ms
FROM placed p LEFT JOIN delivered d ON d.order_id = p.order_id
GROUP BY p.customer_id
"""

# Moves the marker forward only (a refresh of an older boundary never un-completes a newer one).
# KEYS[1] = marker, ARGV = as_of, ttl_ms. Returns 1 when written.
_SET_MARKER = """
local current = tonumber(redis.call('GET', KEYS[1]))
if current and current > tonumber(ARGV[1]) then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""


class StaleRefreshError(RuntimeError):
    """The online store already holds a newer complete refresh than the one requested."""


@dataclass(frozen=True)
class CustomerRefreshStats:
    as_of_ms: int
    customers: int  # customers with at least one order in the window (hashes written)
    delivered_customers: int  # of those, customers with a delivered order (a mean)
    orders: int
    query_seconds: float
    write_seconds: float


async def read_marker(redis_client: Any) -> int | None:
    """The boundary of the latest complete refresh (None: none landed, or it expired)."""
    return _int_or_none(await redis_client.get(MARKER_KEY))


async def _fetch_customer_rows(pool: asyncpg.Pool | asyncpg.Connection, as_of_ms: int) -> list[Any]:
    """Run :data:`CUSTOMER_SQL` with nested loops off: the planner estimates one row for the ``placed``
    CTE (right after a bulk load even more so) and would join it to the deliveries in a nested loop —
    measured 2 s (67 s during ``make run``'s start-up) against 14 ms with hash joins on 3 simulated days."""
    acquire = pool.acquire() if isinstance(pool, asyncpg.Pool) else contextlib.nullcontext(pool)
    async with acquire as conn, conn.transaction():
        await conn.execute("SET LOCAL enable_nestloop = off")
        return list(
            await conn.fetch(
                CUSTOMER_SQL, datetime_from_ms(as_of_ms), datetime_from_ms(as_of_ms - CUSTOMER_HISTORY_MS)
            )
        )


async def refresh_customer_features(
    pool: asyncpg.Pool | asyncpg.Connection,
    redis_client: aioredis.Redis,
    as_of_ms: int,
    *,
    chunk_size: int = 1000,
) -> CustomerRefreshStats:
    """Compute every customer's values as of the boundary ``as_of_ms`` and write them to Redis.

    The customers' hashes go first, in pipelined chunks; the marker last, so a reader never takes a
    half-written refresh for a complete one. Re-running a boundary is harmless (same values). Raises
    :class:`StaleRefreshError` when a newer refresh already completed, and ``ValueError`` when
    ``as_of_ms`` is not a boundary. Not locked: callers that may run concurrently take a lock."""
    if as_of_ms != as_of_boundary(as_of_ms):
        raise ValueError(f"as_of_ms={as_of_ms} is not a refresh boundary (multiple of {CUSTOMER_REFRESH_MS})")
    marker = await read_marker(redis_client)
    if marker is not None and marker > as_of_ms:
        raise StaleRefreshError(f"a newer refresh (as of {marker}) already completed")
    started = time.perf_counter()
    rows = await _fetch_customer_rows(pool, as_of_ms)
    queried = time.perf_counter()
    log.info(
        "customer features computed",
        extra={"as_of_ms": as_of_ms, "customers": len(rows), "query_s": round(queried - started, 3)},
    )
    as_of = str(as_of_ms)
    delivered_customers = orders = 0
    for offset in range(0, len(rows), chunk_size):
        pipe = redis_client.pipeline(transaction=False)
        for customer_id, n, delivered, delivery_ms in rows[offset : offset + chunk_size]:
            values = customer_values_as_of(int(n), int(delivered), int(delivery_ms))
            mean = values[CUSTOMER_MEAN_DELIVERY_28D]
            key = customer_key(customer_id)
            pipe.hset(
                key,
                mapping={
                    "orders": int(n),
                    "mean_minutes": "" if math.isnan(mean) else repr(mean),
                    "as_of": as_of,
                },
            )
            pipe.pexpire(key, CUSTOMER_KEY_TTL_MS)
            delivered_customers += 1 if delivered else 0
            orders += int(n)
        await pipe.execute()
        written = min(offset + chunk_size, len(rows))
        if written < len(rows):
            log.info(
                "writing customer features",
                extra={"as_of_ms": as_of_ms, "written": written, "total": len(rows)},
            )
    if not await redis_client.eval(_SET_MARKER, 1, MARKER_KEY, as_of, MARKER_TTL_MS):
        raise StaleRefreshError("a newer refresh completed while this one was being written")
    stats = CustomerRefreshStats(
        as_of_ms, len(rows), delivered_customers, orders, queried - started, time.perf_counter() - queried
    )
    log.info("customer features refreshed", extra=stats.__dict__)
    return stats


# --- the online read (prediction service) --------------------------------------------------------------
@dataclass(frozen=True)
class CustomerFeatures:
    """A customer's served values and the boundary they are as of (None: unknown, no refresh)."""

    orders_last_28_days: float
    mean_delivery_minutes_last_28_days: float
    as_of_ms: int | None

    def values(self) -> dict[str, float]:
        return {
            CUSTOMER_ORDERS_28D: self.orders_last_28_days,
            CUSTOMER_MEAN_DELIVERY_28D: self.mean_delivery_minutes_last_28_days,
        }


def queue_customer_read(pipe: Any, customer_id: str) -> int:
    """Queue ``HMGET cust:{C} orders mean_minutes as_of`` and ``GET eta:customers:as_of`` on a pipeline
    (redis-py's, or any with ``hmget`` and ``get``). Returns the number of replies queued
    (:data:`CUSTOMER_READ_REPLIES`); hand exactly those to :func:`parse_customer_read`."""
    pipe.hmget(customer_key(customer_id), _FIELDS)
    pipe.get(MARKER_KEY)
    return CUSTOMER_READ_REPLIES


def parse_customer_read(replies: Sequence[Any]) -> CustomerFeatures:
    """The customer's values from the two replies of :func:`queue_customer_read` (bytes or str)."""
    fields, raw_marker = replies
    marker = _int_or_none(raw_marker)
    if marker is None:
        return CustomerFeatures(math.nan, math.nan, None)
    orders, mean, raw_as_of = fields
    as_of = _int_or_none(raw_as_of)
    if as_of is None or as_of < marker or orders in (None, b"", ""):
        return CustomerFeatures(0.0, math.nan, marker)  # no order as of the latest refresh
    return CustomerFeatures(float(orders), _float_or_nan(mean), as_of)


async def read_customer_features(redis_client: Any, customer_id: str) -> CustomerFeatures:
    """One customer's features in one round trip (convenience over the two functions above)."""
    pipe = redis_client.pipeline(transaction=False)
    queue_customer_read(pipe, customer_id)
    return parse_customer_read(list(await pipe.execute()))


def _int_or_none(raw: Any) -> int | None:
    if raw is None or raw in (b"", ""):
        return None
    return int(raw)


def _float_or_nan(raw: Any) -> float:
    if raw is None or raw in (b"", ""):
        return math.nan
    return float(raw)


# --- the offline path (training sets): the same definition over archived events ------------------------
class CustomerOrderEvent(NamedTuple):
    """An archived event as the customer features need it (only order PLACED / DELIVERED count)."""

    kind: str  # driver | kitchen | order: anything but order is ignored (a driver's DELIVERED too)
    type: str  # PLACED | DELIVERED (others are ignored)
    order_id: str | None
    customer_id: str | None
    event_ms: int
    ingest_ms: int


class _Placed(NamedTuple):
    event_ms: int
    customer_id: str
    ingest_ms: int


class CustomerHistory:
    """Point-in-time customer features from archived order events, exactly as the batch SQL computes them.

    Feed events (any order, duplicates allowed) with :meth:`add` or the constructor; then
    :meth:`features_at` (as of the boundary at or before ``t``) or :meth:`features_as_of` (a boundary)."""

    def __init__(self, events: Iterable[CustomerOrderEvent] = ()) -> None:
        self._placed: dict[str, list[_Placed]] = defaultdict(list)  # order_id -> its PLACED events
        self._delivered: dict[str, list[tuple[int, int]]] = defaultdict(list)  # order -> (event, ingest)
        self._orders_of: dict[str, set[str]] = defaultdict(set)  # customer -> orders naming it
        for ev in events:
            self.add(ev)

    def add(self, ev: CustomerOrderEvent) -> None:
        if ev.kind != "order" or not ev.order_id:
            return
        if ev.type == "PLACED":
            if ev.customer_id:
                self._placed[ev.order_id].append(_Placed(ev.event_ms, ev.customer_id, ev.ingest_ms))
                self._orders_of[ev.customer_id].add(ev.order_id)
        elif ev.type == "DELIVERED":
            self._delivered[ev.order_id].append((ev.event_ms, ev.ingest_ms))

    def customers(self) -> list[str]:
        """Every customer named by a PLACED event (whatever the time)."""
        return sorted(self._orders_of)

    def features_at(self, customer_id: str, t_ms: int) -> dict[str, float]:
        """The values served at ``t_ms``: as of :func:`as_of_boundary` ``(t_ms)``."""
        return self.features_as_of(customer_id, as_of_boundary(t_ms))

    def features_as_of(self, customer_id: str, as_of_ms: int) -> dict[str, float]:
        """The values the batch refresh of boundary ``as_of_ms`` computes for the customer."""
        r, lo = as_of_ms, as_of_ms - CUSTOMER_HISTORY_MS
        orders = delivered = delivery_ms = 0
        for order_id in self._orders_of.get(customer_id, ()):
            known = [p for p in self._placed[order_id] if lo < p.event_ms <= r and p.ingest_ms <= r]
            if not known:
                continue
            first = min(known, key=lambda p: (p.event_ms, p.customer_id))
            if first.customer_id != customer_id:
                continue
            orders += 1
            deliveries = [e for e, i in self._delivered.get(order_id, ()) if e <= r and i <= r]
            if deliveries:
                delivered += 1
                delivery_ms += min(deliveries) - first.event_ms
        return customer_values_as_of(orders, delivered, delivery_ms)


# The order events a training set needs: every PLACED / DELIVERED of the orders that have a PLACED with a
# customer in (lo, hi] (event time), whatever their own times, so boundaries in [lo + 28 days, hi] are exact.
CUSTOMER_EVENTS_SQL = """
SELECT kind, type, order_id, customer_id,
       (extract(epoch FROM event_time) * 1000)::bigint AS event_ms,
       (extract(epoch FROM ingest_time) * 1000)::bigint AS ingest_ms
FROM events
WHERE kind = 'order' AND type IN ('PLACED', 'DELIVERED') AND order_id IN (
    SELECT order_id FROM events
    WHERE kind = 'order' AND type = 'PLACED' AND customer_id <> '' AND order_id <> ''
      AND event_time > $1 AND event_time <= $2
)
"""


async def load_customer_history(
    pool: asyncpg.Pool | asyncpg.Connection, *, since_ms: int, until_ms: int
) -> CustomerHistory:
    """A :class:`CustomerHistory` exact for every ``features_at(c, t)`` with ``since_ms <= t <= until_ms``
    (it reads the orders placed from 28 days before ``since_ms``'s boundary up to ``until_ms``)."""
    lo = as_of_boundary(since_ms) - CUSTOMER_HISTORY_MS
    rows = await pool.fetch(CUSTOMER_EVENTS_SQL, datetime_from_ms(lo), datetime_from_ms(until_ms))
    history = CustomerHistory(
        CustomerOrderEvent(kind, etype, oid, cid, int(ems), int(ims))
        for kind, etype, oid, cid, ems, ims in rows
    )
    log.info(
        "customer history loaded",
        extra={"events": len(rows), "customers": len(history.customers()), "since_ms": since_ms},
    )
    return history
