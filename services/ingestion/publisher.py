"""Hand validated events to Kafka and learn which ones the broker acknowledged in time.

The producer runs with ``acks=all`` (see :func:`eta_common.kafka.make_producer`): a record's future
resolves only when the broker acknowledged it, and fails or stays pending otherwise. So an event counts as
published only if its future resolved successfully before the deadline; anything else is reported back as
failed (answered UNAVAILABLE), never as published. A record whose acknowledgement came too late, or got
lost with a dropped connection, may still be on the topic: the client's retry then duplicates it, which
downstream dedup by event_id absorbs (the local broker has no idempotent producer).

One PRODUCER span per record (``send <topic>``, OpenTelemetry messaging conventions) runs from the
hand-off to the ack; its context travels in the record headers, so the consumer continues the trace.
When the caller's trace is not sampled, records carry the caller's context instead and no span is made.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.partitioner import DefaultPartitioner
from google.protobuf.timestamp_pb2 import Timestamp
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import INVALID_SPAN, Span, SpanKind, Status, StatusCode

from eta.v1 import events_pb2
from eta_common.kafka import Topics, event_kind, record_key
from eta_common.telemetry import headers_with_context
from ingestion import metrics
from ingestion.validation import event_id_of

__all__ = ["PendingBatch", "Publisher", "envelope_bytes", "envelope_suffix"]

log = logging.getLogger(__name__)
tracer = trace.get_tracer("eta.ingestion")


def envelope_suffix(ingest_time: Timestamp, ingested_by: str) -> bytes:
    """The serialized fields an EventEnvelope adds to its event (the same for a whole batch)."""
    return events_pb2.EventEnvelope(ingest_time=ingest_time, ingested_by=ingested_by).SerializeToString()


def envelope_bytes(event_bytes: bytes, suffix: bytes) -> bytes:
    """``EventEnvelope(event=..., ingest_time=..., ingested_by=...)`` serialized, without building the
    message: field 1 (the event, length-delimited) followed by the precomputed suffix (fields 2 and 3).
    Byte-identical to the message's own serialization (checked by a unit test)."""
    size = len(event_bytes)
    header = bytearray(b"\x0a")
    while size > 0x7F:
        header.append((size & 0x7F) | 0x80)
        size >>= 7
    header.append(size)
    return bytes(header) + event_bytes + suffix


@dataclass
class _Sent:
    index: int
    future: asyncio.Future[Any]
    span: Span


class PendingBatch:
    """Records handed to the producer; :meth:`wait` tells which were not acknowledged in time."""

    def __init__(self, sent: list[_Sent], failed: dict[int, str], *, started: float, deadline: float) -> None:
        self._sent = sent
        self.failed = failed  # index -> reason, for records that never reached the producer
        self._started = started
        self._deadline = deadline
        self._finished = False

    @property
    def in_flight(self) -> int:
        return len(self._sent)

    async def wait(self) -> dict[int, str]:
        """Wait (until the deadline) for the acks; returns index -> reason for every failed record."""
        loop = asyncio.get_running_loop()
        # Waiting for the newest pending record first usually finds the others done by then (one wait,
        # not one callback per record).
        for sent in reversed(self._sent):
            left = self._deadline - loop.time()
            if left <= 0:
                break
            if not sent.future.done():
                await asyncio.wait((sent.future,), timeout=left)
        failed = self.failed
        for sent in self._sent:
            future, span = sent.future, sent.span
            if not future.done():
                future.cancel()  # the record may still be delivered; nobody will wait for it
                _end_failed(span, TimeoutError("no broker acknowledgement before the deadline"))
                failed[sent.index] = "timeout"
                metrics.BROKER_ERRORS.labels("timeout").inc()
                continue
            error = asyncio.CancelledError("cancelled") if future.cancelled() else future.exception()
            if error is not None:
                _end_failed(span, error)
                failed[sent.index] = type(error).__name__
                metrics.BROKER_ERRORS.labels(type(error).__name__).inc()
                continue
            meta = future.result()
            span.set_attributes(
                {
                    "messaging.destination.partition.id": str(meta.partition),
                    "messaging.kafka.offset": meta.offset,
                }
            )
            span.end()
        self._finished = True
        metrics.PUBLISH_LATENCY.observe(loop.time() - self._started)
        if failed:
            log.warning(
                "events not acknowledged by the broker",
                extra={
                    "failed": len(failed),
                    "sent": len(self._sent),
                    "reasons": sorted(set(failed.values())),
                },
            )
        return failed

    def abandon(self) -> None:
        """The caller went away (cancelled): stop waiting, close the spans."""
        if self._finished:
            return
        self._finished = True
        for sent in self._sent:
            future = sent.future
            if not future.done():
                future.cancel()
                _end_failed(sent.span, asyncio.CancelledError("call cancelled before the broker ack"))
            elif future.cancelled():
                _end_failed(sent.span, asyncio.CancelledError("cancelled"))
            elif (error := future.exception()) is not None:
                _end_failed(sent.span, error)
            else:
                sent.span.end()


