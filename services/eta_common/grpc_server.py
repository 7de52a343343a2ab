"""aio gRPC server bootstrap shared by the three services.

Every server gets: the standard ``grpc.health.v1`` service, server reflection (so ``grpcurl`` works),
a server span per call, INVALID_ARGUMENT for request bytes that do not decode on every method of every
servicer (``eta_common.grpc_errors.validating``; grpc alone answers UNKNOWN), a Prometheus endpoint,
and a shutdown sequence for Kubernetes rollouts:
SIGTERM/SIGINT → health NOT_SERVING (readiness fails, traffic drains) → ``server.stop(grace)`` lets
in-flight RPCs finish → the service's own ``on_stop`` hooks close Kafka/Redis/PostgreSQL clients.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from eta_common.config import ServerSettings, env_str
from eta_common.grpc_errors import validating
from eta_common.handler_wrapping import HandlerWrapper, wrap_registrations
from eta_common.logs import configure_logging
from eta_common.telemetry import ServerTracing, setup_tracing

__all__ = ["EVENT_LOOPS", "GrpcService", "event_loop_factory", "run_grpc_service", "serve", "service_parser"]

log = logging.getLogger(__name__)

AddServicer = Callable[[grpc.aio.Server], None]


@dataclass
class GrpcService:
    """What a service plugs into :func:`serve`."""

    name: str
    settings: ServerSettings
    # Functions that register servicers on the server (e.g. ``add_EtaServiceServicer_to_server``).
    register: Sequence[AddServicer]
    # Fully-qualified service names (for reflection and per-service health).
    service_names: Sequence[str]
    # Run once before the port opens (connect stores, load models …).
    on_start: Sequence[Callable[[], Awaitable[None]]] = field(default_factory=tuple)
    # Long-running background tasks (e.g. a Kafka consume loop); cancelled on shutdown.
    background: Sequence[Callable[[], Coroutine[Any, Any, None]]] = field(default_factory=tuple)
    # Run after the server stopped (close clients), in order.
    on_stop: Sequence[Callable[[], Awaitable[None]]] = field(default_factory=tuple)
    # Per-method handler wrappers (``eta_common.handler_wrapping``), applied once at registration: inside
    # the server span, outside the request validation. Cheaper per call than interceptors.
    wrappers: Sequence[HandlerWrapper] = field(default_factory=tuple)
    # grpc.aio interceptors, for what must decide per call before the handler runs (authentication).
    # They run before the wrappers: a call an interceptor refuses has no server span (it is logged).
    interceptors: Iterable[grpc.aio.ServerInterceptor] = field(default_factory=tuple)
    bind_host: str = "[::]"
    # TLS for the gRPC port (e.g. ``eta_common.auth.TlsFiles.server_credentials()``); None = plaintext.
    server_credentials: grpc.ServerCredentials | None = None


async def serve(service: GrpcService, *, ready: asyncio.Event | None = None) -> None:
    """Run until SIGTERM/SIGINT (or a background task fails), then shut down gracefully."""
    for hook in service.on_start:
        await hook()
    # No interceptors unless a service needs one: grpc then resolves a registered method with a dict
    # lookup, no coroutine chain per call.
    server = grpc.aio.server(
        interceptors=list(service.interceptors) or None, options=[("grpc.so_reuseport", 0)]
    )
    # Before anything registers: a span per call, the service's wrappers, and INVALID_ARGUMENT for
    # undecodable request bytes, on every method.
    wrap_registrations(server, [ServerTracing(), *service.wrappers, validating])
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for register in service.register:
        register(server)
    reflection.enable_server_reflection(
        (
            *service.service_names,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    address = f"{service.bind_host}:{service.settings.grpc_port}"
    if service.server_credentials is not None:
        port = server.add_secure_port(address, service.server_credentials)
    else:
        port = server.add_insecure_port(address)
    if service.settings.metrics_port:
        start_http_server(service.settings.metrics_port)
    await server.start()
    for name in ("", *service.service_names):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info(
        "serving",
        extra={
            "grpc_port": port,
            "metrics_port": service.settings.metrics_port,
            "tls": service.server_credentials is not None,
        },
    )

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    tasks = [
        asyncio.create_task(job(), name=f"{service.name}-bg{i}") for i, job in enumerate(service.background)
    ]
    for task in tasks:
        task.add_done_callback(lambda _t: stop.set())
    if ready is not None:
        ready.set()
    try:
        await stop.wait()
        for task in tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                log.error("background task failed", exc_info=task.exception())
        log.info("shutting down", extra={"grace_seconds": service.settings.shutdown_grace_seconds})
        await health_servicer.enter_graceful_shutdown()
    finally:
        await server.stop(service.settings.shutdown_grace_seconds)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for hook in service.on_stop:
            try:
                await hook()
            except Exception:
                log.exception("shutdown hook failed")
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        log.info("stopped")


def service_parser(prog: str, description: str | None) -> argparse.ArgumentParser:
    """``--help`` for a service: its settings docstring (every variable and its default)."""
    return argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )


EVENT_LOOPS = ("uvloop", "asyncio")


def event_loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The services' event loop, ``ETA_EVENT_LOOP`` [uvloop]: ``uvloop`` (libuv's loop, in C: ~7 % less
    server CPU per prediction than the standard library's, measured side by side; ``feast serve`` runs
    on it through uvicorn) or ``asyncio`` (the standard library's). None means asyncio's default; so
    does ``uvloop`` where it is not installed (a warning says so)."""
    choice = env_str("ETA_EVENT_LOOP", "uvloop")
    if choice not in EVENT_LOOPS:
        raise ValueError(f"ETA_EVENT_LOOP must be one of {', '.join(EVENT_LOOPS)}, got {choice!r}")
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        log.warning("uvloop is not installed; running on asyncio's event loop")
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def run_grpc_service(name: str, build: Callable[[], GrpcService]) -> None:
    """A service process: structured logs, tracing, ``build()`` inside the event loop (aiokafka and
    grpc.aio clients need a running loop; ``ETA_EVENT_LOOP`` chooses it), serve until SIGTERM, then
    flush the remaining spans."""
    configure_logging(name)
    provider = setup_tracing(name)

    async def run() -> None:
        await serve(build())

    try:
        with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
            runner.run(run())
    finally:
        provider.shutdown()
