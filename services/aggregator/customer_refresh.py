"""The batch refresh of the per-customer history features (:mod:`eta_common.customer_features`).

Every aggregator replica runs :func:`refresh_loop`: at start-up it refreshes when the latest complete
refresh in Redis is older than the boundary due now, then again ``AGGREGATOR_CUSTOMER_REFRESH_DELAY_SECONDS``
after every boundary (hourly). A Redis lock (``SET NX EX``) lets one replica do the work; the others see
the lock, then the new marker, and skip. A failed refresh is retried after
``AGGREGATOR_CUSTOMER_REFRESH_RETRY_SECONDS``; it never stops the service. By hand::

    eta-aggregator refresh-customer-features [--as-of-ms MS]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
import sys
import uuid
from dataclasses import dataclass

import asyncpg
import redis.asyncio as aioredis
from prometheus_client import Counter, Gauge
from redis.exceptions import RedisError

from aggregator.config import AggregatorSettings
from eta_common import customer_features as CF
from eta_common.db.migrate import apply_migrations
from eta_common.redis_client import redis_from_url
from eta_common.timeutil import datetime_from_ms, now_ms

__all__ = ["LOCK_KEY", "RefreshOutcome", "add_arguments", "refresh_if_due", "refresh_loop", "run_refresh"]

log = logging.getLogger(__name__)

LOCK_KEY = "eta:customers:refresh_lock"
# Deletes the lock only if this holder still owns it (it may have expired and been taken since).
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

REFRESHES = Counter(
    "eta_aggregator_customer_refreshes_total",
    "Customer-feature refresh attempts by outcome (refreshed, up_to_date, locked, failed)",
    ["outcome"],
)
REFRESHED_AS_OF = Gauge(
    "eta_aggregator_customer_features_as_of_seconds",
    "Boundary (Unix seconds) of the last customer-feature refresh this replica completed",
)


@dataclass(frozen=True)
class RefreshOutcome:
    outcome: str  # refreshed | up_to_date | locked
    due_ms: int
    marker_ms: int | None
    stats: CF.CustomerRefreshStats | None = None


async def _acquire(redis_client: aioredis.Redis, lock_seconds: int) -> str | None:
    token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    if await redis_client.set(LOCK_KEY, token, nx=True, ex=lock_seconds):
        return token
    return None


async def _release(redis_client: aioredis.Redis, token: str) -> None:
    await redis_client.eval(_RELEASE, 1, LOCK_KEY, token)


async def refresh_if_due(
    pool: asyncpg.Pool,
    redis_client: aioredis.Redis,
    *,
    due_ms: int,
    lock_seconds: int,
    trigger: str,
    force: bool = False,
) -> RefreshOutcome:
    """Refresh as of boundary ``due_ms`` unless a refresh at or after it completed (``force``: unless one
    after it completed — recompute the same boundary), or another process holds the lock."""

    def done(marker: int | None) -> bool:
        return marker is not None and (marker > due_ms or (marker == due_ms and not force))

    marker = await CF.read_marker(redis_client)
    if done(marker):
        return RefreshOutcome("up_to_date", due_ms, marker)
    token = await _acquire(redis_client, lock_seconds)
    if token is None:
        log.info("customer refresh held by another process", extra={"due_ms": due_ms, "trigger": trigger})
        return RefreshOutcome("locked", due_ms, marker)
    try:
        marker = await CF.read_marker(redis_client)  # it may have completed while we took the lock
        if done(marker):
            return RefreshOutcome("up_to_date", due_ms, marker)
        log.info(
            "refreshing customer features",
            extra={"due_ms": due_ms, "as_of": datetime_from_ms(due_ms).isoformat(), "marker_ms": marker,
                   "trigger": trigger},
        )  # fmt: skip
        stats = await CF.refresh_customer_features(pool, redis_client, due_ms)
        REFRESHED_AS_OF.set(due_ms / 1000)
        return RefreshOutcome("refreshed", due_ms, due_ms, stats)
    finally:
        await _release(redis_client, token)


def due_boundary(at_ms: int, delay_ms: int) -> int:
    """The boundary that should be refreshed by ``at_ms``: the last one at least ``delay_ms`` old."""
    return CF.as_of_boundary(at_ms - delay_ms)


async def refresh_loop(
    pool: asyncpg.Pool, redis_client: aioredis.Redis, settings: AggregatorSettings
) -> None:
    """Forever: refresh when due (start-up included), then sleep until the next boundary + delay."""
    delay_ms = int(settings.customer_refresh_delay_seconds * 1000)
    retry_ms = int(settings.customer_refresh_retry_seconds * 1000)
    trigger = "startup"
    while True:
        due = due_boundary(now_ms(), delay_ms)
        try:
            result = await refresh_if_due(
                pool, redis_client, due_ms=due, lock_seconds=settings.customer_refresh_lock_seconds,
                trigger=trigger,
            )  # fmt: skip
            outcome = result.outcome
        except (asyncpg.PostgresError, RedisError, OSError, CF.StaleRefreshError) as exc:
            outcome = "failed"
            log.warning("customer refresh failed; will retry", extra={"due_ms": due, "error": repr(exc)})
        REFRESHES.labels(outcome).inc()
        next_at = due + CF.CUSTOMER_REFRESH_MS + delay_ms
        wait_ms = next_at - now_ms()
        if outcome in ("locked", "failed"):
            wait_ms = min(wait_ms, retry_ms)
        trigger = "schedule"
        await asyncio.sleep(max(wait_ms, 0) / 1000)


# --- eta-aggregator refresh-customer-features ------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Compute the per-customer history features (customer_orders_last_28_days, "
        "customer_mean_delivery_minutes_last_28_days) of every customer from the PostgreSQL archive "
        "($DATABASE_URL) as of one hourly refresh boundary and write them to Redis ($REDIS_URL): the "
        "cust:{<customer_id>} hashes, then the eta:customers:as_of marker. Takes the same lock as the "
        "aggregators' scheduled refresh (AGGREGATOR_CUSTOMER_REFRESH). Definition: "
        "eta_common/customer_features.py. Exit code 0 when refreshed or when nothing needed doing (the "
        "store already holds a refresh as of that boundary or a later one), 1 when another process holds "
        "the lock or a newer refresh completed meanwhile."
    )
    parser.add_argument(
        "--as-of-ms",
        type=int,
        default=None,
        help="Unix milliseconds; rounded down to its hourly boundary (default: the latest boundary, now). "
        "Nothing is done when the store already holds a refresh as of that boundary or a later one.",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="recompute even when the store already holds a refresh as of exactly that boundary "
        "(e.g. after archiving events that arrived late); never one older than the latest",
    )


async def run_refresh(settings: AggregatorSettings, args: argparse.Namespace) -> int:
    as_of = CF.as_of_boundary(now_ms() if args.as_of_ms is None else int(args.as_of_ms))
    await apply_migrations(settings.database.url)
    pool = await asyncpg.create_pool(settings.database.url, min_size=1, max_size=2)
    redis_client = redis_from_url(settings.redis.url, decode_responses=False)
    try:
        result = await refresh_if_due(
            pool,
            redis_client,
            due_ms=as_of,
            lock_seconds=settings.customer_refresh_lock_seconds,
            trigger="command",
            force=args.force,
        )
    except CF.StaleRefreshError as exc:
        sys.stderr.write(f"not refreshed: {exc}\n")
        return 1
    finally:
        await pool.close()
        await redis_client.aclose()
    when = datetime_from_ms(as_of).isoformat()
    if result.outcome == "locked":
        sys.stderr.write(f"not refreshed: another process holds {LOCK_KEY}; try again later\n")
        return 1
    if result.outcome == "up_to_date":
        sys.stdout.write(
            f"up to date: the store already holds a refresh as of {result.marker_ms} (≥ {when})\n"
        )
        return 0
    sys.stdout.write(f"refreshed customer features as of {as_of} ({when}): {result.stats}\n")
    return 0
