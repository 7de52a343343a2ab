"""The consume loop: fetch a batch, apply it online, hand it to the archive writer (which commits its
offsets once archived). At-least-once delivery, made effectively-once by idempotent sinks."""

from __future__ import annotations

import logging
from typing import Any

from aiokafka import AIOKafkaConsumer
from aiokafka.structs import OffsetAndMetadata

from aggregator.archiver import ArchiveWriter
from aggregator.processor import BatchProcessor

log = logging.getLogger(__name__)


def next_offsets(batches: dict[Any, list[Any]]) -> dict[Any, OffsetAndMetadata]:
    """The offsets to commit after a batch: one past the last record of each partition."""
    return {tp: OffsetAndMetadata(records[-1].offset + 1, "") for tp, records in batches.items() if records}


async def consume_forever(
    consumer: AIOKafkaConsumer, processor: BatchProcessor, archiver: ArchiveWriter, *, max_batch: int
) -> None:
    while True:
        batches = await consumer.getmany(timeout_ms=200, max_records=max_batch)
        records = [record for partition_records in batches.values() for record in partition_records]
        if not records:
            continue
        rows = await processor.apply(records)
        await archiver.put(rows, next_offsets(batches))
