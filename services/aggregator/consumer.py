"""The consume loop: fetch a batch, apply it online, hand it to the archive writer (which commits its
offsets once archived). At-least-once delivery, made effectively-once by idempotent sinks.

Two batches are in flight at most: while batch N's Redis round trip runs, batch N+1 is fetched and
decoded (CPU work that would otherwise wait on Redis). Batches still reach Redis and the archive strictly
in order: N+1's round trip starts only after N's has finished and N was queued for archiving.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from aiokafka import AIOKafkaConsumer
from aiokafka.structs import OffsetAndMetadata

from aggregator.archiver import ArchiveWriter
from aggregator.processor import BatchProcessor, PreparedBatch
from eta_common.timeutil import now_ms

log = logging.getLogger(__name__)


class Progress:
    """When this consumer last had every record it was fetched visible in Redis: a fetch that came back
    short of ``max_batch`` (or empty) saw the end of every assigned partition's log at its start, so once
    that batch is applied, every event acked before then is visible. The row maintenance publishes it
    (``eta:aggregators``); readers take the oldest among live aggregators as the instant the online
    store was known to be current, so a quiet restaurant's exact, unchanged count is not called stale."""

    def __init__(self) -> None:
        self.caught_up_ms: int | None = None

    def mark(self, at_ms: int) -> None:
        if self.caught_up_ms is None or at_ms > self.caught_up_ms:
            self.caught_up_ms = at_ms


def next_offsets(batches: dict[Any, list[Any]]) -> dict[Any, OffsetAndMetadata]:
    """The offsets to commit after a batch: one past the last record of each partition."""
    return {tp: OffsetAndMetadata(records[-1].offset + 1, "") for tp, records in batches.items() if records}


async def _finish(
    processor: BatchProcessor,
    archiver: ArchiveWriter,
    batch: PreparedBatch,
    offsets: dict[Any, OffsetAndMetadata],
    caught_up: tuple[Progress, int] | None = None,
) -> None:
    rows = await processor.apply_prepared(batch)
    if caught_up is not None:
        progress, fetched_ms = caught_up
        progress.mark(fetched_ms)
    await archiver.put(rows, offsets)


async def consume_forever(
    consumer: AIOKafkaConsumer,
    processor: BatchProcessor,
    archiver: ArchiveWriter,
    *,
    max_batch: int,
    progress: Progress | None = None,
) -> None:
    in_flight: asyncio.Task[None] | None = None
    try:
        while True:
            fetched_ms = now_ms()
            batches = await consumer.getmany(timeout_ms=200, max_records=max_batch)
            records = [record for partition_records in batches.values() for record in partition_records]
            if not records:
                if in_flight is not None and in_flight.done():
                    in_flight.result()  # surfaces a failure of the last batch now, not at the next one
                    in_flight = None
                if in_flight is None and progress is not None and consumer.assignment():
                    progress.mark(fetched_ms)  # nothing to fetch, nothing pending: current as of the fetch
                continue
            prepared = processor.prepare(records)
            if in_flight is not None:
                await in_flight  # the previous batch is in Redis and queued for the archive: keep order
            short = progress is not None and len(records) < max_batch
            caught_up = (progress, fetched_ms) if short and progress is not None else None
            in_flight = asyncio.create_task(
                _finish(processor, archiver, prepared, next_offsets(batches), caught_up)
            )
    finally:
        if in_flight is not None and not in_flight.done():
            # Shutdown or a failure: let the last batch land (its offsets commit once archived).
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.shield(in_flight)
