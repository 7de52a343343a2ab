"""Bytes that are not a method's request message get INVALID_ARGUMENT (with a ``google.rpc.BadRequest``
violation on ``request``) from every method of every service — never UNKNOWN.

The methods are not listed by hand: each service process is asked (server reflection) which services it
serves, and the methods and their request types come from the protobuf descriptors, so a new method or
service is covered without touching this test. Every service defined in ``protos/eta/v1`` must be served
by one of the three processes.
"""

from __future__ import annotations

import random
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pool, message_factory
from google.protobuf.descriptor import MethodDescriptor
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status

from devstack.stack import SERVICES, LocalStack
from eta.v1 import eta_pb2, events_pb2, features_pb2, ingestion_pb2
from eta_common.grpc_errors import UNDECODABLE

pytestmark = pytest.mark.integration

PROTO_MODULES = (eta_pb2, events_pb2, features_pb2, ingestion_pb2)
# The services every process also serves (their descriptors must be in the default pool too).
STANDARD_MODULES = (health_pb2, reflection_pb2)
FIXED_GARBAGE = (b"\xff", b"\xff\xff\xff\xff\x0f not a message", b"\x0a\xff\xff\xff\xff\x0f")
RANDOM_SAMPLES = 4  # random byte strings per method (all of them undecodable as its request)


async def _served(channel: grpc.aio.Channel) -> list[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    replies = [
        r
        async for r in stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
    ]
    return sorted(s.name for s in replies[0].list_services_response.service)


def _garbage(method: MethodDescriptor, rng: random.Random) -> list[bytes]:
    """Fixed and random byte strings that the method's request type refuses to decode."""
    message_type = message_factory.GetMessageClass(method.input_type)
    samples = list(FIXED_GARBAGE)
    while len(samples) < len(FIXED_GARBAGE) + RANDOM_SAMPLES:
        candidate = rng.randbytes(rng.randint(1, 200))
        try:
            message_type.FromString(candidate)
        except UNDECODABLE:
            samples.append(candidate)
    for sample in samples:
        with pytest.raises(UNDECODABLE):
            message_type.FromString(sample)
    return samples


async def _call(channel: grpc.aio.Channel, method: MethodDescriptor, raw: bytes) -> grpc.aio.AioRpcError:
    """Send ``raw`` as the (only) request message, bytes as they are; return the error the call ended with."""
    path = f"/{method.containing_service.full_name}/{method.name}"
    call: Any
    try:
        if method.client_streaming and method.server_streaming:
            call = channel.stream_stream(path)(iter([raw]), timeout=10)
            _ = [reply async for reply in call]
        elif method.client_streaming:
            await channel.stream_unary(path)(iter([raw]), timeout=10)
        elif method.server_streaming:
            call = channel.unary_stream(path)(raw, timeout=10)
            _ = [reply async for reply in call]
        else:
            await channel.unary_unary(path)(raw, timeout=10)
    except grpc.aio.AioRpcError as error:
        return error
    raise AssertionError(f"{path} answered undecodable bytes {raw!r} without an error")


async def test_every_method_of_every_service_refuses_undecodable_bytes(
    stack: LocalStack, channels: dict[str, grpc.aio.Channel]
) -> None:
    pool = descriptor_pool.Default()
    rng = random.Random(20261206)
    served: dict[str, list[str]] = {name: await _served(channels[name]) for name in SERVICES}
    ours = {s.full_name for module in PROTO_MODULES for s in module.DESCRIPTOR.services_by_name.values()}
    assert ours <= {s for names in served.values() for s in names}, served  # every API service is served
    checked: list[str] = []
    for process, service_names in served.items():
        for service_name in service_names:
            try:
                service = pool.FindServiceByName(service_name)
            except KeyError:
                raise AssertionError(
                    f"{process} serves {service_name}: import its _pb2 module here"
                ) from None
            for method in service.methods:
                for raw in _garbage(method, rng):
                    error = await _call(channels[process], method, raw)
                    where = f"{process} {service_name}/{method.name} <- {raw!r}"
                    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (where, error)
                    status = rpc_status.from_call(error)
                    assert status is not None, where
                    bad = error_details_pb2.BadRequest()
                    assert len(status.details) == 1, where
                    assert status.details[0].Unpack(bad), where
                    assert [v.field for v in bad.field_violations] == ["request"], where
                    assert f"not a valid {method.input_type.full_name}" in bad.field_violations[0].description
                checked.append(f"{process}:{service_name}/{method.name}")
    # The API methods named in the issue, plus health and reflection on each of the three processes.
    for expected in (
        "aggregator:eta.v1.FeatureService/GetRestaurantFeatures",
        "prediction:eta.v1.EtaService/PredictEta",
        "prediction:eta.v1.EtaService/PredictEtaBatch",
        "ingestion:eta.v1.IngestionService/PublishEvents",
        "ingestion:eta.v1.IngestionService/StreamEvents",
        *(f"{p}:grpc.health.v1.Health/{m}" for p in SERVICES for m in ("Check", "Watch")),
        *(f"{p}:grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo" for p in SERVICES),
    ):
        assert expected in checked, (expected, checked)


async def test_decodable_requests_still_answered(channels: dict[str, grpc.aio.Channel]) -> None:
    """The same path with a well-formed message: the handlers behind the check still answer."""
    reply = await channels["prediction"].unary_unary(
        "/eta.v1.EtaService/PredictEta", response_deserializer=eta_pb2.PredictEtaResponse.FromString
    )(
        eta_pb2.PredictEtaRequest(
            restaurant_id="rst-undecodable-test",
            restaurant_location=events_pb2.GeoPoint(lat=52.52, lng=13.40),
            customer_location=events_pb2.GeoPoint(lat=52.53, lng=13.43),
        ).SerializeToString(),
        timeout=10,
    )
    assert reply.eta_minutes > 0
    features = await channels["aggregator"].unary_unary(
        "/eta.v1.FeatureService/GetRestaurantFeatures",
        response_deserializer=features_pb2.GetRestaurantFeaturesResponse.FromString,
    )(
        features_pb2.GetRestaurantFeaturesRequest(restaurant_id="rst-undecodable-test").SerializeToString(),
        timeout=10,
    )
    assert features.restaurant_id == "rst-undecodable-test"
