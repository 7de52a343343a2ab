"""Undecodable request bytes are answered INVALID_ARGUMENT (not UNKNOWN) on every kind of method
registered on a server made by :func:`validate_requests`, and decodable ones reach the handler unchanged."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health, health_pb2_grpc
from grpc_health.v1.health_pb2 import HealthCheckRequest as Request
from grpc_health.v1.health_pb2 import HealthCheckResponse as Response
from grpc_reflection.v1alpha import reflection
from grpc_status import rpc_status

from eta_common.grpc_errors import UNDECODABLE, validate_requests, validating_handler

SERVICE = "test.v1.Echo"
GARBAGE = b"\xff\xff\xff\xff\x0f garbage"
VALID = Request(service="ok").SerializeToString()


def _reply(request: Request) -> Response:
    return Response(status=Response.SERVING if request.service == "ok" else Response.UNKNOWN)


async def unary(request: Request, context: Any) -> Response:
    return _reply(request)


async def unary_stream_gen(request: Request, context: Any) -> AsyncIterator[Response]:
    yield _reply(request)
    yield _reply(request)


async def unary_stream_writer(request: Request, context: Any) -> None:
    await context.write(_reply(request))


async def stream_unary(requests: AsyncIterator[Request], context: Any) -> Response:
    last = Request()
    async for request in requests:
        last = request
    return _reply(last)


async def stream_stream(requests: AsyncIterator[Request], context: Any) -> AsyncIterator[Response]:
    async for request in requests:
        yield _reply(request)


def _handlers() -> dict[str, Any]:
    kw: dict[str, Any] = {
        "request_deserializer": Request.FromString,
        "response_serializer": Response.SerializeToString,
    }
    return {
        "Unary": grpc.unary_unary_rpc_method_handler(unary, **kw),
        "UnaryStreamGen": grpc.unary_stream_rpc_method_handler(unary_stream_gen, **kw),
        "UnaryStreamWriter": grpc.unary_stream_rpc_method_handler(unary_stream_writer, **kw),
        "StreamUnary": grpc.stream_unary_rpc_method_handler(stream_unary, **kw),
        "StreamStream": grpc.stream_stream_rpc_method_handler(stream_stream, **kw),
    }


class ReadsRequestFirst(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Like the prediction admission interceptor: looks at the request before the handler runs."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    async def intercept_service(self, continuation: Any, details: Any) -> Any:
        handler = await continuation(details)
        if handler is None or handler.unary_unary is None or not details.method.startswith(f"/{SERVICE}/"):
            return handler
        inner = handler.unary_unary

        async def behavior(request: Any, context: Any) -> Any:
            self.seen.append(request.service)
            return await inner(request, context)

        return grpc.unary_unary_rpc_method_handler(
            behavior,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


@pytest.fixture
async def target() -> AsyncIterator[tuple[str, ReadsRequestFirst]]:
    interceptor = ReadsRequestFirst()
    server = validate_requests(grpc.aio.server(interceptors=[interceptor]))
    registrar = server
    handlers = _handlers()
    registrar.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    registrar.add_registered_method_handlers(SERVICE, handlers)
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), registrar)
    reflection.enable_server_reflection((SERVICE, reflection.SERVICE_NAME), registrar)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}", interceptor
    finally:
        await server.stop(0)


def _check_invalid_argument(error: grpc.aio.AioRpcError, message_name: str) -> None:
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
    status = rpc_status.from_call(error)
    assert status is not None
    bad = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(bad)
    assert [(v.field, v.description) for v in bad.field_violations] == [
        ("request", f"not a valid {message_name} (undecodable bytes)")
    ]


def test_garbage_does_not_decode() -> None:
    with pytest.raises(UNDECODABLE):
        Request.FromString(GARBAGE)


@pytest.mark.parametrize("method", ["Unary", "UnaryStreamGen", "UnaryStreamWriter"])
async def test_unary_requests(target: tuple[str, ReadsRequestFirst], method: str) -> None:
    address, interceptor = target
    async with grpc.aio.insecure_channel(address) as channel:
        path = f"/{SERVICE}/{method}"
        call_ok: Any
        call_bad: Any
        if method == "Unary":
            call_ok = channel.unary_unary(path, response_deserializer=Response.FromString)(VALID)
            call_bad = channel.unary_unary(path, response_deserializer=Response.FromString)(GARBAGE)
            assert (await call_ok).status == Response.SERVING
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call_bad
            # The interceptor saw an (empty) request message, not a foreign object.
            assert sorted(interceptor.seen) == ["", "ok"]
        else:
            multi = channel.unary_stream(path, response_deserializer=Response.FromString)
            replies = [r async for r in multi(VALID)]
            assert len(replies) == (2 if method == "UnaryStreamGen" else 1)
            assert all(r.status == Response.SERVING for r in replies)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                _ = [r async for r in multi(GARBAGE)]
        _check_invalid_argument(caught.value, Request.DESCRIPTOR.full_name)


@pytest.mark.parametrize("method", ["StreamUnary", "StreamStream"])
async def test_streaming_requests(target: tuple[str, ReadsRequestFirst], method: str) -> None:
    address, _ = target
    path = f"/{SERVICE}/{method}"
    async with grpc.aio.insecure_channel(address) as channel:
        if method == "StreamUnary":
            call = channel.stream_unary(path, response_deserializer=Response.FromString)
            assert (await call(iter([VALID, VALID]))).status == Response.SERVING
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call(iter([VALID, GARBAGE]))
        else:
            call = channel.stream_stream(path, response_deserializer=Response.FromString)
            assert [r.status async for r in call(iter([VALID]))] == [Response.SERVING]
            stream = call(iter([VALID, GARBAGE]))
            assert (await stream.read()).status == Response.SERVING  # the good one before the bad one
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stream.read()
    _check_invalid_argument(caught.value, Request.DESCRIPTOR.full_name)


async def test_health_and_reflection(target: tuple[str, ReadsRequestFirst]) -> None:
    address, _ = target
    async with grpc.aio.insecure_channel(address) as channel:
        check = channel.unary_unary("/grpc.health.v1.Health/Check")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await check(GARBAGE)
        _check_invalid_argument(caught.value, "grpc.health.v1.HealthCheckRequest")
        # Health/List is a sync handler in grpcio-health-checking (UNIMPLEMENTED, run in a thread pool).
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await channel.unary_unary("/grpc.health.v1.Health/List")(GARBAGE)
        _check_invalid_argument(caught.value, "grpc.health.v1.HealthListRequest")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await channel.unary_unary("/grpc.health.v1.Health/List")(b"")
        assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
        info = channel.stream_stream("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            _ = [r async for r in info(iter([GARBAGE]))]
        _check_invalid_argument(caught.value, "grpc.reflection.v1alpha.ServerReflectionRequest")


def test_wrapping_is_idempotent_and_skips_raw_handlers() -> None:
    handler = grpc.unary_unary_rpc_method_handler(unary, request_deserializer=Request.FromString)
    once = validating_handler(handler)
    assert once is not handler
    assert validating_handler(once) is once
    raw = grpc.unary_unary_rpc_method_handler(unary)  # takes the bytes and decodes itself
    assert validating_handler(raw) is raw


class OneMethod(grpc.GenericRpcHandler):  # type: ignore[misc]
    """A hand-written generic handler (not a ``method_handlers_generic_handler`` dictionary)."""

    def service(self, handler_call_details: Any) -> Any:
        if handler_call_details.method == "/test.v1.Custom/Unary":
            return grpc.unary_unary_rpc_method_handler(
                unary,
                request_deserializer=Request.FromString,
                response_serializer=Response.SerializeToString,
            )
        return None


async def test_hand_written_generic_handlers_are_covered_too() -> None:
    server = validate_requests(grpc.aio.server())
    server.add_generic_rpc_handlers((OneMethod(),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_unary("/test.v1.Custom/Unary", response_deserializer=Response.FromString)
            assert (await call(VALID)).status == Response.SERVING
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call(GARBAGE)
            _check_invalid_argument(caught.value, Request.DESCRIPTOR.full_name)
            with pytest.raises(grpc.aio.AioRpcError) as missing:
                await channel.unary_unary("/test.v1.Custom/Other")(VALID)
            assert missing.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        await server.stop(0)
