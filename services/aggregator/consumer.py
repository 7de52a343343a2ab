"""The consume loop: fetch a batch, store its effects, then commit its offsets (at-least-once,
made effectively-once by idempotent sinks)."""

from __future__ import annotations

import logging

from aiokafka import AIOKafkaConsumer

from aggregator.processor import BatchProcessor

log = logging.getLogger(__name__)


async def consume_forever(consumer: AIOKafkaConsumer, processor: BatchProcessor, *, max_batch: int) -> None:
    while True:
        batches = await consumer.getmany(timeout_ms=200, max_records=max_batch)
        records = [record for partition_records in batches.values() for record in partition_records]
        if not records:
            continue
        await processor.process(records)
        await consumer.commit()
