"""Send events to ``eta.v1.IngestionService/PublishEvents`` in small batches.

A batch goes out when ``max_batch`` events are queued or ``flush_interval_s`` has passed, one call at a
time (so one entity's events arrive in order). Events answered UNAVAILABLE, and whole batches whose call
failed with a transient status (UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED), are sent again with
the same ``event_id`` (ingestion deduplicates) before newer events, with exponential back-off.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import grpc

from eta.v1 import events_pb2, ingestion_pb2, ingestion_pb2_grpc

__all__ = ["EventPublisher", "PublishStats"]

log = logging.getLogger(__name__)
Result = ingestion_pb2.EventResult
RETRYABLE_CODES = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED}
)
MAX_BACKOFF_S = 5.0
MAX_LOGGED_REJECTIONS = 20
ERROR_LOG_INTERVAL_S = 5.0


def _pushback_s(exc: grpc.aio.AioRpcError) -> float:
    """The server's suggested retry delay (``grpc-retry-pushback-ms`` trailer), 0 if none."""
    for key, value in exc.trailing_metadata() or ():
        if key == "grpc-retry-pushback-ms":
            with contextlib.suppress(TypeError, ValueError):
                return max(0.0, int(value) / 1000.0)
    return 0.0


@dataclass
class PublishStats:
    """Running totals (event counts unless named otherwise)."""

    queued: int = 0  # handed to the publisher
    sent: int = 0  # sent in a call that got an answer, retries included
    accepted: int = 0
    duplicates: int = 0
    rejected: int = 0
    unavailable: int = 0  # answered UNAVAILABLE (then retried)
    failed: int = 0  # dropped after a non-retryable call failure
    dropped: int = 0  # still unsent when the publisher was closed
    calls: int = 0  # PublishEvents calls answered
    call_errors: int = 0  # PublishEvents calls that failed as a whole

    def snapshot(self) -> PublishStats:
        return replace(self)


