"""Who may call a gRPC service: bearer tokens per client, and TLS for the port.

**Tokens.** A token file (a Kubernetes Secret mounted as a file, in the chart) names the clients, one per
line::

    # client      token (or sha256:<hex of the token>)          methods (optional, comma separated)
    driver-app    4f0c1c3e0e8b4e7c9a1b2c3d4e5f6a7b
    kitchen-pos   sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08   PublishEvents

Tokens must be at least 16 characters. Storing ``sha256:`` hashes keeps the plain tokens out of the
file. Methods are short names (``PublishEvents``), services (``eta.v1.IngestionService``) or full names
(``/eta.v1.IngestionService/PublishEvents``); without a list the client may call every method. The file
is re-read when it changes (checked at most every ``reload_interval`` seconds), so tokens rotate without
a restart. The same lines may come inline (entries separated by newlines or ``;``).

Clients send ``authorization: Bearer <token>`` metadata. :class:`BearerAuthInterceptor` answers
``UNAUTHENTICATED`` for a missing (when required) or unknown token and ``PERMISSION_DENIED`` for a method
the client may not call. Health checking and server reflection stay open (Kubernetes probes and
``grpcurl describe`` carry no token). Inside a handler, :func:`current_client` names the caller.

**TLS.** :class:`TlsFiles` turns a certificate/key pair (optionally a client CA for mutual TLS) into
server credentials that pick up renewed files on the next handshake (cert-manager rotates them in place).
"""

from __future__ import annotations

import contextvars
import hashlib
import inspect
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from eta_common.config import ConfigError

__all__ = [
    "ANONYMOUS",
    "PUBLIC_METHOD_PREFIXES",
    "BearerAuthInterceptor",
    "Client",
    "TlsFiles",
    "TokenStore",
    "current_client",
    "parse_tokens",
]

log = logging.getLogger(__name__)

MIN_TOKEN_LENGTH = 16
ANONYMOUS = "anonymous"
# Always callable without a token: Kubernetes gRPC probes and grpcurl's schema discovery.
PUBLIC_METHOD_PREFIXES: tuple[str, ...] = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)

_current_client: contextvars.ContextVar[str | None] = contextvars.ContextVar("eta_grpc_client", default=None)


def current_client() -> str | None:
    """The authenticated client of the RPC being handled (``"anonymous"`` when auth is optional and no
    token was sent; None when no :class:`BearerAuthInterceptor` is installed)."""
    return _current_client.get()


