"""Decode consumed records and apply their online effects to Redis (one pipeline per batch).

The Redis updates are idempotent (see :mod:`eta_common.online_store`), so applying a record twice —
after a crash, a rebalance or a broker retry duplicate — changes nothing. The archive rows for the batch
are returned to the caller, which hands them to the :class:`~aggregator.archiver.ArchiveWriter`.

The hot path is per record, so it is kept lean: a record costs one protobuf parse, one tuple for its
update and one for its archive row. Spans are per record only for records whose producer was sampled
(decided from the raw ``traceparent`` header); metrics are counted per batch.

Work is split in two so the consume loop can overlap them: :meth:`BatchProcessor.prepare` (CPU: decode,
lateness, spans) and :meth:`BatchProcessor.apply_prepared` (I/O: the Redis round trip), see
:mod:`aggregator.consumer`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from google.protobuf.message import DecodeError
from opentelemetry import trace
from opentelemetry.trace import Link, Span, SpanKind
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError
from redis.exceptions import TimeoutError as RedisTimeoutError

from aggregator import metrics
from eta.v1 import events_pb2
from eta_common.db.archive import ArchivedEvent
from eta_common.event_facts import EventFacts, event_facts
from eta_common.features import ping_kept
from eta_common.online_store import DriverUpdate, OnlineStore, RestaurantUpdate, update_from_facts
from eta_common.telemetry import sampled_parent_from_headers
from eta_common.timeutil import now_ms

__all__ = ["BatchProcessor", "PreparedBatch"]

log = logging.getLogger(__name__)
tracer = trace.get_tracer("eta.aggregator")

Update = RestaurantUpdate | DriverUpdate
_parse = events_pb2.EventEnvelope.FromString
_LOCATION = events_pb2.DriverEvent.LOCATION


@dataclass
class _Traced:
    """A record whose producer was sampled: it gets a consumer span (child of the producer's)."""

    index: int  # position in PreparedBatch.updates, -1 when it has no online effect
    span: Span
    entity: str


@dataclass
class PreparedBatch:
    """A decoded batch, ready for its Redis round trip."""

    updates: list[Update] = field(default_factory=list)
    # archive rows without their applied time yet:
    # (event, facts, ingest_ms, topic, partition, offset, index in ``updates`` or -1)
    rows: list[tuple[Any, EventFacts, int, str, int, int, int]] = field(default_factory=list)
    traced: list[_Traced] = field(default_factory=list)
    outcomes: Counter[tuple[str, str]] = field(default_factory=Counter)
    late: Counter[str] = field(default_factory=Counter)
    batch_span: Span | None = None


class BatchProcessor:
    def __init__(
        self,
        store: OnlineStore,
        *,
        allowed_lateness_ms: int,
        group_id: str = "eta-aggregator",
        retry_seconds: float = 0.5,
    ) -> None:
        self._store = store
        self._retry_seconds = retry_seconds
        self._allowed_lateness_ms = allowed_lateness_ms
        self._group_id = group_id

    def prepare(self, records: Sequence[Any]) -> PreparedBatch:
        """Decode the records, drop late ones from the online path, start the spans of sampled ones."""
        batch = PreparedBatch()
        updates, rows, outcomes = batch.updates, batch.rows, batch.outcomes
        lateness = self._allowed_lateness_ms
        links: list[Link] = []
        for record in records:
            try:
                envelope = _parse(record.value or b"")
            except DecodeError:
                outcomes[(record.topic, "undecodable")] += 1
                log.error(
                    "undecodable record skipped",
                    extra={"topic": record.topic, "partition": record.partition, "offset": record.offset},
                )
                continue
            event = envelope.event
            if event.WhichOneof("payload") == "driver":
                # The keep rule first, from the two fields it reads (6 pings in 7 stop here): the same
                # decision as on the event's facts (features.ping_kept), without reading the rest.
                d = event.driver
                if d.type == _LOCATION:
                    t = d.event_time
                    if not ping_kept(d.driver_id, t.seconds * 1000 + t.nanos // 1_000_000):
                        outcomes[(record.topic, "ping_not_kept")] += 1  # neither applied nor archived
                        continue
            facts = event_facts(event)
            if facts is None:
                outcomes[(record.topic, "empty")] += 1
                continue
            update = update_from_facts(facts)
            it = envelope.ingest_time
            ingest_ms = it.seconds * 1000 + it.nanos // 1_000_000
            if update is None:
                outcomes[(record.topic, "no_online_effect")] += 1
            late = update is not None and ingest_ms - update.event_ms > lateness  # features.is_late, inlined
            if late:
                batch.late[facts.kind] += 1
                outcomes[(record.topic, "no_online_effect")] += 1
                update = None
            parent = sampled_parent_from_headers(record.headers) if record.headers else None
            if parent is not None:
                update = self._trace(batch, record, facts, update, late, parent, links)
            index = -1
            if update is not None:
                index = len(updates)
                updates.append(update)
            rows.append((event, facts, ingest_ms, record.topic, record.partition, record.offset, index))
        if rows:
            # one batch serves many producers: link each sampled one (their traces continue in the process
            # spans); a sampled-out producer gets no link, so its trace leaves nothing downstream
            batch.batch_span = tracer.start_span(
                "aggregator batch",
                links=links,
                attributes={"messaging.system": "kafka", "messaging.batch.message_count": len(rows)},
            )
        return batch

    def _trace(
        self,
        batch: PreparedBatch,
        record: Any,
        facts: EventFacts,
        update: Update | None,
        late: bool,
        parent: Any,
        links: list[Link],
    ) -> Update | None:
        """Start the consumer span of a record whose producer was sampled; returns its update, carrying
        the span as the feature's provenance (the caller appends it to the batch next)."""
        links.append(Link(trace.get_current_span(parent).get_span_context()))
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
                "messaging.message.id": facts.event_id,
                "messaging.consumer.group.name": self._group_id,
                # Time the record waited in Kafka, from the broker's append timestamp.
                "eta.kafka.queued_ms": max(0, now_ms() - int(record.timestamp)),
            },
        )
        if late:
            span.set_attribute("eta.late", True)
        index, entity = -1, ""
        if update is not None:
            if span.is_recording():
                ctx = span.get_span_context()
                update = update._replace(writer=f"{ctx.trace_id:032x}-{ctx.span_id:016x}")
            entity = update.restaurant_id if isinstance(update, RestaurantUpdate) else update.driver_id
            index = len(batch.updates)
        batch.traced.append(_Traced(index, span, entity))
        return update

    async def apply_prepared(self, batch: PreparedBatch) -> list[ArchivedEvent]:
        """The Redis round trip of a prepared batch, then its metrics and spans; returns its archive rows."""
        if batch.batch_span is None:
            self._count(batch, [], [])
            return []
        changed: list[int] = []
        applied: int | None = None
        try:
            with trace.use_span(batch.batch_span, end_on_exit=True):
                if batch.updates:
                    changed, start_ns = await self._apply_until_done(batch.updates)
                    end_ns = time.time_ns()
                    applied = end_ns // 1_000_000
                    metrics.BATCH_SECONDS.labels("redis").observe((end_ns - start_ns) / 1e9)
                    self._end_traced(batch, changed, applied, start_ns, end_ns)
        finally:
            for traced in batch.traced:
                traced.span.end()
        applied_rows = [row for row in batch.rows if row[6] >= 0]  # in the order of batch.updates
        self._count(batch, [row[3] for row in applied_rows], changed)
        if applied is not None:
            metrics.INGEST_TO_VISIBLE.observe_many(max(0, applied - row[2]) / 1000 for row in applied_rows)
        new = tuple.__new__  # every field given: the same instance as ArchivedEvent(...), without its __new__
        return [
            new(
                ArchivedEvent,
                (event, ingest_ms, topic, partition, offset, None if index < 0 else applied, facts),
            )
            for event, facts, ingest_ms, topic, partition, offset, index in batch.rows
        ]

    async def _apply_until_done(self, updates: list[Update]) -> tuple[list[int], int]:
        """Apply to Redis, waiting out an outage (retrying with backoff: the updates are idempotent)
        rather than failing the consume loop. Returns the changed flags and the successful attempt's
        start time (ns)."""
        attempt = 0
        while True:
            start_ns = time.time_ns()
            try:
                return await self._store.apply(updates, now_ms=start_ns // 1_000_000), start_ns
            except (RedisConnectionError, RedisTimeoutError, NoScriptError, OSError) as exc:
                # NoScriptError: the store reloads its scripts, but a Redis still restarting may lose
                # them again; like an outage, it is waited out, never the end of the consume loop
                attempt += 1
                metrics.REDIS_RETRIES.inc()
                log.warning(
                    "online store unavailable; retrying the batch (offsets not committed)",
                    extra={"attempt": attempt, "error": str(exc), "updates": len(updates)},
                )
                await asyncio.sleep(min(self._retry_seconds * attempt, 5.0))

    def _end_traced(
        self, batch: PreparedBatch, changed: list[int], applied: int, start_ns: int, end_ns: int
    ) -> None:
        for traced in batch.traced:
            if traced.index < 0 or not traced.span.is_recording():
                continue
            update = batch.updates[traced.index]
            # One pipeline served the whole batch: each record's Redis span shows that shared round trip.
            redis_span = tracer.start_span(
                "redis apply features",
                context=trace.set_span_in_context(traced.span),
                kind=SpanKind.CLIENT,
                start_time=start_ns,
                attributes={
                    "db.system": "redis",
                    "db.operation.name": "EVALSHA",
                    "eta.changed": bool(changed[traced.index]),
                    "eta.entity": traced.entity,
                    "db.operation.batch.size": len(batch.updates),
                },
            )
            redis_span.end(end_time=end_ns)
            traced.span.set_attribute("eta.freshness.event_to_visible_ms", applied - update.event_ms)

    @staticmethod
    def _count(batch: PreparedBatch, topics: list[str], changed: list[int]) -> None:
        """Metrics of the batch; ``topics`` and ``changed`` are per applied update."""
        outcomes = batch.outcomes
        if changed:
            for topic, did_change in zip(topics, changed, strict=True):
                outcomes[(topic, "applied" if did_change else "no_change")] += 1
        for (topic, outcome), count in outcomes.items():
            metrics.RECORDS.labels(topic, outcome).inc(count)
        for kind, count in batch.late.items():
            metrics.LATE_EVENTS.labels(kind).inc(count)
