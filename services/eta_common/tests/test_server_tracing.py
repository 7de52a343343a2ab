"""The server span wrapper: a sampled call runs under its server span; a sampled-out one creates no
span work but keeps the caller's trace context current (downstream stays sampled out)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON, ParentBased, Sampler, TraceIdRatioBased

from eta_common.handler_wrapping import wrap_registrations
from eta_common.telemetry import ServerTracing, never_samples

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"


async def _current(_request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
    ctx = trace.get_current_span().get_span_context()
    if _request == b"fail":
        await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "no")
    return f"{ctx.trace_id:032x} {int(ctx.trace_flags.sampled)} {ctx.is_valid}".encode()


async def _serve(sampler: Sampler) -> tuple[grpc.aio.Server, str, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=sampler)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    server = wrap_registrations(grpc.aio.server(), [ServerTracing(provider=provider)])
    server.add_registered_method_handlers("t.T", {"Call": grpc.unary_unary_rpc_method_handler(_current)})
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}", exporter


@pytest.fixture
async def sampled_out() -> AsyncIterator[tuple[str, InMemorySpanExporter]]:
    server, target, exporter = await _serve(ParentBased(ALWAYS_OFF))
    yield target, exporter
    await server.stop(0)


@pytest.fixture
async def sampled() -> AsyncIterator[tuple[str, InMemorySpanExporter]]:
    server, target, exporter = await _serve(ALWAYS_ON)
    yield target, exporter
    await server.stop(0)


def _parent(flag: str) -> tuple[tuple[str, str], ...]:
    return (("traceparent", f"00-{TRACE_ID}-b7ad6b7169203331-{flag}"),)


async def test_a_sampled_out_call_keeps_the_callers_context_and_records_nothing(
    sampled_out: tuple[str, InMemorySpanExporter],
) -> None:
    target, exporter = sampled_out
    async with grpc.aio.insecure_channel(target) as channel:
        call = channel.unary_unary("/t.T/Call")
        assert await call(b"", metadata=_parent("00"), timeout=5) == f"{TRACE_ID} 0 True".encode()
        # a root call sampled out: a fresh trace id, still current, still not sampled
        trace_id, flag, valid = (await call(b"", timeout=5)).decode().split()
        assert (flag, valid) == ("0", "True")
        assert trace_id != TRACE_ID
    assert exporter.get_finished_spans() == ()


async def test_a_sampled_call_runs_under_its_server_span(sampled: tuple[str, InMemorySpanExporter]) -> None:
    target, exporter = sampled
    async with grpc.aio.insecure_channel(target) as channel:
        call = channel.unary_unary("/t.T/Call")
        assert await call(b"", metadata=_parent("01"), timeout=5) == f"{TRACE_ID} 1 True".encode()
        with pytest.raises(grpc.aio.AioRpcError):
            await call(b"fail", metadata=_parent("01"), timeout=5)
    # an aborted call's status reaches the client before its span ends on the server
    for _ in range(100):
        if len(exporter.get_finished_spans()) == 2:
            break
        await asyncio.sleep(0.01)
    ok, failed = exporter.get_finished_spans()
    assert ok.name == failed.name == "t.T/Call"
    assert ok.kind == trace.SpanKind.SERVER
    assert f"{ok.context.trace_id:032x}" == TRACE_ID
    assert ok.attributes is not None
    assert ok.attributes["rpc.method"] == "Call"
    assert ok.attributes["rpc.grpc.status_code"] == 0
    assert not failed.status.is_ok


def test_tracing_off_leaves_the_handlers_unwrapped() -> None:
    """``always_off`` (or the no-op provider) can record nothing: the handler is served as registered,
    with no span or context work per call; a sampler that may record keeps the wrapper."""
    handler = grpc.unary_unary_rpc_method_handler(_current)
    for provider in (TracerProvider(sampler=ALWAYS_OFF), trace.NoOpTracerProvider()):
        assert never_samples(provider)
        assert ServerTracing(provider=provider)("/t.T/Call", handler) is handler
    for sampler in (ALWAYS_ON, ParentBased(ALWAYS_OFF), TraceIdRatioBased(0.01)):
        provider = TracerProvider(sampler=sampler)
        assert not never_samples(provider)
        assert ServerTracing(provider=provider)("/t.T/Call", handler) is not handler


async def test_an_unwrapped_handler_still_answers_with_no_trace_context() -> None:
    server = wrap_registrations(
        grpc.aio.server(), [ServerTracing(provider=TracerProvider(sampler=ALWAYS_OFF))]
    )
    server.add_registered_method_handlers("t.T", {"Call": grpc.unary_unary_rpc_method_handler(_current)})
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            reply = await channel.unary_unary("/t.T/Call")(b"", metadata=_parent("01"), timeout=5)
        assert reply == f"{0:032x} 0 False".encode()
    finally:
        await server.stop(0)