@dataclass(frozen=True)
class Client:
    name: str
    # Empty: every method.
    methods: frozenset[str] = frozenset()

    def may_call(self, full_method: str) -> bool:
        if not self.methods:
            return True
        _, service, method = full_method.split("/", 2) if full_method.count("/") == 2 else ("", "", "")
        return bool({full_method, service, method, "*"} & self.methods)


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def parse_tokens(text: str, *, source: str) -> dict[str, Client]:
    """Token lines -> {sha256 hex of the token: client}. Raises ConfigError naming ``source`` and line."""
    out: dict[str, Client] = {}
    names: set[str] = set()
    entries = [part for line in text.splitlines() for part in line.split(";")]
    for number, raw in enumerate(entries, start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        fields = line.split()
        if len(fields) not in (2, 3):
            raise ConfigError(f"{source}: entry {number}: expected '<client> <token> [methods]'")
        name, token = fields[0], fields[1]
        methods = frozenset(m for m in (fields[2].split(",") if len(fields) == 3 else ()) if m)
        if token.startswith("sha256:"):
            digest = token.removeprefix("sha256:").lower()
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                raise ConfigError(f"{source}: entry {number}: sha256 token must be 64 hex digits")
        elif len(token) < MIN_TOKEN_LENGTH:
            raise ConfigError(f"{source}: entry {number}: token shorter than {MIN_TOKEN_LENGTH} characters")
        else:
            digest = _digest(token)
        if name in names:
            raise ConfigError(f"{source}: entry {number}: client {name!r} listed twice")
        if digest in out:
            raise ConfigError(f"{source}: entry {number}: token of {name!r} is already used")
        names.add(name)
        out[digest] = Client(name, methods)
    return out


class TokenStore:
    """Tokens from a file (re-read when it changes) and/or inline text."""

    def __init__(self, *, tokens_file: str = "", inline: str = "", reload_interval: float = 2.0) -> None:
        self._file = tokens_file
        self._inline = parse_tokens(inline, source="inline tokens") if inline else {}
        self._reload_interval = reload_interval
        self._from_file: dict[str, Client] = {}
        self._mtime: float | None = None
        self._checked = 0.0
        if tokens_file:
            self._load_file()  # fail fast at start-up

    @property
    def configured(self) -> bool:
        return bool(self._file or self._inline)

    def clients(self) -> list[str]:
        self._maybe_reload()
        return sorted(c.name for c in (*self._inline.values(), *self._from_file.values()))

    def lookup(self, token: str) -> Client | None:
        self._maybe_reload()
        digest = _digest(token)
        return self._inline.get(digest) or self._from_file.get(digest)

    def _load_file(self) -> None:
        try:
            mtime = os.stat(self._file).st_mtime
            with open(self._file, encoding="utf-8") as fh:
                text = fh.read()
        except OSError as exc:
            raise ConfigError(f"cannot read tokens file {self._file}: {exc}") from exc
        self._from_file = parse_tokens(text, source=self._file)
        self._mtime = mtime
        log.info("loaded client tokens", extra={"file": self._file, "clients": len(self._from_file)})

    def _maybe_reload(self) -> None:
        if not self._file:
            return
        now = time.monotonic()
        if now - self._checked < self._reload_interval:
            return
        self._checked = now
        try:
            changed = os.stat(self._file).st_mtime != self._mtime
        except OSError:
            changed = True
        if changed:
            try:
                self._load_file()
            except ConfigError:  # keep serving with the last good tokens (e.g. mid-rotation)
                log.exception("could not reload tokens file; keeping the previous tokens")


Denied = Callable[[grpc.StatusCode, str], None]


class BearerAuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Checks ``authorization: Bearer <token>`` on every RPC except :data:`PUBLIC_METHOD_PREFIXES`.

    ``required=False`` lets calls without a token through as :data:`ANONYMOUS`, but a token that is sent
    must still be valid. ``on_denied(code, method)`` is called for every refused call (for metrics).
    """

    def __init__(
        self,
        store: TokenStore,
        *,
        required: bool,
        public_prefixes: Sequence[str] = PUBLIC_METHOD_PREFIXES,
        on_denied: Denied | None = None,
    ) -> None:
        if required and not store.configured:
            raise ConfigError("authentication is required but no client tokens are configured")
        self._store = store
        self._required = required
        self._public = tuple(public_prefixes)
        self._on_denied = on_denied

    def authorize(
        self, method: str, metadata: Iterable[tuple[str, Any]]
    ) -> tuple[str, grpc.StatusCode | None]:
        """(client name, None) when the call may proceed, else (reason, status code)."""
        values = [v for k, v in metadata if k == "authorization"]
        if not values:
            if self._required:
                return "missing 'authorization: Bearer <token>' metadata", grpc.StatusCode.UNAUTHENTICATED
            return ANONYMOUS, None
        if len(values) > 1:
            return "more than one authorization header", grpc.StatusCode.UNAUTHENTICATED
        value = values[0].decode() if isinstance(values[0], bytes) else str(values[0])
        scheme, _, token = value.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return "authorization must be 'Bearer <token>'", grpc.StatusCode.UNAUTHENTICATED
        client = self._store.lookup(token.strip())
        if client is None:
            return "unknown token", grpc.StatusCode.UNAUTHENTICATED
        if not client.may_call(method):
            return f"client {client.name!r} may not call {method}", grpc.StatusCode.PERMISSION_DENIED
        return client.name, None

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or method.startswith(self._public):
            return handler
        who, code = self.authorize(method, handler_call_details.invocation_metadata or ())
        if code is not None:
            log.warning("call refused", extra={"method": method, "code": code.name, "reason": who})
            if self._on_denied is not None:
                self._on_denied(code, method)
            return _refusing(handler, code, who)
        return _as_client(handler, who)


def _wrap(handler: grpc.RpcMethodHandler, wrap: Callable[[Any], Any]) -> grpc.RpcMethodHandler:
    """The same kind of handler with its behaviour replaced by ``wrap(behaviour)``."""
    kinds: Mapping[str, Callable[..., grpc.RpcMethodHandler]] = {
        "unary_unary": grpc.unary_unary_rpc_method_handler,
        "unary_stream": grpc.unary_stream_rpc_method_handler,
        "stream_unary": grpc.stream_unary_rpc_method_handler,
        "stream_stream": grpc.stream_stream_rpc_method_handler,
    }
    for attribute, factory in kinds.items():
        behaviour = getattr(handler, attribute)
        if behaviour is not None:
            return factory(
                wrap(behaviour),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
    return handler


def _refusing(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, reason: str) -> grpc.RpcMethodHandler:
    async def refuse(_request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        if code == grpc.StatusCode.UNAUTHENTICATED:
            context.set_trailing_metadata((("www-authenticate", 'Bearer realm="eta-platform"'),))
        await context.abort(code, reason)

    return _wrap(handler, lambda _behaviour: refuse)


def _as_client(handler: grpc.RpcMethodHandler, client: str) -> grpc.RpcMethodHandler:
    """Runs the behaviour with :func:`current_client` set. Every RPC runs in its own asyncio task (its own
    context copy), so the value never leaks into another call."""

    def wrap(behaviour: Any) -> Any:
        if inspect.isasyncgenfunction(behaviour):

            async def run_generator(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                _current_client.set(client)
                async for item in behaviour(request, context):
                    yield item

            return run_generator

        async def run(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            _current_client.set(client)
            return await behaviour(request, context)

        return run

    return _wrap(handler, wrap)


@dataclass(frozen=True)
class TlsFiles:
    """PEM files for the server's TLS. ``client_ca_file`` turns on mutual TLS (clients must present a
    certificate signed by that CA)."""

    cert_file: str
    key_file: str
    client_ca_file: str = ""

    def _read(self) -> tuple[tuple[float, ...], Any]:
        paths = [p for p in (self.cert_file, self.key_file, self.client_ca_file) if p]
        try:
            stamps = tuple(os.stat(p).st_mtime for p in paths)
            with open(self.cert_file, "rb") as cert, open(self.key_file, "rb") as key:
                pair = (key.read(), cert.read())
            ca = None
            if self.client_ca_file:
                with open(self.client_ca_file, "rb") as fh:
                    ca = fh.read()
        except OSError as exc:
            raise ConfigError(f"cannot read TLS files: {exc}") from exc
        config = grpc.ssl_server_certificate_configuration([pair], root_certificates=ca)
        return stamps, config

    def server_credentials(self) -> grpc.ServerCredentials:
        """Credentials that re-read the files on the next handshake after they changed."""
        stamps, initial = self._read()
        state = {"stamps": stamps}

        def fetch() -> Any:
            try:
                current = tuple(
                    os.stat(p).st_mtime for p in (self.cert_file, self.key_file, self.client_ca_file) if p
                )
                if current == state["stamps"]:
                    return None
                state["stamps"], config = self._read()
                log.info("reloaded TLS certificate", extra={"cert_file": self.cert_file})
                return config
            except (OSError, ConfigError):
                log.exception("could not reload TLS files; keeping the current certificate")
                return None

        return grpc.dynamic_ssl_server_credentials(
            initial, fetch, require_client_authentication=bool(self.client_ca_file)
        )
