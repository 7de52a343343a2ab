"""The ETA service's health ``Watch`` is gated by readiness like ``Check``, on the real process: with no
model in the registry and the heuristic off it streams NOT_SERVING; once a model is promoted the same
stream switches to SERVING (and ``Check`` agrees at every step)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from devstack.infra import ChildProcess
from devstack.stack import LocalStack, ServicePorts
from eta_common.db.migrate import apply_migrations
from prediction.tests.support import register, synthetic_bundle
from tests.integration.helpers import redis_and_postgres

pytestmark = pytest.mark.integration
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, ChildProcess, ChildProcess]]:
    with redis_and_postgres(tmp_path_factory, "prediction-watch") as servers:
        yield servers


async def _next(stream: grpc.aio.UnaryStreamCall, timeout: float = 10.0) -> int:
    reply = await asyncio.wait_for(stream.read(), timeout=timeout)
    assert reply is not grpc.aio.EOF
    return int(reply.status)


async def test_watch_is_not_serving_until_a_model_is_promoted(
    servers: tuple[Path, ChildProcess, ChildProcess],
) -> None:
    workdir, redis, postgres = servers
    await apply_migrations(postgres.url)
    stack = LocalStack(workdir / "service", ports=ServicePorts.free(), use_env_endpoints=False)
    stack.redis_url, stack.database_url = redis.url, postgres.url
    await asyncio.to_thread(
        stack.start_service,
        "prediction",
        extra_env={
            "PREDICTION_HEURISTIC_FALLBACK": "false",
            "PREDICTION_MODEL_REFRESH_SECONDS": "0.3",
            "OTEL_TRACES_SAMPLER": "always_off",
            "SHUTDOWN_GRACE_SECONDS": "1",
        },
    )
    try:
        async with grpc.aio.insecure_channel(stack.target("prediction")) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            streams = {
                name: health.Watch(health_pb2.HealthCheckRequest(service=name), timeout=60)
                for name in ("", "eta.v1.EtaService")
            }
            for stream in streams.values():
                assert await _next(stream) == NOT_SERVING
            check = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
            assert check.status == NOT_SERVING
            # other services are not gated: the standard servicer's own answer
            other = health.Watch(health_pb2.HealthCheckRequest(service="eta.v1.Nothing"), timeout=10)
            assert await _next(other) == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
            other.cancel()

            await register(postgres.url, "v-watch", synthetic_bundle(rows=1500, rounds=20))
            for stream in streams.values():
                assert (
                    await _next(stream, timeout=15) == SERVING
                )  # the refresh (0.3 s) + the gate's poll (1 s)
                stream.cancel()
            check = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
            assert check.status == SERVING
    finally:
        await asyncio.to_thread(stack.stop)
