"""Admission control on a real in-process gRPC server: calls beyond the limit are shed with
RESOURCE_EXHAUSTED at once, and health reports NOT_SERVING only while the service cannot answer."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY

from eta.v1 import eta_pb2, eta_pb2_grpc
from eta_common.grpc_errors import validating
from eta_common.handler_wrapping import wrap_registrations
from prediction import metrics
from prediction.admission import Admission

SERVICE = "eta.v1.EtaService"


class Held(eta_pb2_grpc.EtaServiceServicer):
    """Calls wait until released, so the number in flight is under the test's control."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.started = 0

    async def PredictEta(
        self, request: eta_pb2.PredictEtaRequest, context: Any
    ) -> eta_pb2.PredictEtaResponse:
        self.started += 1
        await self.release.wait()
        return eta_pb2.PredictEtaResponse(restaurant_id=request.restaurant_id)

    async def PredictEtaBatch(
        self, request: eta_pb2.PredictEtaBatchRequest, context: Any
    ) -> eta_pb2.PredictEtaBatchResponse:
        self.started += 1
        await self.release.wait()
        return eta_pb2.PredictEtaBatchResponse()


class Env:
    def __init__(
        self,
        servicer: Held,
        admission: Admission,
        channel: grpc.aio.Channel,
        ready: dict[str, bool],
    ) -> None:
        self.servicer = servicer
        self.admission = admission
        self.stub = eta_pb2_grpc.EtaServiceStub(channel)
        self.health = health_pb2_grpc.HealthStub(channel)
        self._ready = ready

    @property
    def ready(self) -> bool:
        return self._ready["value"]

    @ready.setter
    def ready(self, value: bool) -> None:
        self._ready["value"] = value


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    servicer = Held()
    ready = {"value": True}
    admission = Admission(
        service=SERVICE,
        max_units=3,
        costs={"PredictEtaBatch": lambda request: 1 + len(request.restaurants) // 10},
        ready=lambda: ready["value"],
    )
    server = wrap_registrations(grpc.aio.server(), [admission, validating])  # as the bootstrap builds it
    eta_pb2_grpc.add_EtaServiceServicer_to_server(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    for name in ("", SERVICE):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    result = Env(servicer, admission, channel, ready)
    try:
        yield result
    finally:
        servicer.release.set()
        await channel.close()
        await server.stop(0)


async def _until_started(env: Env, n: int) -> None:
    for _ in range(500):
        if env.servicer.started >= n:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{n} calls did not start")


async def test_calls_over_the_limit_are_shed_at_once(env: Env) -> None:
    shed_before = metrics.REJECTED.labels("PredictEta", "overloaded")._value.get()
    held = [
        asyncio.ensure_future(
            env.stub.PredictEta(eta_pb2.PredictEtaRequest(restaurant_id=f"r{i}"), timeout=10)
        )
        for i in range(3)
    ]
    await _until_started(env, 3)
    assert env.admission.in_flight == 3
    assert REGISTRY.get_sample_value("eta_prediction_in_flight_units") == 3  # read at scrape time
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await env.stub.PredictEta(eta_pb2.PredictEtaRequest(restaurant_id="extra"), timeout=10)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "PREDICTION_MAX_IN_FLIGHT" in (info.value.details() or "")
    assert metrics.REJECTED.labels("PredictEta", "overloaded")._value.get() - shed_before == 1
    env.servicer.release.set()
    replies = await asyncio.gather(*held)
    assert [r.restaurant_id for r in replies] == ["r0", "r1", "r2"]
    assert env.admission.in_flight == 0
    # capacity is back
    assert (
        await env.stub.PredictEta(eta_pb2.PredictEtaRequest(restaurant_id="after"), timeout=10)
    ).restaurant_id


async def test_a_batch_weighs_by_its_size_but_is_admitted_alone(env: Env) -> None:
    big = eta_pb2.PredictEtaBatchRequest(restaurants=[eta_pb2.RestaurantLocation() for _ in range(50)])
    first = asyncio.ensure_future(env.stub.PredictEtaBatch(big, timeout=10))  # 6 units > limit 3, but alone
    await _until_started(env, 1)
    assert env.admission.in_flight == 6
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await env.stub.PredictEta(eta_pb2.PredictEtaRequest(restaurant_id="x"), timeout=10)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    env.servicer.release.set()
    await first


async def test_health_is_not_serving_only_while_the_service_cannot_answer(env: Env) -> None:
    for service in ("", SERVICE):
        reply = await env.health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    env.ready = False
    for service in ("", SERVICE):
        reply = await env.health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
    env.ready = True
    reply = await env.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_rpc_latency_is_recorded_per_method_and_code(env: Env) -> None:
    env.servicer.release.set()
    ok = metrics.RPC_LATENCY.labels("PredictEta", "OK")
    before = sum(b.get() for b in ok._buckets)
    await env.stub.PredictEta(eta_pb2.PredictEtaRequest(restaurant_id="r"), timeout=10)
    assert sum(b.get() for b in ok._buckets) - before == 1
