"""IngestionService servicer: validate → dedup → publish to Kafka → per-event status."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from typing import Any

import grpc
from aiokafka import AIOKafkaProducer
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from eta.v1 import events_pb2, ingestion_pb2, ingestion_pb2_grpc
from eta_common.grpc_errors import abort_bad_request
from eta_common.kafka import Topics, event_kind, record_key
from eta_common.telemetry import headers_with_context
from eta_common.timeutil import now_ms, timestamp_from_ms
from ingestion import metrics
from ingestion.dedup import DedupStore
from ingestion.validation import ValidationLimits, event_id_of, validate_event

log = logging.getLogger(__name__)
tracer = trace.get_tracer("eta.ingestion")
Result = ingestion_pb2.EventResult


class IngestionServicer(ingestion_pb2_grpc.IngestionServiceServicer):
    def __init__(
        self,
        *,
        producer: AIOKafkaProducer,
        dedup: DedupStore,
        topics: Topics,
        limits: ValidationLimits,
        max_batch: int,
        publish_timeout_seconds: float,
    ) -> None:
        self._producer = producer
        self._dedup = dedup
        self._topics = topics
        self._limits = limits
        self._max_batch = max_batch
        self._publish_timeout = publish_timeout_seconds
        self._replica = socket.gethostname()

    async def PublishEvents(
        self, request: ingestion_pb2.PublishEventsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> ingestion_pb2.PublishEventsResponse:
        events = request.events
        if len(events) > self._max_batch:
            await abort_bad_request(
                context, [("events", f"at most {self._max_batch} events per call, got {len(events)}")]
            )
        now = now_ms()
        results = [Result(index=i, event_id=event_id_of(ev)) for i, ev in enumerate(events)]
        valid: list[int] = []
        for i, event in enumerate(events):
            violations = validate_event(event, now_ms=now, limits=self._limits)
            if violations:
                results[i].status = Result.REJECTED
                results[i].violations.extend(
                    ingestion_pb2.FieldViolation(field=f, description=d) for f, d in violations
                )
            else:
                valid.append(i)
        claimed = await self._dedup.claim([results[i].event_id for i in valid])
        to_publish = []
        for i, is_new in zip(valid, claimed, strict=True):
            if is_new:
                to_publish.append(i)
            else:
                results[i].status = Result.DUPLICATE
        failed = await self._publish(events, to_publish, now, context)
        for i in to_publish:
            results[i].status = Result.UNAVAILABLE if i in failed else Result.ACCEPTED
        if failed:
            await self._dedup.release([results[i].event_id for i in failed])
        response = ingestion_pb2.PublishEventsResponse(results=results)
        for r, ev in zip(results, events, strict=True):
            metrics.EVENTS.labels(event_kind(ev) or "none", Result.Status.Name(r.status).lower()).inc()
        response.accepted = sum(r.status == Result.ACCEPTED for r in results)
        response.duplicates = sum(r.status == Result.DUPLICATE for r in results)
        response.rejected = sum(r.status == Result.REJECTED for r in results)
        response.unavailable = len(failed)
        span = trace.get_current_span()
        span.set_attributes(
            {
                "eta.events.count": len(events),
                "eta.events.accepted": response.accepted,
                "eta.events.rejected": response.rejected,
                "eta.events.duplicates": response.duplicates,
                "eta.events.unavailable": response.unavailable,
            }
        )
        return response

    async def _publish(
        self, events: Any, indices: list[int], ingest_ms: int, context: grpc.aio.ServicerContext[Any, Any]
    ) -> set[int]:
        """Send the events; returns the indices that were not acknowledged in time."""
        if not indices:
            return set()
        timeout = self._publish_timeout
        remaining = context.time_remaining()
        if remaining is not None:
            timeout = max(0.0, min(timeout, remaining - 0.05))
        ingest_ts = timestamp_from_ms(ingest_ms)
        pending: dict[asyncio.Future[Any], tuple[int, Span]] = {}
        failed: set[int] = set()
        started = time.perf_counter()
        for i in indices:
            event: events_pb2.Event = events[i]
            kind = event_kind(event)
            assert kind is not None
            topic = self._topics.for_kind(kind)
            span = tracer.start_span(
                f"{topic} publish",
                kind=SpanKind.PRODUCER,
                attributes={
                    "messaging.system": "kafka",
                    "messaging.operation.type": "publish",
                    "messaging.destination.name": topic,
                    "messaging.message.id": event_id_of(event),
                    "messaging.kafka.message.key": record_key(event).decode(errors="replace"),
                },
            )
            envelope = events_pb2.EventEnvelope(event=event, ingest_time=ingest_ts, ingested_by=self._replica)
            try:
                future = await asyncio.wait_for(
                    self._producer.send(
                        topic,
                        envelope.SerializeToString(),
                        key=record_key(event),
                        headers=headers_with_context(trace.set_span_in_context(span)),
                    ),
                    timeout=max(timeout - (time.perf_counter() - started), 0.001),
                )
            except Exception as exc:  # broker unreachable / buffer full / timeout: retryable for the client
                _end_failed(span, exc)
                failed.add(i)
                metrics.BROKER_ERRORS.labels(type(exc).__name__).inc()
                continue
            pending[future] = (i, span)
        metrics.IN_FLIGHT.inc(len(pending))
        try:
            if pending:
                left = max(timeout - (time.perf_counter() - started), 0.001)
                done, not_done = await asyncio.wait(pending.keys(), timeout=left)
                for future in not_done:
                    future.cancel()
                    i, span = pending[future]
                    _end_failed(span, TimeoutError("no broker ack within the deadline"))
                    failed.add(i)
                    metrics.BROKER_ERRORS.labels("timeout").inc()
                for future in done:
                    i, span = pending[future]
                    error = future.exception()
                    if error is not None:
                        _end_failed(span, error)
                        failed.add(i)
                        metrics.BROKER_ERRORS.labels(type(error).__name__).inc()
                    else:
                        meta = future.result()
                        span.set_attributes(
                            {
                                "messaging.destination.partition.id": str(meta.partition),
                                "messaging.kafka.offset": meta.offset,
                            }
                        )
                        span.end()
        finally:
            metrics.IN_FLIGHT.dec(len(pending))
            metrics.PUBLISH_LATENCY.observe(time.perf_counter() - started)
        if failed:
            log.warning(
                "events not acknowledged by the broker", extra={"failed": len(failed), "sent": len(indices)}
            )
        return failed


def _end_failed(span: Span, exc: BaseException) -> None:
    span.record_exception(exc)
    span.set_status(Status(StatusCode.ERROR, str(exc) or type(exc).__name__))
    span.end()
