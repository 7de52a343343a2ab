"""eta_common.auth: token files, the bearer-token interceptor on every kind of RPC, and TLS (including
mutual TLS and certificate reload), against an in-process gRPC server."""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from eta_common.auth import (
    ANONYMOUS,
    BearerAuthInterceptor,
    Client,
    TlsFiles,
    TokenStore,
    current_client,
    parse_tokens,
)
from eta_common.config import ConfigError

TLS = Path(__file__).resolve().parent / "tls"
TOKEN_A = "a" * 32
TOKEN_B = "b" * 32


def test_token_lines() -> None:
    hashed = hashlib.sha256(TOKEN_B.encode()).hexdigest()
    clients = parse_tokens(
        f"# comment\n\ndriver-app {TOKEN_A}\n"
        f"pos sha256:{hashed.upper()} PublishEvents,eta.v1.Other  # scoped",
        source="t",
    )
    assert {c.name: c.methods for c in clients.values()} == {
        "driver-app": frozenset(),
        "pos": frozenset({"PublishEvents", "eta.v1.Other"}),
    }
    assert parse_tokens(f"x {TOKEN_A}; y {TOKEN_B}", source="inline").keys() == {
        hashlib.sha256(t.encode()).hexdigest() for t in (TOKEN_A, TOKEN_B)
    }


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("lonely", "expected"),
        ("a short", "shorter than 16"),
        ("a sha256:xyz", "64 hex digits"),
        (f"a {TOKEN_A}\na {TOKEN_B}", "listed twice"),
        (f"a {TOKEN_A}\nb {TOKEN_A}", "already used"),
        (f"a {TOKEN_A} m extra", "expected"),
    ],
)
def test_bad_token_lines_fail_fast(text: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem):
        parse_tokens(text, source="tokens.txt")


def test_method_scopes() -> None:
    scoped = Client("pos", frozenset({"PublishEvents", "eta.v1.Other"}))
    assert scoped.may_call("/eta.v1.IngestionService/PublishEvents")
    assert scoped.may_call("/eta.v1.Other/Anything")
    assert not scoped.may_call("/eta.v1.IngestionService/StreamEvents")
    assert Client("all").may_call("/x.Y/Z")


def test_token_file_is_reread_when_it_changes_and_a_broken_edit_keeps_the_old_tokens(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text(f"a {TOKEN_A}\n")
    store = TokenStore(tokens_file=str(path), reload_interval=0)
    assert store.lookup(TOKEN_A) == Client("a")
    path.write_text(f"b {TOKEN_B}\n")
    os.utime(path, (1, 1))  # a different mtime, whatever the clock resolution
    assert store.lookup(TOKEN_A) is None
    assert store.lookup(TOKEN_B) == Client("b")
    path.write_text("garbage line without token ok?\n")
    os.utime(path, (2, 2))
    assert store.lookup(TOKEN_B) == Client("b")
    with pytest.raises(ConfigError, match="cannot read"):
        TokenStore(tokens_file=str(tmp_path / "missing"))


def test_required_auth_without_tokens_fails_fast() -> None:
    with pytest.raises(ConfigError, match="no client tokens"):
        BearerAuthInterceptor(TokenStore(), required=True)


@pytest.mark.parametrize(
    ("required", "metadata", "outcome"),
    [
        (True, [], "UNAUTHENTICATED"),
        (False, [], ANONYMOUS),
        (False, [("authorization", "Bearer nope-nope-nope-nope")], "UNAUTHENTICATED"),
        (True, [("authorization", f"Bearer {TOKEN_A}")], "a"),
        (True, [("authorization", f"bearer   {TOKEN_A}  ")], "a"),
        (True, [("authorization", TOKEN_A)], "UNAUTHENTICATED"),
        (
            True,
            [("authorization", f"Bearer {TOKEN_A}"), ("authorization", f"Bearer {TOKEN_A}")],
            "UNAUTHENTICATED",
        ),
        (True, [("authorization", f"Bearer {TOKEN_B}")], "PERMISSION_DENIED"),
    ],
)
def test_authorize(required: bool, metadata: list[tuple[str, str]], outcome: str) -> None:
    store = TokenStore(inline=f"a {TOKEN_A}; b {TOKEN_B} OtherMethod")
    who, code = BearerAuthInterceptor(store, required=required).authorize("/s.S/Method", metadata)
    assert (code.name if code is not None else who) == outcome


# ------------------------------------------------------------------------------ in-process server ---


async def _whoami(_request: bytes, _context: Any) -> bytes:
    return (current_client() or "-").encode()


async def _whoami_stream(requests: AsyncIterator[bytes], _context: Any) -> AsyncIterator[bytes]:
    async for _ in requests:
        yield (current_client() or "-").encode()


async def _start(interceptors: list[Any], credentials: Any = None) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server(interceptors=interceptors)
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "t.S",
                {
                    "Unary": grpc.unary_unary_rpc_method_handler(_whoami),
                    "Stream": grpc.stream_stream_rpc_method_handler(_whoami_stream),
                },
            ),
        )
    )
    port = (
        server.add_secure_port("127.0.0.1:0", credentials)
        if credentials
        else server.add_insecure_port("127.0.0.1:0")
    )
    await server.start()
    return server, port


