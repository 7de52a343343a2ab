"""One batch of events from request to answer: validate → dedup claim → hand to Kafka → wait for acks →
settle the dedup claims → one status per event.

Split in two steps so a stream can pipeline its chunks while keeping them in order on the topic:
:meth:`Ingestor.prepare` runs up to the hand-off to the producer (called in chunk order), and
:meth:`Ingestor.complete` waits for the acks (several chunks at once). The same two steps serve the unary
call, back to back.

Rules that keep "ACCEPTED" honest:

- ACCEPTED only for a record whose broker ack arrived before the deadline.
- DUPLICATE only when an earlier send was ACCEPTED (Redis state ``a``, see :mod:`ingestion.dedup`); an
  event_id that another request is still publishing is answered UNAVAILABLE. A second copy of an event_id
  inside one request shares the fate of the first copy: DUPLICATE when that was accepted, UNAVAILABLE
  otherwise.
- Claims of events that were not acknowledged are deleted before the answer goes out, so the retry is
  not mistaken for a duplicate; if the call is cancelled midway they are deleted in the background.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from dataclasses import dataclass, field

from opentelemetry import context as otel_context

from eta.v1 import events_pb2, ingestion_pb2
from eta_common.timeutil import now_ms, timestamp_from_ms
from ingestion import metrics
from ingestion.dedup import Claim, DedupStore
from ingestion.publisher import PendingBatch, Publisher
from ingestion.validation import ValidationLimits, validate_event

__all__ = ["Ingestor", "Prepared"]

log = logging.getLogger(__name__)
Result = ingestion_pb2.EventResult

DETAIL_DUPLICATE = "event_id was accepted earlier (within the dedup horizon); not republished"
DETAIL_IN_FLIGHT = "another request is publishing this event_id right now; retry"
DETAIL_NO_TIME = "no time left before the deadline to publish; retry"


@dataclass
class Prepared:
    """A batch after validation, dedup and the hand-off to the producer. ``response`` is filled in place."""

    request: ingestion_pb2.PublishEventsRequest
    response: ingestion_pb2.PublishEventsResponse
    labels: list[tuple[str, str]]  # (kind, type) of each event, for the metrics
    repeats: dict[int, int] = field(default_factory=dict)  # index -> index of the first copy
    claimed: list[int] = field(default_factory=list)  # indices whose claim this batch holds
    batch: PendingBatch | None = None
    settled: bool = False


class Ingestor:
    def __init__(self, *, publisher: Publisher, dedup: DedupStore, limits: ValidationLimits) -> None:
        self._publisher = publisher
        self._dedup = dedup
        self._limits = limits
        self._background: set[asyncio.Task[None]] = set()

    async def prepare(
        self,
        request: ingestion_pb2.PublishEventsRequest,
        *,
        deadline: float,
        parent: otel_context.Context | None = None,
    ) -> Prepared:
        events = request.events
        now = now_ms()
        prepared = Prepared(request, ingestion_pb2.PublishEventsResponse(sequence=request.sequence), [])
        results = prepared.response.results
        labels = prepared.labels
        first: dict[str, int] = {}
        unique: list[int] = []
        for i, event in enumerate(events):
            kind = event.WhichOneof("payload")
            payload = getattr(event, kind) if kind else None
            event_id = payload.event_id if payload is not None else ""
            result = results.add(index=i, event_id=event_id)
            labels.append(
                (kind or "none", _TYPE_NAMES[kind].get(payload.type, "invalid") if payload else "none")
            )
            violations = validate_event(event, now_ms=now, limits=self._limits)
            if violations:
                result.status = Result.REJECTED
                result.violations.extend(
                    ingestion_pb2.FieldViolation(field=f, description=d) for f, d in violations
                )
                continue
            if event_id in first:
                prepared.repeats[i] = first[event_id]
            else:
                first[event_id] = i
                unique.append(i)
        if not unique:
            return prepared
        if asyncio.get_running_loop().time() >= deadline:
            for i in unique:
                _set(results[i], Result.UNAVAILABLE, DETAIL_NO_TIME)
            return prepared
        claims = await self._dedup.claim([results[i].event_id for i in unique])
        for i, claim in zip(unique, claims, strict=True):
            if claim is Claim.NEW:
                prepared.claimed.append(i)
            elif claim is Claim.DUPLICATE:
                _set(results[i], Result.DUPLICATE, DETAIL_DUPLICATE)
            else:
                _set(results[i], Result.UNAVAILABLE, DETAIL_IN_FLIGHT)
        if not prepared.claimed:
            return prepared
        try:
            prepared.batch = await self._publisher.send(
                events,
                prepared.claimed,
                ingest_time=timestamp_from_ms(now),
                deadline=deadline,
                parent=parent,
            )
        except BaseException:
            self.abandon(prepared)
            raise
        return prepared

    async def complete(self, prepared: Prepared) -> ingestion_pb2.PublishEventsResponse:
        """Wait for the acks, settle the claims and answer (one result per event, in request order)."""
        results = prepared.response.results
        if prepared.batch is not None:
            try:
                failed = await prepared.batch.wait()
            except BaseException:
                self.abandon(prepared)
                raise
            accepted_ids: list[str] = []
            failed_ids: list[str] = []
            for i in prepared.claimed:
                result = results[i]
                if i in failed:
                    _set(result, Result.UNAVAILABLE, f"not acknowledged by the broker ({failed[i]}); retry")
                    failed_ids.append(result.event_id)
                else:
                    result.status = Result.ACCEPTED
                    accepted_ids.append(result.event_id)
            prepared.settled = True
            await self._dedup.settle(accepted_ids, failed_ids)
        for i, first in prepared.repeats.items():
            if results[first].status in (Result.ACCEPTED, Result.DUPLICATE):
                _set(results[i], Result.DUPLICATE, f"same event_id as event {first} of this request")
            else:
                _set(results[i], Result.UNAVAILABLE, results[first].detail or DETAIL_IN_FLIGHT)
        return _finish(prepared)

    def abandon(self, prepared: Prepared) -> None:
        """Give up on a prepared batch whose answer will never be sent (the call was cancelled): close its
        spans and delete its dedup claims in the background (nothing was confirmed to the client)."""
        if prepared.batch is not None:
            prepared.batch.abandon()
        if prepared.settled or not prepared.claimed:
            return
        prepared.settled = True
        ids = [prepared.response.results[i].event_id for i in prepared.claimed]
        task = asyncio.get_running_loop().create_task(self._dedup.settle((), ids))
        self._background.add(task)
        task.add_done_callback(self._background.discard)


_TYPE_NAMES: dict[str | None, dict[int, str]] = {
    kind: {number: value.name for number, value in enum.DESCRIPTOR.values_by_number.items()}
    for kind, enum in (
        ("driver", events_pb2.DriverEvent.Type),
        ("kitchen", events_pb2.KitchenEvent.Type),
        ("order", events_pb2.OrderEvent.Type),
    )
}
_STATUS_NAMES: dict[int, str] = {int(number): name.lower() for name, number in Result.Status.items()}


def _set(
    result: ingestion_pb2.EventResult, status: ingestion_pb2.EventResult.Status.ValueType, detail: str
) -> None:
    result.status = status
    result.detail = detail


def _finish(prepared: Prepared) -> ingestion_pb2.PublishEventsResponse:
    """Fill in the counts and record the metrics."""
    response = prepared.response
    statuses = [r.status for r in response.results]
    tally: Counter[tuple[str, str, int]] = Counter(
        (kind, etype, status) for (kind, etype), status in zip(prepared.labels, statuses, strict=True)
    )
    for (kind, etype, status), count in tally.items():
        metrics.EVENTS.labels(kind, etype, _STATUS_NAMES[status]).inc(count)
    by_status = Counter(statuses)
    response.accepted = by_status[Result.ACCEPTED]
    response.duplicates = by_status[Result.DUPLICATE]
    response.rejected = by_status[Result.REJECTED]
    response.unavailable = by_status[Result.UNAVAILABLE]
    return response
