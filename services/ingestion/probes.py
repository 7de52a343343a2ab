"""A plaintext ``grpc.health.v1`` endpoint for Kubernetes probes when the gRPC port speaks TLS.

Kubernetes' native gRPC probes cannot do TLS, so with ``GRPC_TLS_*`` set the chart points the probes at
``GRPC_HEALTH_PORT``, where this server answers health checks only (no API, no reflection). It runs as a
background task of the main service: it starts once the main server serves (so readiness means "topics
exist, producer connected, API port open") and stops with it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

__all__ = ["health_server"]

log = logging.getLogger(__name__)


def health_server(
    port: int, service_names: Sequence[str], *, bind_host: str = "[::]"
) -> Callable[[], Coroutine[Any, Any, None]]:
    """A background job serving SERVING for ``""`` and ``service_names`` on ``port`` until cancelled."""

    async def run() -> None:
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        bound = server.add_insecure_port(f"{bind_host}:{port}")
        await server.start()
        for name in ("", *service_names):
            await servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("serving plaintext health checks", extra={"health_port": bound})
        try:
            await asyncio.Event().wait()  # until cancelled with the main server
        finally:
            await servicer.enter_graceful_shutdown()
            await server.stop(0)

    return run