async def _calls(channel: grpc.aio.Channel, metadata: Any = None) -> tuple[str, str]:
    """(unary answer or status name, stream answer or status name)."""
    out = []
    try:
        out.append((await channel.unary_unary("/t.S/Unary")(b"", metadata=metadata, timeout=5)).decode())
    except grpc.aio.AioRpcError as exc:
        out.append(exc.code().name)
    stream = channel.stream_stream("/t.S/Stream")(metadata=metadata, timeout=5)
    try:
        await stream.write(b"")
        await stream.done_writing()
        out.append(b"".join([m async for m in stream]).decode())
    except grpc.aio.AioRpcError:
        out.append((await stream.code()).name)
    return out[0], out[1]


async def test_interceptor_on_unary_and_streaming_calls() -> None:
    denied: list[str] = []
    store = TokenStore(inline=f"a {TOKEN_A}; b {TOKEN_B} Unary")
    interceptor = BearerAuthInterceptor(
        store, required=True, on_denied=lambda code, m: denied.append(code.name)
    )
    server, port = await _start([interceptor])
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            assert await _calls(channel) == ("UNAUTHENTICATED", "UNAUTHENTICATED")
            assert await _calls(channel, [("authorization", f"Bearer {TOKEN_A}")]) == ("a", "a")
            assert await _calls(channel, [("authorization", f"Bearer {TOKEN_B}")]) == (
                "b",
                "PERMISSION_DENIED",
            )
    finally:
        await server.stop(0)
    assert denied == ["UNAUTHENTICATED", "UNAUTHENTICATED", "PERMISSION_DENIED"]


async def test_tls_and_mutual_tls() -> None:
    server, port = await _start(
        [], TlsFiles(str(TLS / "server.crt"), str(TLS / "server.key")).server_credentials()
    )
    ca = (TLS / "ca.crt").read_bytes()
    try:
        async with grpc.aio.secure_channel(f"localhost:{port}", grpc.ssl_channel_credentials(ca)) as channel:
            assert await _calls(channel) == ("-", "-")
        async with grpc.aio.insecure_channel(f"localhost:{port}") as channel:
            assert await _calls(channel) == ("UNAVAILABLE", "UNAVAILABLE")
    finally:
        await server.stop(0)

    mutual = TlsFiles(str(TLS / "server.crt"), str(TLS / "server.key"), str(TLS / "ca.crt"))
    server, port = await _start([], mutual.server_credentials())
    client_cert = ((TLS / "client.key").read_bytes(), (TLS / "client.crt").read_bytes())
    try:
        with_cert = grpc.ssl_channel_credentials(ca, *client_cert)
        async with grpc.aio.secure_channel(f"localhost:{port}", with_cert) as channel:
            assert await _calls(channel) == ("-", "-")
        async with grpc.aio.secure_channel(f"localhost:{port}", grpc.ssl_channel_credentials(ca)) as channel:
            assert await _calls(channel) == ("UNAVAILABLE", "UNAVAILABLE")
    finally:
        await server.stop(0)


async def test_renewed_certificate_is_served_without_a_restart(tmp_path: Path) -> None:
    """The first handshake after the files changed uses the new pair (cert-manager renews in place)."""
    for name in ("server.crt", "server.key"):
        shutil.copy(TLS / name, tmp_path / name)
    files = TlsFiles(str(tmp_path / "server.crt"), str(tmp_path / "server.key"))
    server, port = await _start([], files.server_credentials())
    try:
        (tmp_path / "server.crt").write_bytes((TLS / "client.crt").read_bytes())  # a cert for another name
        (tmp_path / "server.key").write_bytes((TLS / "client.key").read_bytes())
        os.utime(tmp_path / "server.crt", (3, 3))
        creds = grpc.ssl_channel_credentials((TLS / "ca.crt").read_bytes())
        async with grpc.aio.secure_channel(f"localhost:{port}", creds) as channel:
            assert await _calls(channel) == ("UNAVAILABLE", "UNAVAILABLE")  # now presents the client cert
    finally:
        await server.stop(0)
    with pytest.raises(ConfigError):
        TlsFiles(str(tmp_path / "nope.crt"), str(tmp_path / "nope.key")).server_credentials()
