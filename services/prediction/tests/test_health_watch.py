"""``Health/Watch`` is gated by readiness like ``Check``: NOT_SERVING while the service cannot answer,
the health servicer's own status once it can, and every change is streamed."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from eta.v1 import eta_pb2
from eta_common.grpc_errors import validating
from eta_common.handler_wrapping import wrap_registrations
from prediction import admission as admission_module
from prediction.admission import Admission

SERVICE = eta_pb2.DESCRIPTOR.services_by_name["EtaService"].full_name
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


class Env:
    def __init__(self, channel: grpc.aio.Channel, servicer: Any, ready: dict[str, bool]) -> None:
        self.channel = channel
        self.health = health_pb2_grpc.HealthStub(channel)
        self.servicer = servicer
        self.ready = ready


@pytest.fixture
async def env(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Env]:
    monkeypatch.setattr(admission_module, "WATCH_POLL_SECONDS", 0.05)
    ready = {"value": False}
    admission = Admission(service=SERVICE, max_units=3, costs={}, ready=lambda: ready["value"])
    server = wrap_registrations(grpc.aio.server(), [admission, validating])  # as the bootstrap builds it
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    for name in ("", SERVICE):
        await servicer.set(name, SERVING)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield Env(channel, servicer, ready)
    finally:
        await channel.close()
        await server.stop(0)


async def _next(stream: Any) -> int:
    reply = await asyncio.wait_for(stream.read(), timeout=5)
    assert reply is not grpc.aio.EOF
    return int(reply.status)


@pytest.mark.parametrize("service", ["", SERVICE])
async def test_watch_says_not_serving_until_ready_then_follows_the_servicer(env: Env, service: str) -> None:
    stream = env.health.Watch(health_pb2.HealthCheckRequest(service=service), timeout=10)
    assert await _next(stream) == NOT_SERVING
    env.ready["value"] = True
    assert await _next(stream) == SERVING
    await env.servicer.enter_graceful_shutdown()  # the servicer's own change still goes out
    assert await _next(stream) == NOT_SERVING
    stream.cancel()


async def test_readiness_lost_while_watching_is_streamed(env: Env) -> None:
    env.ready["value"] = True
    stream = env.health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=10)
    assert await _next(stream) == SERVING
    env.ready["value"] = False
    assert await _next(stream) == NOT_SERVING
    env.ready["value"] = True
    assert await _next(stream) == SERVING
    stream.cancel()


async def test_other_services_are_not_gated(env: Env) -> None:
    stream = env.health.Watch(health_pb2.HealthCheckRequest(service="some.other.Service"), timeout=10)
    assert await _next(stream) == UNKNOWN
    stream.cancel()


async def test_check_and_watch_agree(env: Env) -> None:
    for ready in (False, True):
        env.ready["value"] = ready
        check = await env.health.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=5)
        stream = env.health.Watch(health_pb2.HealthCheckRequest(service=SERVICE), timeout=10)
        assert await _next(stream) == check.status == (SERVING if ready else NOT_SERVING)
        stream.cancel()


async def test_undecodable_watch_request_is_invalid_argument(env: Env) -> None:
    for ready in (False, True):
        env.ready["value"] = ready
        call = env.channel.unary_stream("/grpc.health.v1.Health/Watch")(b"\xff\xff\xff", timeout=5)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            _ = [reply async for reply in call]
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
