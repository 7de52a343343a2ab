"""Handler wrappers: applied once per method at registration, first listed outermost, on every way a
handler gets registered (registered methods, ``method_handlers_generic_handler``, any generic handler)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from eta_common.handler_wrapping import Handler, wrap_registrations

SERVICE = "t.Wrapped"


class Recording:
    """A wrapper that tags each answer with its name and counts the handlers it built."""

    def __init__(self, name: str, trail: list[str]) -> None:
        self.name = name
        self.trail = trail
        self.built: list[str] = []

    def __call__(self, method: str, handler: Handler) -> Handler:
        self.built.append(method)
        inner = handler.unary_unary

        async def behaviour(request: bytes, context: Any) -> bytes:
            self.trail.append(f"{self.name}>")
            reply: bytes = await inner(request, context)
            self.trail.append(f"<{self.name}")
            return reply

        return grpc.unary_unary_rpc_method_handler(behaviour)


async def _echo(request: bytes, _context: Any) -> bytes:
    return request


class _AnyMethod(grpc.GenericRpcHandler):  # type: ignore[misc]
    """A generic handler of the kind grpc cannot look into: it answers any method under /t.Any/ (with
    the same handler each time; a new one would be wrapped anew)."""

    handler = grpc.unary_unary_rpc_method_handler(_echo)

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Handler:
        return self.handler if handler_call_details.method.startswith("/t.Any/") else None


@pytest.fixture
async def wrapped() -> AsyncIterator[tuple[str, list[str], Recording, Recording]]:
    trail: list[str] = []
    outer, inner = Recording("outer", trail), Recording("inner", trail)
    server = wrap_registrations(grpc.aio.server(), [outer, inner])
    handlers = {"Registered": grpc.unary_unary_rpc_method_handler(_echo)}
    server.add_registered_method_handlers(SERVICE, handlers)
    generic = {"Generic": grpc.unary_unary_rpc_method_handler(_echo)}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, generic), _AnyMethod()))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}", trail, outer, inner
    finally:
        await server.stop(0)


@pytest.mark.parametrize("method", [f"/{SERVICE}/Registered", f"/{SERVICE}/Generic", "/t.Any/Thing"])
async def test_every_registration_path_runs_the_wrappers_first_outermost(
    wrapped: tuple[str, list[str], Recording, Recording], method: str
) -> None:
    target, trail, _, _ = wrapped
    async with grpc.aio.insecure_channel(target) as channel:
        assert await channel.unary_unary(method)(b"hi", timeout=5) == b"hi"
    assert trail == ["outer>", "inner>", "<inner", "<outer"]


async def test_handlers_are_wrapped_once_per_method_not_per_call(
    wrapped: tuple[str, list[str], Recording, Recording],
) -> None:
    target, trail, outer, inner = wrapped
    # registration wrapped the two known methods, each once, by each wrapper
    assert sorted(outer.built) == sorted(inner.built) == [f"/{SERVICE}/Generic", f"/{SERVICE}/Registered"]
    async with grpc.aio.insecure_channel(target) as channel:
        for _ in range(5):
            for method in (f"/{SERVICE}/Registered", f"/{SERVICE}/Generic", "/t.Any/Thing"):
                await channel.unary_unary(method)(b"x", timeout=5)
    assert len(trail) == 5 * 3 * 4  # every call went through both wrappers
    # the opaque generic handler's method was wrapped on its first call, then reused
    assert outer.built.count("/t.Any/Thing") == inner.built.count("/t.Any/Thing") == 1


async def test_an_unknown_method_is_still_unimplemented(
    wrapped: tuple[str, list[str], Recording, Recording],
) -> None:
    target, trail, _, _ = wrapped
    async with grpc.aio.insecure_channel(target) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await channel.unary_unary("/t.Nothing/Here")(b"x", timeout=5)
    assert error.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert trail == []
