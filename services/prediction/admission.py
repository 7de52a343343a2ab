"""Admission control, per-RPC latency and readiness, as one handler wrapper.

* **Load shedding.** Each call holds admission units while it runs (PredictEta 1, PredictEtaBatch
  ``1 + restaurants // 10``, roughly its cost). A call that would take the units in flight over
  ``PREDICTION_MAX_IN_FLIGHT`` is refused at once with RESOURCE_EXHAUSTED instead of queueing behind
  the others (a call is always admitted when nothing is in flight, so a large batch cannot starve).
  On one event loop the units in flight are exactly the calls that started and have not answered, so
  the limit bounds both memory and the queueing delay a newly admitted call can suffer.
* **Latency.** ``eta_prediction_rpc_seconds{method, code}`` for every EtaService call, shed ones too.
* **Readiness.** ``grpc.health.v1.Health/Check`` for ``""`` and ``eta.v1.EtaService`` answers
  NOT_SERVING while the service cannot answer at all (no model and no heuristic); otherwise the
  standard health servicer answers (SERVING, or NOT_SERVING once shutdown began). ``Health/Watch``
  is gated the same way: its stream says NOT_SERVING while the service cannot answer and switches to
  the servicer's own status once it can (readiness is polled every ``WATCH_POLL_SECONDS``). Redis being down
  does not make the service unready: it still answers, from the feature defaults.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
from collections.abc import Callable, Mapping
from typing import Any

import grpc
from grpc_health.v1 import health_pb2

from prediction import metrics

__all__ = ["Admission"]

HEALTH_CHECK = "/grpc.health.v1.Health/Check"
HEALTH_WATCH = "/grpc.health.v1.Health/Watch"
WATCH_POLL_SECONDS = 1.0
Handler = Any  # grpc.RpcMethodHandler (grpc is untyped here)


def _code_name(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return str(code.name)
    if code is None or code == 0:
        return "OK"
    return next((c.name for c in grpc.StatusCode if c.value[0] == code), str(code))


class Admission:
    """The handler wrapper (``eta_common.handler_wrapping``) for EtaService's methods and the health
    service: applied once per method at registration, so a call pays one coroutine frame for it."""

    def __init__(
        self,
        *,
        service: str,
        max_units: int,
        costs: Mapping[str, Callable[[Any], int]],
        ready: Callable[[], bool],
    ) -> None:
        self._service = service
        self._prefix = f"/{service}/"
        self._max_units = max_units
        self._costs = costs
        self._ready = ready
        self.in_flight = 0
        metrics.IN_FLIGHT.set_function(lambda: self.in_flight)  # read at scrape time, not set per call
        self._latency: dict[tuple[str, str], Any] = {}

    def __call__(self, method: str, handler: Handler) -> Handler:
        if handler.unary_unary is None:
            return self._health_watch(handler) if method == HEALTH_WATCH else handler
        if method == HEALTH_CHECK:
            return self._health_check(handler)
        if method.startswith(self._prefix):
            return self._admitted(method[len(self._prefix) :], handler)
        return handler

    def _observe(self, method: str, code: str, seconds: float) -> None:
        child = self._latency.get((method, code))
        if child is None:
            child = self._latency[(method, code)] = metrics.RPC_LATENCY.labels(method, code)
        child.observe(seconds)

    def _admitted(self, method: str, handler: Handler) -> Handler:
        inner = handler.unary_unary
        cost = self._costs.get(method, lambda _request: 1)
        shed = metrics.REJECTED.labels(method, "overloaded")

        async def admitted(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            started = time.perf_counter()
            units = cost(request)
            in_flight = self.in_flight
            if in_flight and in_flight + units > self._max_units:
                shed.inc()
                self._observe(method, "RESOURCE_EXHAUSTED", time.perf_counter() - started)
                await context.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"overloaded: {in_flight} admission units in flight, limit {self._max_units} "
                    "(PREDICTION_MAX_IN_FLIGHT); retry with backoff or on another replica",
                )
            self.in_flight = in_flight + units
            code = "OK"
            try:
                return await inner(request, context)
            except BaseException:
                code = _code_name(context)
                if code == "OK":
                    code = "UNKNOWN"
                raise
            finally:
                self.in_flight -= units
                self._observe(method, code, time.perf_counter() - started)

        return grpc.unary_unary_rpc_method_handler(
            admitted,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _health_watch(self, handler: Handler) -> Handler:
        inner = handler.unary_stream
        ours = ("", self._service)
        streams = inspect.isasyncgenfunction(inner)

        async def watch(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
            if request.service not in ours:
                if streams:
                    async for response in inner(request, context):
                        await context.write(response)
                    return
                await inner(request, context)
                return
            gate = _GatedWatch(context, self._ready)
            poller = asyncio.create_task(gate.poll(WATCH_POLL_SECONDS))
            try:
                if streams:
                    async for response in inner(request, gate):
                        await gate.write(response)
                else:
                    await inner(request, gate)
            finally:
                poller.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await poller

        return grpc.unary_stream_rpc_method_handler(
            watch,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _health_check(self, handler: Handler) -> Handler:
        inner = handler.unary_unary
        ours = ("", self._service)

        async def check(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            if request.service in ours and not self._ready():
                return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.NOT_SERVING)
            return await inner(request, context)

        return grpc.unary_unary_rpc_method_handler(
            check,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


class _GatedWatch:
    """The call's context as the health servicer's ``Watch`` sees it: the statuses it writes go out
    only while the service is ready; before that the stream says NOT_SERVING, and a change of readiness
    is sent when :meth:`poll` notices it."""

    def __init__(self, context: grpc.aio.ServicerContext[Any, Any], ready: Callable[[], bool]) -> None:
        self._context = context
        self._ready = ready
        self._status: int | None = None  # the servicer's latest status
        self._sent: int | None = None
        self._lock = asyncio.Lock()

    async def write(self, response: health_pb2.HealthCheckResponse) -> None:
        self._status = response.status
        await self._flush()

    async def poll(self, period: float) -> None:
        try:
            while True:
                await asyncio.sleep(period)
                await self._flush()
        except (grpc.aio.AbortError, grpc.aio.UsageError, RuntimeError):
            return  # the call ended under us

    async def _flush(self) -> None:
        async with self._lock:
            if self._status is None:
                return
            status = self._status if self._ready() else health_pb2.HealthCheckResponse.NOT_SERVING
            if status != self._sent:
                await self._context.write(health_pb2.HealthCheckResponse(status=status))
                self._sent = status

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)
