"""Online features for a prediction: one Redis round trip, bounded in time, never an error.

Every read goes through :meth:`eta_common.online_store.OnlineStore.read_block`: one pipeline for any
number of restaurants, one ``HMGET`` of its ready row per restaurant; a restaurant whose row is not valid
at the request time is read exactly from its sorted sets in a second round trip
(``eta_prediction_feature_reads_total{path="row"|"fallback"}``). What happens when that cannot work:

==============================  ====================================================================
situation                       answer
==============================  ====================================================================
Redis error / unreachable       every online feature = its default (``eta_common.features.DEFAULTS``),
(or any failure of the read)    flagged missing; degradation ``ONLINE_STORE_UNAVAILABLE``
no reply within the time left   same defaults; ``ONLINE_STORE_TIMEOUT``. The time left is
                                ``min(PREDICTION_REDIS_TIMEOUT_MS, client deadline - reserve)``. Only a
                                full Redis timeout counts as a Redis failure (a short client deadline
                                says nothing about Redis); a connection whose oldest reply is overdue
                                by the Redis timeout is dropped and reopened by the next read
one Redis Cluster shard down    the same defaults and ``ONLINE_STORE_UNAVAILABLE`` for the reads that need
(others answer)                 that shard (``redis_shard_unavailable``); reads on the other shards are
                                answered as usual, and the circuit is not opened for a shard
N failures in a row             the circuit opens: for ``PREDICTION_REDIS_BACKOFF_SECONDS`` reads do
                                not try Redis (answers are immediate, ``ONLINE_STORE_UNAVAILABLE``),
                                then one read probes it; success closes the circuit
==============================  ====================================================================

The defaults are 0 for counts and the busy flag (the no-activity value) and NaN for the mean prep time
and the free-driver count, which LightGBM routes the way it learnt for missing values in training. The
request-time features (distance, hour of the week) never depend on Redis, so a degraded answer still
reflects the trip.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import TypeAlias, TypeVar

from opentelemetry import trace
from opentelemetry.trace import Span, SpanContext, SpanKind, TraceFlags
from redis.exceptions import RedisError

from eta.v1 import eta_pb2
from eta_common.feature_block import ONLINE_COLUMNS, ONLINE_NAMES, FeatureBlock, FeatureColumns, parse_writer
from eta_common.online_store import OnlineStore, RestaurantFeatures
from prediction import metrics
from prediction.redis_client import ShardUnavailableError

__all__ = ["CircuitBreaker", "FeatureReader", "default_features"]

log = logging.getLogger(__name__)
tracer = trace.get_tracer("eta.prediction")
Degradation = eta_pb2.Degradation
DegradationValue: TypeAlias = eta_pb2.Degradation.ValueType
Location = tuple[float, float]

MAX_WRITER_LINKS = 16
_Found = TypeVar("_Found", FeatureBlock, FeatureColumns)


def default_features(restaurant_id: str, location: Location, now_ms: int) -> RestaurantFeatures:
    """The documented defaults for every online feature, all flagged not present."""
    return FeatureBlock.defaults([(restaurant_id, location)], now_ms).restaurant(0)


def _describe(span: Span, block: FeatureBlock, now_ms: int) -> None:
    """Feature ages as attributes (the oldest across a batch) and links to the aggregator spans that
    wrote the values (feature provenance, when those spans were sampled)."""
    isnan = math.isnan
    attributes: dict[str, float] = {}
    for name, k in zip(ONLINE_NAMES, ONLINE_COLUMNS, strict=True):
        known = [changed for row in block.updated_ms if not isnan(changed := row[k])]
        if known:
            attributes[f"eta.feature_age_s.{name}"] = max(0.0, (now_ms - min(known)) / 1000.0)
    span.set_attributes(attributes)  # one call: each call takes the span's lock
    writers: dict[tuple[int, int], str] = {}
    for refs in block.writers:
        if not any(refs):  # no sampled writer in this row (the common case)
            continue
        for name, k in zip(ONLINE_NAMES, ONLINE_COLUMNS, strict=True):
            writer = parse_writer(refs[k])
            if writer is not None and len(writers) < MAX_WRITER_LINKS:
                writers.setdefault(writer, name)
    for (trace_id, span_id), name in writers.items():
        context = SpanContext(trace_id, span_id, is_remote=True, trace_flags=TraceFlags(TraceFlags.SAMPLED))
        span.add_link(context, {"eta.feature": name})


class CircuitBreaker:
    """Consecutive failures open the circuit for ``backoff_seconds``; then one call probes."""

    def __init__(
        self,
        *,
        failures_to_open: int,
        backoff_seconds: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._threshold = failures_to_open
        self._backoff = backoff_seconds
        self._clock = clock
        self._failures = 0
        self._open_until: float | None = None
        self._probing = False

    @property
    def is_open(self) -> bool:
        return self._open_until is not None

    def allow(self) -> bool:
        """May this call try Redis? (Takes the probe slot when the backoff is over.)"""
        if self._open_until is None:
            return True
        if self._probing or self._clock() < self._open_until:
            return False
        self._probing = True
        return True

    def success(self) -> None:
        if self._open_until is not None:
            log.info("online store reachable again; circuit closed")
            metrics.REDIS_CIRCUIT_OPEN.set(0)
        self._failures = 0
        self._open_until = None
        self._probing = False

    def abandon(self) -> None:
        """A call that took the probe slot ended without a verdict (e.g. it was cancelled)."""
        self._probing = False

    def failure(self) -> None:
        self._failures += 1
        was_open = self._open_until is not None
        self._probing = False
        if was_open or self._failures >= self._threshold:
            self._open_until = self._clock() + self._backoff
            if not was_open:
                log.warning(
                    "online store failing; circuit open, answering from feature defaults",
                    extra={"failures": self._failures, "backoff_seconds": self._backoff},
                )
                metrics.REDIS_CIRCUIT_OPEN.set(1)


class FeatureReader:
    def __init__(
        self,
        store: OnlineStore,
        *,
        timeout_seconds: float,
        breaker: CircuitBreaker,
        on_timeout: Callable[[float], object] | None = None,
    ) -> None:
        self._store = store
        # the store's read without I/O (client-side cache hits), where it has one
        self._from_memory: Callable[..., FeatureBlock | None] | None = getattr(
            store, "read_from_memory", None
        )
        self._columns_from_memory: Callable[..., FeatureColumns | None] | None = getattr(
            store, "read_columns_from_memory", None
        )
        self._timeout = timeout_seconds
        self._breaker = breaker
        self._on_timeout = on_timeout

    async def read(
        self,
        requests: Sequence[tuple[str, Location]],
        *,
        now_ms: int,
        budget_seconds: float | None,
        customer_id: str = "",
        market: str = "",
    ) -> tuple[FeatureBlock, DegradationValue | None]:
        """Features of every (restaurant_id, location) — with the customer's history features when
        ``customer_id`` is given — and the degradation if defaults were used."""
        if not trace.get_current_span().is_recording():  # not sampled: no child spans either
            return await self._read(requests, now_ms, budget_seconds, None, customer_id, market)
        # A plain (not current) span: nothing runs under it, so no context switch is needed.
        span = tracer.start_span(
            "redis read features",
            kind=SpanKind.CLIENT,
            attributes={
                "db.system": "redis",
                "db.operation.name": "pipeline",
                "eta.restaurants": len(requests),
            },
        )
        try:
            found, degradation = await self._read(requests, now_ms, budget_seconds, span, customer_id, market)
            if degradation is not None:
                span.set_attribute("eta.degradation", Degradation.Name(degradation))
            else:
                _describe(span, found, now_ms)
            return found, degradation
        finally:
            span.end()

    async def read_columns(
        self,
        requests: Sequence[tuple[str, Location]],
        *,
        now_ms: int,
        budget_seconds: float | None,
        customer_id: str = "",
        market: str = "",
    ) -> tuple[FeatureColumns, DegradationValue | None]:
        """:meth:`read` as arrays (a feed). Answered from the client-side cache, the columns come straight
        from the cached rows; anything else (a miss, a row needing the exact read, a traced call, an open
        circuit, an error) takes :meth:`read` and converts its block: the same answer either way."""
        if not trace.get_current_span().is_recording():  # a traced read takes read(): its span
            found = self._memory(self._columns_from_memory, requests, now_ms, customer_id, market)
            if found is not None:
                return found, None
        block, degradation = await self.read(
            requests, now_ms=now_ms, budget_seconds=budget_seconds, customer_id=customer_id, market=market
        )
        return FeatureColumns.of_block(block), degradation

    def _memory(
        self,
        read: Callable[..., _Found | None] | None,
        requests: Sequence[tuple[str, Location]],
        now_ms: int,
        customer_id: str,
        market: str,
    ) -> _Found | None:
        """The read answered from the client-side cache, when it can be (None: take the full path). A
        hit awaits nothing, so it needs no timeout. It counts as a success, as a cache hit through the
        full path always did (the cache answers only while its tracking connections to Redis are alive),
        so sporadic failures between hits never add up to an open circuit."""
        if read is None or self._breaker.is_open:
            return None
        started = time.perf_counter()
        try:
            found = read(requests, now_ms=now_ms, customer_id=customer_id, market=market)
        except Exception:  # the full path reads again and answers (or degrades) as usual
            return None
        if found is not None:
            self._breaker.success()
            metrics.STAGE_REDIS.observe(time.perf_counter() - started)
            metrics.READS_FROM_ROWS.inc(found.from_rows)
        return found

    async def _read(
        self,
        requests: Sequence[tuple[str, Location]],
        now_ms: int,
        budget_seconds: float | None,
        span: Span | None,
        customer_id: str = "",
        market: str = "",
    ) -> tuple[FeatureBlock, DegradationValue | None]:
        breaker = self._breaker
        hit = self._memory(self._from_memory, requests, now_ms, customer_id, market)
        if hit is not None:
            return hit, None
        if not breaker.allow():
            metrics.FALLBACKS.labels("redis_circuit_open").inc(len(requests))
            return self._defaults(requests, now_ms), Degradation.ONLINE_STORE_UNAVAILABLE
        # A client deadline shorter than the Redis timeout bounds this read, but running out of it says
        # nothing about Redis: it is not counted as a Redis failure.
        client_bound = budget_seconds is not None and budget_seconds < self._timeout
        timeout = budget_seconds if budget_seconds is not None and client_bound else self._timeout
        started = time.perf_counter()
        try:
            async with asyncio.timeout(timeout):
                found = await self._store.read_block(
                    requests, now_ms=now_ms, customer_id=customer_id, market=market
                )
        except TimeoutError:
            if client_bound:
                breaker.abandon()
            else:
                breaker.failure()
            if self._on_timeout is not None:
                self._on_timeout(self._timeout)  # the connection is dropped only if it is stalled
            metrics.FALLBACKS.labels("redis_timeout").inc(len(requests))
            return self._defaults(requests, now_ms), Degradation.ONLINE_STORE_TIMEOUT
        except ShardUnavailableError as exc:  # one shard of a cluster: its reads degrade, not everyone's
            breaker.abandon()
            metrics.FALLBACKS.labels("redis_shard_unavailable").inc(len(requests))
            if span is not None:
                span.record_exception(exc)
            return self._defaults(requests, now_ms), Degradation.ONLINE_STORE_UNAVAILABLE
        except (RedisError, OSError) as exc:
            breaker.failure()
            metrics.FALLBACKS.labels("redis_unavailable").inc(len(requests))
            if span is not None:
                span.record_exception(exc)
            return self._defaults(requests, now_ms), Degradation.ONLINE_STORE_UNAVAILABLE
        except Exception as exc:  # a bug reading the store still must not fail the prediction
            breaker.failure()
            metrics.FALLBACKS.labels("store_error").inc(len(requests))
            log.exception("online store read failed unexpectedly; answering from feature defaults")
            if span is not None:
                span.record_exception(exc)
            return self._defaults(requests, now_ms), Degradation.ONLINE_STORE_UNAVAILABLE
        except BaseException:  # cancelled by the caller: no verdict on Redis
            breaker.abandon()
            raise
        breaker.success()
        metrics.STAGE_REDIS.observe(time.perf_counter() - started)
        metrics.READS_FROM_ROWS.inc(found.from_rows)
        if found.from_fallback:
            metrics.READS_FROM_FALLBACK.inc(found.from_fallback)
        return found, None

    @staticmethod
    def _defaults(requests: Sequence[tuple[str, Location]], now_ms: int) -> FeatureBlock:
        return FeatureBlock.defaults(requests, now_ms)
