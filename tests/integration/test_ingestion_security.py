"""Security of the ingestion port as the Helm chart's production values run it: TLS on the gRPC port,
bearer tokens required (one per client, from a mounted file), plaintext health checks on a separate
port for Kubernetes probes.

Own stack: one ingestion process with those settings; the test TLS material is in
``services/ingestion/tests/tls``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from devstack.infra import free_port
from devstack.stack import LocalStack, ServicePorts
from eta.v1 import ingestion_pb2, ingestion_pb2_grpc
from ingestion.tests.support import driver_ping, new_id
from tests.integration.conftest import poll_until

pytestmark = pytest.mark.integration
TLS = Path(__file__).resolve().parents[2] / "services" / "ingestion" / "tests" / "tls"
DRIVER_APP_TOKEN = "drv-" + "7" * 28
POS_TOKEN = "pos-" + "3" * 28  # stored as a sha256 hash, allowed PublishEvents only
ROTATED_TOKEN = "new-" + "5" * 28


def _tokens(*lines: str) -> str:
    return "# client  token  [methods]\n" + "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    workdir = tmp_path_factory.mktemp("ingestion-security")
    tokens = workdir / "tokens"
    pos_hash = hashlib.sha256(POS_TOKEN.encode()).hexdigest()
    tokens.write_text(
        _tokens(f"driver-app {DRIVER_APP_TOKEN}", f"pos-system sha256:{pos_hash} PublishEvents")
    )
    health_port = free_port()
    stack = LocalStack(
        workdir,
        ports=ServicePorts.free(),
        use_env_endpoints=False,
        extra_env={
            "ETA_TRACES_FILE": str(workdir / "traces" / "spans-{pid}.jsonl"),
            "OTEL_BSP_SCHEDULE_DELAY": "100",
        },
    )
    try:
        stack.start_infra()
        stack.start_service(
            "ingestion",
            extra_env={
                "INGESTION_AUTH_REQUIRED": "true",
                "INGESTION_AUTH_TOKENS_FILE": str(tokens),
                "GRPC_TLS_CERT_FILE": str(TLS / "server.crt"),
                "GRPC_TLS_KEY_FILE": str(TLS / "server.key"),
                "GRPC_HEALTH_PORT": str(health_port),
                "SHUTDOWN_GRACE_SECONDS": "1",
            },
        )
        yield {"stack": stack, "tokens": tokens, "health_port": health_port, "workdir": workdir}
    finally:
        stack.stop()


def _tls(token: str | None = None) -> grpc.ChannelCredentials:
    tls = grpc.ssl_channel_credentials(root_certificates=(TLS / "ca.crt").read_bytes())
    if token is None:
        return tls
    return grpc.composite_channel_credentials(tls, grpc.access_token_call_credentials(token))


def _request() -> ingestion_pb2.PublishEventsRequest:
    return ingestion_pb2.PublishEventsRequest(events=[driver_ping(new_id("drv")) for _ in range(3)])


async def _stream_once(stub: ingestion_pb2_grpc.IngestionServiceStub, **kwargs: Any) -> Any:
    """One chunk on a new stream; the answers, or the AioRpcError the stream ended with.

    A stream the server refuses at once can end while the client is still sending its chunk; grpc.aio
    then sometimes ends the call locally with INTERNAL ("Failed execute_batch" of the send) instead of
    the server's status. That is the client library's race, not an answer: the stream is tried again."""
    for attempt in range(3):
        call = stub.StreamEvents(timeout=10, **kwargs)
        try:
            await call.write(_request())
            await call.done_writing()
        except grpc.aio.AioRpcError:
            pass  # a stream refused at once can end before the write: its status is what counts
        try:
            return [answer async for answer in call]
        except grpc.aio.AioRpcError as exc:
            local_send_failure = exc.code() == grpc.StatusCode.INTERNAL and "execute_batch" in str(
                exc.debug_error_string()
            )
            if not local_send_failure or attempt == 2:
                raise
    raise AssertionError("unreachable")


async def test_missing_or_unknown_tokens_are_unauthenticated(secured: dict[str, Any]) -> None:
    target = secured["stack"].target("ingestion")
    async with grpc.aio.secure_channel(target, _tls()) as channel:
        stub = ingestion_pb2_grpc.IngestionServiceStub(channel)
        cases: list[tuple[tuple[tuple[str, str], ...], str]] = [
            ((), "missing"),
            ((("authorization", "Bearer not-a-known-token-at-all"),), "unknown token"),
            ((("authorization", f"Basic {DRIVER_APP_TOKEN}"),), "Bearer"),
        ]
        for metadata, reason in cases:
            with pytest.raises(grpc.aio.AioRpcError) as unary:
                await stub.PublishEvents(_request(), metadata=metadata, timeout=5)
            assert unary.value.code() == grpc.StatusCode.UNAUTHENTICATED, metadata
            assert reason in (unary.value.details() or "")
            assert dict(unary.value.trailing_metadata() or ())["www-authenticate"].startswith("Bearer")
            with pytest.raises(grpc.aio.AioRpcError) as stream:
                await _stream_once(stub, metadata=metadata)
            assert stream.value.code() == grpc.StatusCode.UNAUTHENTICATED, metadata


async def test_each_client_gets_what_its_token_allows(
    secured: dict[str, Any], spans_of_workdir: Callable[[Path], list[dict[str, Any]]]
) -> None:
    target = secured["stack"].target("ingestion")
    async with grpc.aio.secure_channel(target, _tls(DRIVER_APP_TOKEN)) as channel:
        stub = ingestion_pb2_grpc.IngestionServiceStub(channel)
        assert (await stub.PublishEvents(_request(), timeout=10)).accepted == 3
        answers = await _stream_once(stub)
        assert [a.accepted for a in answers] == [3]
    async with grpc.aio.secure_channel(target, _tls(POS_TOKEN)) as channel:
        stub = ingestion_pb2_grpc.IngestionServiceStub(channel)
        assert (await stub.PublishEvents(_request(), timeout=10)).accepted == 3
        with pytest.raises(grpc.aio.AioRpcError) as denied:
            await _stream_once(stub)
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "pos-system" in (denied.value.details() or "")

    def clients(spans: list[dict[str, Any]]) -> set[str]:
        return {
            s["attributes"]["enduser.id"]
            for s in spans
            if s["kind"] == "SERVER" and "enduser.id" in s["attributes"]
        }

    seen = await poll_until(
        lambda: clients(spans_of_workdir(secured["workdir"])), lambda c: c >= {"driver-app", "pos-system"}
    )
    assert seen == {"driver-app", "pos-system"}


async def test_plaintext_is_refused_and_probes_use_the_health_port(secured: dict[str, Any]) -> None:
    stack: LocalStack = secured["stack"]
    async with grpc.aio.insecure_channel(stack.target("ingestion")) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as plaintext:
            await ingestion_pb2_grpc.IngestionServiceStub(channel).PublishEvents(_request(), timeout=5)
        assert plaintext.value.code() == grpc.StatusCode.UNAVAILABLE
    check = health_pb2.HealthCheckRequest(service="eta.v1.IngestionService")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{secured['health_port']}") as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(check, timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.aio.AioRpcError) as api:  # health only: the API is not on this port
            await ingestion_pb2_grpc.IngestionServiceStub(channel).PublishEvents(_request(), timeout=5)
        assert api.value.code() == grpc.StatusCode.UNIMPLEMENTED
    async with grpc.aio.secure_channel(stack.target("ingestion"), _tls()) as channel:  # no token needed
        reply = await health_pb2_grpc.HealthStub(channel).Check(check, timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_tokens_rotate_without_a_restart(secured: dict[str, Any]) -> None:
    """Kubernetes updates a mounted Secret in place; the service re-reads the file when it changes."""
    target = secured["stack"].target("ingestion")
    tokens: Path = secured["tokens"]
    original = await asyncio.to_thread(_swap, tokens, _tokens(f"driver-app {ROTATED_TOKEN}"))
    try:

        async def publish(token: str) -> grpc.StatusCode:
            async with grpc.aio.secure_channel(target, _tls(token)) as channel:
                try:
                    await ingestion_pb2_grpc.IngestionServiceStub(channel).PublishEvents(
                        _request(), timeout=5
                    )
                except grpc.aio.AioRpcError as exc:
                    return exc.code()
                return grpc.StatusCode.OK

        await poll_until(lambda: publish(ROTATED_TOKEN), lambda code: code == grpc.StatusCode.OK, timeout=15)
        assert await publish(DRIVER_APP_TOKEN) == grpc.StatusCode.UNAUTHENTICATED
    finally:
        await asyncio.to_thread(_swap, tokens, original)


def _swap(path: Path, text: str) -> str:
    """Replace the file atomically (like the kubelet's symlink swap); returns the old content."""
    old = path.read_text()
    staged = path.with_suffix(".new")
    staged.write_text(text)
    staged.replace(path)
    return old


@pytest.fixture
def spans_of_workdir() -> Callable[[Path], list[dict[str, Any]]]:
    def read(workdir: Path) -> list[dict[str, Any]]:
        spans: list[dict[str, Any]] = []
        for path in sorted((workdir / "traces").glob("*.jsonl")):
            spans.extend(json.loads(line) for line in path.read_text().splitlines() if line.strip())
        return spans

    return read