class EventPublisher:
    def __init__(
        self,
        stub: ingestion_pb2_grpc.IngestionServiceStub,
        *,
        max_batch: int = 200,
        flush_interval_s: float = 0.15,
        rpc_timeout_s: float = 5.0,
        stats: PublishStats | None = None,
        on_call: Callable[[PublishStats], None] | None = None,
        metadata: Sequence[tuple[str, str]] = (),
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self._stub = stub
        self._max_batch = max_batch
        self._flush_interval = flush_interval_s
        self._timeout = rpc_timeout_s
        self.stats = stats if stats is not None else PublishStats()
        self._on_call = on_call
        self._metadata = tuple(metadata)
        self._queue: deque[events_pb2.Event] = deque()
        self._retry: deque[events_pb2.Event] = deque()
        self._in_flight: list[events_pb2.Event] = []
        self._wake = asyncio.Event()
        self._closing = False
        self._backoff = 0.0
        self._logged_rejections = 0
        self._last_error_log = -math.inf
        self._suppressed_errors = 0
        self._task: asyncio.Task[None] | None = None

    @property
    def backlog(self) -> int:
        """Events not yet answered ACCEPTED / DUPLICATE / REJECTED (in flight included)."""
        return len(self._queue) + len(self._retry) + len(self._in_flight)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="event-publisher")

    def add(self, event: events_pb2.Event) -> None:
        self._queue.append(event)
        self.stats.queued += 1
        if len(self._queue) >= self._max_batch:
            self._wake.set()

    async def close(self, drain_timeout_s: float = 10.0) -> PublishStats:
        """Send what is queued (up to ``drain_timeout_s``), then stop; what is left counts as dropped."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), drain_timeout_s)
            except TimeoutError:
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
        if self.backlog:
            self.stats.dropped += self.backlog
            log.warning("events not delivered before shutdown", extra={"dropped": self.backlog})
            self._queue.clear()
            self._retry.clear()
            self._in_flight = []
        return self.stats

    async def _run(self) -> None:
        while True:
            if not self._closing:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self._flush_interval)
                self._wake.clear()
            while self.backlog:
                if self._backoff:
                    await asyncio.sleep(self._backoff)
                await self.send_batch()
                if not self._closing and len(self._queue) < self._max_batch and not self._retry:
                    break  # a partial batch waits for the next flush tick
            if self._closing and not self.backlog:
                return

    def _take_batch(self) -> list[events_pb2.Event]:
        batch: list[events_pb2.Event] = []
        for source in (self._retry, self._queue):
            while source and len(batch) < self._max_batch:
                batch.append(source.popleft())
        return batch

    async def send_batch(self) -> None:
        """Send one batch (retries first); update the totals."""
        batch = self._take_batch()
        if not batch:
            return
        stats = self.stats
        started = time.perf_counter()
        self._in_flight = batch
        try:
            response = await self._stub.PublishEvents(
                ingestion_pb2.PublishEventsRequest(events=batch),
                timeout=self._timeout,
                metadata=self._metadata or None,
            )
        except grpc.aio.AioRpcError as exc:
            self._in_flight = []
            stats.call_errors += 1
            code = exc.code()
            if code in RETRYABLE_CODES:
                self._retry.extendleft(reversed(batch))
                self._backoff = min(MAX_BACKOFF_S, max(0.2, self._backoff * 2, _pushback_s(exc)))
                self._log_call_error(exc, "PublishEvents failed, will retry", events=len(batch),
                                     backoff_s=self._backoff)  # fmt: skip
            else:  # INVALID_ARGUMENT, UNAUTHENTICATED, PERMISSION_DENIED, …: resending cannot help
                stats.failed += len(batch)
                self._log_call_error(exc, "PublishEvents failed, batch dropped", events=len(batch))
            return
        self._in_flight = []
        stats.calls += 1
        stats.sent += len(batch)
        retry = []
        for result in response.results:
            status = result.status
            if status == Result.ACCEPTED:
                stats.accepted += 1
            elif status == Result.DUPLICATE:
                stats.duplicates += 1
            elif status == Result.REJECTED:
                stats.rejected += 1
                self._log_rejection(result)
            else:  # UNAVAILABLE (or unknown): send again with the same event_id
                stats.unavailable += 1
                if 0 <= result.index < len(batch):
                    retry.append(batch[result.index])
        if retry:
            self._retry.extend(retry)
            self._backoff = min(MAX_BACKOFF_S, max(0.2, self._backoff * 2))
        else:
            self._backoff = 0.0
        log.debug(
            "PublishEvents answered",
            extra={
                "events": len(batch),
                "accepted": response.accepted,
                "ms": round((time.perf_counter() - started) * 1000, 1),
            },
        )
        if self._on_call is not None:
            self._on_call(stats)

    def _log_call_error(self, exc: grpc.aio.AioRpcError, message: str, **extra: object) -> None:
        """At most one line per ``ERROR_LOG_INTERVAL_S`` (an outage fails every call)."""
        now = time.monotonic()
        self._suppressed_errors += 1
        if now - self._last_error_log < ERROR_LOG_INTERVAL_S:
            return
        level = logging.WARNING if exc.code() in RETRYABLE_CODES else logging.ERROR
        log.log(level, message, extra={"code": exc.code().name, "detail": exc.details(),
                                       "failed_calls": self._suppressed_errors, **extra})  # fmt: skip
        self._last_error_log = now
        self._suppressed_errors = 0

    def _log_rejection(self, result: ingestion_pb2.EventResult) -> None:
        if self._logged_rejections >= MAX_LOGGED_REJECTIONS:
            return
        self._logged_rejections += 1
        log.warning(
            "event rejected",
            extra={
                "event_id": result.event_id,
                "violations": [f"{v.field}: {v.description}" for v in result.violations],
            },
        )
