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

log = logging.getLogger(__name__)


def next_offsets(batches: dict[Any, list[Any]]) -> dict[Any, OffsetAndMetadata]:
    """The offsets to commit after a batch: one past the last record of each partition."""
    return {tp: OffsetAndMetadata(records[-1].offset + 1, "") for tp, records in batches.items() if records}


async def _finish(
    processor: BatchProcessor,
    archiver: ArchiveWriter,
    batch: PreparedBatch,
    offsets: dict[Any, OffsetAndMetadata],
) -> None:
    rows = await processor.apply_prepared(batch)
    await archiver.put(rows, offsets)


async def consume_forever(
    consumer: AIOKafkaConsumer, processor: BatchProcessor, archiver: ArchiveWriter, *, max_batch: int
) -> None:
    in_flight: asyncio.Task[None] | None = None
    try:
        while True:
            batches = await consumer.getmany(timeout_ms=200, max_records=max_batch)
            records = [record for partition_records in batches.values() for record in partition_records]
            if not records:
                if in_flight is not None and in_flight.done():
                    in_flight.result()  # surfaces a failure of the last batch now, not at the next one
                    in_flight = None
                continue
            prepared = processor.prepare(records)
            if in_flight is not None:
                await in_flight  # the previous batch is in Redis and queued for the archive: keep order
            in_flight = asyncio.create_task(_finish(processor, archiver, prepared, next_offsets(batches)))
    finally:
        if in_flight is not None and not in_flight.done():
            # Shutdown or a failure: let the last batch land (its offsets commit once archived).
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.shield(in_flight)
