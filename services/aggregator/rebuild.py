"""Rebuild the online store from the event archive (after Redis lost its data, or on demand).

Replays archived events in ingest order through the same idempotent updates the live consumer uses,
with the same lateness rule, so the rebuilt features equal the ones lost. Safe while the consumer runs:
every update is idempotent and state only moves forward in event time. Usage::

    eta-aggregator rebuild [--since-hours 24]

The aggregator also rebuilds by itself when it finds the online store uninitialized (empty or flushed
Redis) at start-up or while running.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import asyncpg

from aggregator import metrics
from eta.v1 import events_pb2
from eta_common import features as F
from eta_common.online_store import DriverUpdate, OnlineStore, RestaurantUpdate, update_from_event
from eta_common.timeutil import datetime_from_ms, now_ms

__all__ = ["RebuildStats", "rebuild_online"]

log = logging.getLogger(__name__)

_QUERY = """
SELECT payload, (extract(epoch FROM ingest_time) * 1000)::bigint AS ingest_ms,
       (extract(epoch FROM applied_at) * 1000)::bigint AS applied_ms
FROM events WHERE ingest_time >= $1 ORDER BY ingest_time, event_id
"""


@dataclass(frozen=True)
class RebuildStats:
    events: int
    applied: int
    late: int
    seconds: float


async def rebuild_online(
    pool: asyncpg.Pool,
    store: OnlineStore,
    *,
    allowed_lateness_ms: int,
    since_ms: int,
    batch_size: int = 2000,
    trigger: str = "command",
) -> RebuildStats:
    started = time.monotonic()
    total = applied = late = 0
    pending: list[RestaurantUpdate | DriverUpdate] = []
    batch_now = 0

    async def flush() -> None:
        nonlocal applied
        if pending:
            # "updated at" = when the original update became visible, so ages stay truthful after a rebuild
            await store.apply(pending, now_ms=batch_now)
            applied += len(pending)
            pending.clear()

    token = await store.begin_rebuild()
    async with pool.acquire() as conn, conn.transaction():
        async for row in conn.cursor(_QUERY, datetime_from_ms(since_ms), prefetch=batch_size):
            total += 1
            event = events_pb2.Event()
            event.ParseFromString(row["payload"])
            update = update_from_event(event)
            if update is None:
                continue
            if (
                isinstance(update, DriverUpdate)
                and update.event_type == "LOCATION"
                and not F.ping_kept(update.driver_id, update.event_ms)
            ):
                continue  # archived before the keep rule: the offline builder skips it too
            ingest_ms = int(row["ingest_ms"])
            if F.is_late(update.event_ms, ingest_ms, allowed_lateness_ms):
                late += 1
                continue
            batch_now = max(batch_now, int(row["applied_ms"] or ingest_ms))
            pending.append(update)
            if len(pending) >= batch_size:
                await flush()
                log.info("rebuilding online store", extra={"events": total, "applied": applied})
    await flush()
    stats = RebuildStats(total, applied, late, time.monotonic() - started)
    if not await store.finish_rebuild(token, now_ms=now_ms()):
        # flushed (or rebuilt by another process) while this one ran: its result may be incomplete;
        # the store stays uninitialized and the next check rebuilds it again
        log.warning("online store changed during the rebuild; not marked initialized", extra=stats.__dict__)
        return stats
    metrics.REBUILDS.labels(trigger).inc()
    log.info("online store rebuilt", extra={"trigger": trigger, **stats.__dict__})
    return stats
