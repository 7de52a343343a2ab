"""IngestionService: the gRPC surface (decoding, limits, admission, deadlines, the stream protocol).

The work on each batch of events is :class:`ingestion.pipeline.Ingestor`'s. The methods take the raw
request bytes and decode them here, so that bytes that are not a ``PublishEventsRequest`` are answered
INVALID_ARGUMENT with ``google.rpc.BadRequest`` details (the stock deserializer would answer UNKNOWN).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter, deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from opentelemetry import propagate, trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from eta.v1 import ingestion_pb2
from eta_common.auth import current_client
from eta_common.grpc_errors import abort_bad_request
from ingestion import metrics
from ingestion.budget import InFlightBudget
from ingestion.pipeline import Ingestor, Prepared

__all__ = ["SERVICE_NAME", "IngestionServicer"]

log = logging.getLogger(__name__)
tracer = trace.get_tracer("eta.ingestion")

SERVICE_NAME: str = ingestion_pb2.DESCRIPTOR.services_by_name["IngestionService"].full_name
# Answer this long before the client's deadline, so the answer (not DEADLINE_EXCEEDED) reaches it.
DEADLINE_MARGIN_SECONDS = 0.05
# Suggested client back-off after RESOURCE_EXHAUSTED (the trailer gRPC retry policies honour).
RETRY_PUSHBACK_MS = 200

Violations = list[tuple[str, str]]


@dataclass
class _Chunk:
    prepared: Prepared
    task: asyncio.Task[ingestion_pb2.PublishEventsResponse]
    events: int


class IngestionServicer:
    def __init__(
        self,
        *,
        ingestor: Ingestor,
        budget: InFlightBudget,
        max_batch: int,
        publish_timeout_seconds: float,
        stream_window: int,
    ) -> None:
        self._ingestor = ingestor
        self._budget = budget
        self._max_batch = max_batch
        self._publish_timeout = publish_timeout_seconds
        self._window = stream_window

    def register(self, server: grpc.aio.Server) -> None:
        serialize = ingestion_pb2.PublishEventsResponse.SerializeToString
        handlers = {  # no request_deserializer: the methods get the raw bytes
            "PublishEvents": grpc.unary_unary_rpc_method_handler(
                self.PublishEvents, response_serializer=serialize
            ),
            "StreamEvents": grpc.stream_stream_rpc_method_handler(
                self.StreamEvents, response_serializer=serialize
            ),
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
        server.add_registered_method_handlers(SERVICE_NAME, handlers)

    # ------------------------------------------------------------------------------------- unary ---

    async def PublishEvents(
        self, raw: bytes, context: grpc.aio.ServicerContext[Any, Any]
    ) -> ingestion_pb2.PublishEventsResponse:
        request, violations = self._decode(raw)
        if request is None or violations:
            metrics.CALLS_REFUSED.labels("invalid_argument").inc()
            await abort_bad_request(context, violations)
        events = len(request.events)
        if not self._budget.try_acquire(events):
            await self._abort_busy(context, events)
        try:
            prepared = await self._ingestor.prepare(request, deadline=self._deadline(context))
            response = await self._ingestor.complete(prepared)
        finally:
            self._budget.release(events)
        _annotate(trace.get_current_span(), Counter({"chunks": 1, **_counts(response)}))
        return response

    # ------------------------------------------------------------------------------------ stream ---

    async def StreamEvents(
        self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        carrier = {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}
        with tracer.start_as_current_span(
            f"{SERVICE_NAME}/StreamEvents",
            context=propagate.extract(carrier),
            kind=SpanKind.SERVER,
            attributes={"rpc.system": "grpc", "rpc.service": SERVICE_NAME, "rpc.method": "StreamEvents"},
        ) as span:
            metrics.STREAMS.inc()
            try:
                await self._stream(requests, context, span)
            finally:
                metrics.STREAMS.dec()

    async def _stream(
        self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[Any, Any], span: Span
    ) -> None:
        """Read chunks in order and hand them to Kafka in order; a writer task answers them in order.

        At most ``stream_window`` chunks are outstanding (read, not yet answered): then reading pauses.
        """
        parent = trace.set_span_in_context(span)
        outstanding: deque[_Chunk] = deque()
        ready: asyncio.Queue[_Chunk | None] = asyncio.Queue()
        window = asyncio.Semaphore(self._window)
        totals: Counter[str] = Counter()
        writer = asyncio.create_task(self._answer(ready, outstanding, window, context, totals))
        refusal: tuple[grpc.StatusCode, Violations | str] | None = None
        try:
            reader = aiter(requests)
            number = 0
            while True:
                # Take a window slot before reading: with `stream_window` chunks outstanding the next
                # message stays unread (HTTP/2 flow control then holds the client back).
                if window.locked():
                    await _wait_or_fail(window.acquire(), writer)
                else:
                    await window.acquire()
                try:
                    raw = await anext(reader)
                except StopAsyncIteration:
                    break
                request, violations = self._decode(raw, number)
                if request is None or violations:
                    refusal = (grpc.StatusCode.INVALID_ARGUMENT, violations)
                    break
                events = len(request.events)
                if not self._budget.try_acquire(events):
                    refusal = (
                        grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"chunk {number} (sequence {request.sequence}): {self._busy_message(events)}",
                    )
                    break
                try:
                    prepared = await self._ingestor.prepare(
                        request, deadline=self._deadline(context), parent=parent
                    )
                except BaseException:
                    self._budget.release(events)
                    raise
                chunk = _Chunk(prepared, asyncio.create_task(self._ingestor.complete(prepared)), events)
                outstanding.append(chunk)
                ready.put_nowait(chunk)
                number += 1
            ready.put_nowait(None)
            await writer
        except BaseException:
            writer.cancel()
            with contextlib.suppress(BaseException):
                await writer
            for chunk in outstanding:  # read but never answered: nothing was confirmed to the client
                chunk.task.cancel()
                self._ingestor.abandon(chunk.prepared)
                self._budget.release(chunk.events)
            outstanding.clear()
            raise
        finally:
            _annotate(span, totals)
        if refusal is None:
            span.set_attribute("rpc.grpc.status_code", grpc.StatusCode.OK.value[0])
            return
        code, problem = refusal
        metrics.CALLS_REFUSED.labels(code.name.lower()).inc()
        span.set_attribute("rpc.grpc.status_code", code.value[0])
        span.set_status(Status(StatusCode.ERROR, code.name))
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            context.set_trailing_metadata((("grpc-retry-pushback-ms", str(RETRY_PUSHBACK_MS)),))
            await context.abort(code, str(problem))
        assert isinstance(problem, list)
        await abort_bad_request(context, problem)

    async def _answer(
        self,
        ready: asyncio.Queue[_Chunk | None],
        outstanding: deque[_Chunk],
        window: asyncio.Semaphore,
        context: grpc.aio.ServicerContext[Any, Any],
        totals: Counter[str],
    ) -> None:
        """Write each chunk's answer, in order, as soon as it is complete."""
        while (chunk := await ready.get()) is not None:
            response = await chunk.task
            await context.write(response)
            outstanding.popleft()
            self._budget.release(chunk.events)
            window.release()
            totals.update(_counts(response))
            totals["chunks"] += 1

    # ----------------------------------------------------------------------------------- helpers ---

    def _decode(
        self, raw: bytes, chunk: int | None = None
    ) -> tuple[ingestion_pb2.PublishEventsRequest | None, Violations]:
        where = "" if chunk is None else f"chunk {chunk}: "
        try:
            request = ingestion_pb2.PublishEventsRequest.FromString(raw)
        except (DecodeError, ValueError, RecursionError) as exc:
            return None, [("request", f"{where}not a valid eta.v1.PublishEventsRequest ({exc})")]
        if len(request.events) > self._max_batch:
            return request, [
                ("events", f"{where}at most {self._max_batch} events per call, got {len(request.events)}")
            ]
        request.DiscardUnknownFields()  # nothing unvalidated goes to the topic
        return request, []

    def _deadline(self, context: grpc.aio.ServicerContext[Any, Any]) -> float:
        """When the events of this call or chunk must be acknowledged (event-loop time)."""
        timeout = self._publish_timeout
        remaining = context.time_remaining()
        if remaining is not None:
            timeout = min(timeout, remaining - DEADLINE_MARGIN_SECONDS)
        return asyncio.get_running_loop().time() + timeout

    def _busy_message(self, events: int) -> str:
        return (
            f"in-flight budget exhausted: {self._budget.in_use} of {self._budget.limit} events in flight, "
            f"this request needs {events}; retry with backoff"
        )

    async def _abort_busy(self, context: grpc.aio.ServicerContext[Any, Any], events: int) -> None:
        metrics.CALLS_REFUSED.labels("resource_exhausted").inc()
        context.set_trailing_metadata((("grpc-retry-pushback-ms", str(RETRY_PUSHBACK_MS)),))
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, self._busy_message(events))


async def _wait_or_fail(awaitable: Any, writer: asyncio.Task[None]) -> None:
    """Await ``awaitable`` unless the writer task ends first (then raise its error, or stop)."""
    waiter = asyncio.ensure_future(awaitable)
    if not waiter.done():
        await asyncio.wait((waiter, writer), return_when=asyncio.FIRST_COMPLETED)
    if not waiter.done():
        waiter.cancel()
        writer.result()  # raises the writer's exception
        raise RuntimeError("the answer writer stopped unexpectedly")
    waiter.result()


def _counts(response: ingestion_pb2.PublishEventsResponse) -> Counter[str]:
    return Counter(
        {
            "count": len(response.results),
            "accepted": response.accepted,
            "duplicates": response.duplicates,
            "rejected": response.rejected,
            "unavailable": response.unavailable,
        }
    )


def _annotate(span: Span, totals: Counter[str]) -> None:
    span.set_attributes(
        {f"eta.{key}" if key == "chunks" else f"eta.events.{key}": n for key, n in totals.items()}
    )
    client = current_client()
    if client is not None:
        span.set_attribute("enduser.id", client)