class _Partitions:
    """key -> partition exactly as the producer's DefaultPartitioner picks it (murmur2 of the key over the
    partition ids 0..n-1), memoised per topic and partition count: murmur2 is pure Python and keys repeat
    (a driver pings every few seconds). None while the topic's metadata is unknown (the producer then
    waits for it and picks itself)."""

    LIMIT = 100_000  # keys remembered per topic; the memo starts over beyond that

    def __init__(self, producer: AIOKafkaProducer) -> None:
        self._producer = producer
        self._memo: dict[tuple[str, int], dict[bytes, int]] = {}
        self._pick = DefaultPartitioner()

    def __call__(self, topic: str, key: bytes) -> int | None:
        partitions = self._producer.client.cluster.partitions_for_topic(topic)
        if not partitions:
            return None
        memo = self._memo.setdefault((topic, len(partitions)), {})
        partition = memo.get(key)
        if partition is None:
            if len(memo) >= self.LIMIT:
                memo.clear()
            ordered = sorted(partitions)
            partition = memo[key] = int(self._pick(key, ordered, ordered))
        return partition


class Publisher:
    def __init__(self, producer: AIOKafkaProducer, topics: Topics, *, replica: str) -> None:
        self._producer = producer
        self._topics = topics
        self._replica = replica
        self._partitions = _Partitions(producer)

    async def send(
        self,
        events: Sequence[events_pb2.Event],
        indices: Sequence[int],
        *,
        ingest_time: Timestamp,
        deadline: float,
        parent: otel_context.Context | None = None,
    ) -> PendingBatch:
        """Hand ``events[i] for i in indices`` to the producer, in order (per-key order on the topic).

        Returns without waiting for acks. A record that cannot be handed over before ``deadline`` (buffer
        full, no metadata) is failed at once, and so is every record after it.
        """
        loop = asyncio.get_running_loop()
        started = loop.time()
        suffix = envelope_suffix(ingest_time, self._replica)
        # A trace that is not sampled gets no per-record spans (they would not be recorded anyway): every
        # record carries the caller's context, so the consumer still continues the same (unsampled) trace.
        traced = trace.get_current_span(parent).is_recording()
        shared_headers = [] if traced else headers_with_context(parent)
        sent: list[_Sent] = []
        failed: dict[int, str] = {}
        current: tuple[int, Span] | None = None
        done = 0
        try:
            async with asyncio.timeout_at(deadline):
                for done, i in enumerate(indices):  # noqa: B007 - `done` is read after a timeout
                    event = events[i]
                    kind = event_kind(event)
                    assert kind is not None  # validated
                    topic = self._topics.for_kind(kind)
                    key = record_key(event)
                    if traced:
                        span = tracer.start_span(
                            f"send {topic}",
                            context=parent,
                            kind=SpanKind.PRODUCER,
                            attributes={
                                "messaging.system": "kafka",
                                "messaging.operation.type": "send",
                                "messaging.operation.name": "send",
                                "messaging.destination.name": topic,
                                "messaging.message.id": event_id_of(event),
                                "messaging.kafka.message.key": key.decode(errors="replace"),
                            },
                        )
                        headers = headers_with_context(trace.set_span_in_context(span))
                    else:
                        span = INVALID_SPAN
                        headers = shared_headers
                    current = (i, span)
                    try:
                        future = await self._producer.send(
                            topic,
                            envelope_bytes(event.SerializeToString(), suffix),
                            key=key,
                            partition=self._partitions(topic, key),
                            headers=headers,
                        )
                    except Exception as exc:  # e.g. KafkaTimeoutError (buffer full): this record failed
                        _end_failed(span, exc)
                        failed[i] = type(exc).__name__
                        metrics.BROKER_ERRORS.labels(type(exc).__name__).inc()
                    else:
                        sent.append(_Sent(i, future, span))
                    current = None
                done = len(indices)
        except TimeoutError:
            if current is not None:
                _end_failed(current[1], TimeoutError("producer did not take the record before the deadline"))
            for i in indices[done:]:
                failed[i] = "timeout"
            metrics.BROKER_ERRORS.labels("timeout").inc(len(indices) - done)
        except BaseException:
            if current is not None:
                _end_failed(current[1], asyncio.CancelledError("call cancelled"))
            PendingBatch(sent, failed, started=started, deadline=deadline).abandon()
            raise
        return PendingBatch(sent, failed, started=started, deadline=deadline)


def _end_failed(span: Span, exc: BaseException) -> None:
    span.record_exception(exc)
    span.set_status(Status(StatusCode.ERROR, str(exc) or type(exc).__name__))
    span.end()
