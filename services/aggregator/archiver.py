"""Archive writer: batches go to PostgreSQL in order, then their Kafka offsets are committed.

Decoupled from the online path through a bounded queue: during a PostgreSQL outage online features keep
flowing while the archive lags (retrying with backoff); once the queue is full the consumer waits
(backpressure) instead of buffering without bound. Offsets are committed only after a batch is
archived, so a crash at any point replays the unarchived tail — and both sinks are idempotent.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import asyncpg
from opentelemetry import trace
from opentelemetry.trace import SpanKind

from aggregator import metrics
from eta_common.db.archive import ArchivedEvent, archive_events

__all__ = ["ArchiveWriter"]

log = logging.getLogger(__name__)
tracer = trace.get_tracer("eta.aggregator")

Offsets = Mapping[Any, int]
CommitFn = Callable[[Offsets], Awaitable[None]]


class ArchiveWriter:
    def __init__(
        self,
        pool: asyncpg.Pool,
        commit: CommitFn,
        *,
        max_pending_batches: int = 64,
        retry_seconds: float = 0.5,
    ) -> None:
        self._pool = pool
        self._commit = commit
        self._queue: asyncio.Queue[tuple[Sequence[ArchivedEvent], Offsets]] = asyncio.Queue(
            max_pending_batches
        )
        self._retry_seconds = retry_seconds

    async def put(self, rows: Sequence[ArchivedEvent], offsets: Offsets) -> None:
        """Queue a processed batch; waits while ``max_pending_batches`` are already pending."""
        await self._queue.put((rows, offsets))
        metrics.ARCHIVE_PENDING.set(self._queue.qsize())

    async def drain(self, timeout: float) -> bool:
        """Wait until every queued batch is archived and committed (on shutdown)."""
        try:
            await asyncio.wait_for(self._queue.join(), timeout)
        except TimeoutError:
            return False
        return True

    async def run(self) -> None:
        while True:
            rows, offsets = await self._queue.get()
            try:
                await self._archive(rows)
                try:
                    await self._commit(offsets)
                except Exception as exc:  # e.g. partitions revoked by a rebalance: the new owner replays
                    log.warning("offset commit failed; records will be replayed", extra={"error": str(exc)})
            finally:
                self._queue.task_done()
                metrics.ARCHIVE_PENDING.set(self._queue.qsize())

    async def _archive(self, rows: Sequence[ArchivedEvent]) -> None:
        attempt = 0
        while rows:
            started = time.perf_counter()
            try:
                with tracer.start_as_current_span(
                    "postgres archive events",
                    kind=SpanKind.CLIENT,
                    attributes={
                        "db.system": "postgresql",
                        "db.operation.name": "INSERT",
                        "db.collection.name": "events",
                        "db.operation.batch.size": len(rows),
                    },
                ):
                    inserted = await archive_events(self._pool, rows)
                metrics.BATCH_SECONDS.labels("postgres").observe(time.perf_counter() - started)
                metrics.ARCHIVED.inc(inserted)
                return
            except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
                attempt += 1
                metrics.ARCHIVE_RETRIES.inc()
                log.warning(
                    "archive failed; retrying (offsets not committed)",
                    extra={"attempt": attempt, "error": str(exc)},
                )
                await asyncio.sleep(min(self._retry_seconds * attempt, 5.0))
