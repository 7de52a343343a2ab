"""Decode consumed records and apply their online effects to Redis (one pipeline per batch).

The Redis updates are idempotent (see :mod:`eta_common.online_store`), so applying a record twice —
after a crash, a rebalance or a broker retry duplicate — changes nothing. The archive rows for the batch
are returned to the caller, which hands them to the :class:`~aggregator.archiver.ArchiveWriter`.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from google.protobuf.message import DecodeError
from opentelemetry import trace
from opentelemetry.trace import Link, Span, SpanContext, SpanKind

from aggregator import metrics
from eta.v1 import events_pb2
from eta_common import features as F
from eta_common.db.archive import ArchivedEvent
from eta_common.online_store import DriverUpdate, OnlineStore, RestaurantUpdate, update_from_event
from eta_common.telemetry import extract_from_headers
from eta_common.timeutil import ms_from_timestamp, now_ms

__all__ = ["BatchProcessor"]

log = logging.getLogger(__name__)
tracer = trace.get_tracer("eta.aggregator")


@dataclass
class _Item:
    record: Any
    envelope: events_pb2.EventEnvelope
    span: Span
    update: RestaurantUpdate | DriverUpdate | None
    producer: SpanContext | None = None
    applied_ms: int | None = None


class BatchProcessor:
    def __init__(
        self, store: OnlineStore, *, allowed_lateness_ms: int, group_id: str = "eta-aggregator"
    ) -> None:
        self._store = store
        self._allowed_lateness_ms = allowed_lateness_ms
        self._group_id = group_id

    async def apply(self, records: Sequence[Any]) -> list[ArchivedEvent]:
        """Apply the batch's online effects; returns the rows to archive (one per decodable record)."""
        items = [item for item in (self._decode(record) for record in records) if item is not None]
        if not items:
            return []
        with tracer.start_as_current_span(
            "aggregator batch",
            # one batch serves many producers: link each sampled one (their traces continue in the process
            # spans); a sampled-out producer gets no link, so its trace leaves nothing downstream
            links=[
                Link(item.producer)
                for item in items
                if item.producer is not None and item.producer.is_valid and item.producer.trace_flags.sampled
            ],
            attributes={"messaging.system": "kafka", "messaging.batch.message_count": len(items)},
        ):
            try:
                await self._apply_online(items)
            finally:
                for item in items:
                    item.span.end()
        return [
            ArchivedEvent(
                item.envelope.event,
                ms_from_timestamp(item.envelope.ingest_time),
                item.record.topic,
                item.record.partition,
                item.record.offset,
                item.applied_ms,
            )
            for item in items
        ]

    def _decode(self, record: Any) -> _Item | None:
        envelope = events_pb2.EventEnvelope()
        try:
            envelope.ParseFromString(record.value or b"")
        except DecodeError:
            metrics.RECORDS.labels(record.topic, "undecodable").inc()
            log.error(
                "undecodable record skipped",
                extra={"topic": record.topic, "partition": record.partition, "offset": record.offset},
            )
            return None
        kind = envelope.event.WhichOneof("payload")
        if kind is None:
            metrics.RECORDS.labels(record.topic, "empty").inc()
            return None
        event = getattr(envelope.event, kind)
        parent = extract_from_headers(record.headers)
        span = tracer.start_span(
            f"{record.topic} process",
            context=parent,
            kind=SpanKind.CONSUMER,
            attributes={
                "messaging.system": "kafka",
                "messaging.operation.type": "process",
                "messaging.destination.name": record.topic,
                "messaging.destination.partition.id": str(record.partition),
                "messaging.kafka.offset": record.offset,
                "messaging.message.id": event.event_id,
                "messaging.consumer.group.name": self._group_id,
                # Time the record waited in Kafka, from the broker's append timestamp.
                "eta.kafka.queued_ms": max(0, now_ms() - int(record.timestamp)),
            },
        )
        update = update_from_event(envelope.event)
        ingest_ms = ms_from_timestamp(envelope.ingest_time)
        if update is not None and F.is_late(update.event_ms, ingest_ms, self._allowed_lateness_ms):
            metrics.LATE_EVENTS.labels(kind).inc()
            span.set_attribute("eta.late", True)
            update = None
        if update is not None and span.is_recording():
            ctx = span.get_span_context()
            update = dataclasses.replace(update, writer=f"{ctx.trace_id:032x}-{ctx.span_id:016x}")
        return _Item(record, envelope, span, update, trace.get_current_span(parent).get_span_context())

    async def _apply_online(self, items: list[_Item]) -> None:
        updates = [(item, item.update) for item in items if item.update is not None]
        for item in items:
            if item.update is None:
                metrics.RECORDS.labels(item.record.topic, "no_online_effect").inc()
        if not updates:
            return
        start_ns = time.time_ns()
        changed = await self._store.apply([u for _, u in updates], now_ms=start_ns // 1_000_000)
        end_ns = time.time_ns()
        metrics.BATCH_SECONDS.labels("redis").observe((end_ns - start_ns) / 1e9)
        applied = end_ns // 1_000_000
        for (item, update), did_change in zip(updates, changed, strict=True):
            item.applied_ms = applied
            if item.span.is_recording():
                # One pipeline served the whole batch: each record's Redis span shows that shared round trip.
                redis_span = tracer.start_span(
                    "redis apply features",
                    context=trace.set_span_in_context(item.span),
                    kind=SpanKind.CLIENT,
                    start_time=start_ns,
                    attributes={
                        "db.system": "redis",
                        "db.operation.name": "EVALSHA",
                        "eta.changed": bool(did_change),
                        "eta.entity": getattr(update, "restaurant_id", None)
                        or getattr(update, "driver_id", ""),
                        "db.operation.batch.size": len(updates),
                    },
                )
                redis_span.end(end_time=end_ns)
                item.span.set_attribute("eta.freshness.event_to_visible_ms", applied - update.event_ms)
            metrics.INGEST_TO_VISIBLE.observe(
                max(0, applied - ms_from_timestamp(item.envelope.ingest_time)) / 1000
            )
            metrics.RECORDS.labels(item.record.topic, "applied" if did_change else "no_change").inc()
