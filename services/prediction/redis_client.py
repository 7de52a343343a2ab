"""A minimal pipelined Redis client for the prediction hot path.

Why it exists: profiling the service showed the redis-py 8 asyncio client spending ~400 µs of CPU per
one-restaurant feature read (connection-pool checkout, per-command timeouts and tasks, the pure-Python
RESP parser reading line by line) — more than the gRPC stack and the model together. This client does
only what :class:`eta_common.online_store.OnlineStore` needs for reads — ``script_load``, ``pipeline()``
with ``evalsha`` / ``get`` / ``hmget`` / ``zcount`` / ``zrangebyscore`` / ``geosearch``, ``execute``
and ``aclose`` — over **one** connection:

* a pipeline is encoded into one buffer and written at once (one round trip), and concurrent callers
  simply queue their pipelines on the same connection (Redis answers in order), so there is no pool;
  the pipelines of one event-loop iteration share one write (one system call);
* replies are parsed from whole buffers, not line by line, by hiredis' C parser when it is installed
  (a dependency of the project) and else by :func:`parse_reply`;
* errors map to redis-py's exceptions (``NoScriptError`` lets the store reload its scripts, connection
  problems raise ``redis.exceptions.ConnectionError``), so callers handle both clients alike.

A caller that gives up on a pipeline (timeout, cancellation) loses nothing: its replies are read and
discarded when they arrive, which keeps the connection in step. :meth:`LeanRedis.reset_if_stalled`
drops the connection when its oldest unanswered pipeline is older than the Redis timeout (hung or
half-dead); the next call reconnects. Timeouts are the
caller's business (``asyncio.timeout``); connecting is bounded by ``connect_timeout``.

Supported URLs: ``redis://[[user]:password@]host[:port][/db]`` and ``rediss://`` (TLS). The same reads
through redis-py (``PREDICTION_REDIS_CLIENT=redis-py``) give identical results; an integration test
holds both to that.

**Redis Cluster.** :func:`lean_from_url` asks the URL's node whether it is in cluster mode
(:func:`eta_common.redis_client.is_cluster`) and returns a :class:`LeanRedisCluster` if so; the
single-node :class:`LeanRedis` is untouched by cluster support (not one extra step per call). The cluster
client reads the slot map with ``CLUSTER SLOTS`` from any node it knows, holds one :class:`LeanRedis`
(one connection) per primary, opened up front, and runs a pipeline as **one write per shard involved,
all sent before any reply is awaited** (parallel round trips), reassembling the replies in command order.
``MOVED`` updates the slot and resends (the whole map is re-read in the background), ``ASK`` resends
once with ``ASKING``; a connection error re-reads the map too. A shard that cannot be reached is marked
down for ``down_seconds`` (commands for it fail at once instead of waiting to connect) and its failures
raise :class:`ShardUnavailableError` while other shards still answer, so the service degrades only the
predictions that need that shard and keeps its circuit breaker for a Redis that is down as a whole.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from binascii import crc_hqx
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar, cast
from urllib.parse import unquote, urlparse

from redis.exceptions import BusyLoadingError, NoScriptError, RedisError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError

_hiredis: Any
try:  # hiredis' C parser: ~10x less CPU per reply (a batch reads ~1,300 values); optional
    import hiredis as _hiredis
except ImportError:  # pragma: no cover - the pure-Python parser below reads the same replies
    _hiredis = None

__all__ = [
    "LeanPipeline",
    "LeanRedis",
    "LeanRedisCluster",
    "ShardUnavailableError",
    "encode_commands",
    "key_slot",
    "lean_from_url",
    "parse_reply",
]

Command = Sequence[Any]
P = TypeVar("P", bound=asyncio.Protocol)
_CRLF = b"\r\n"


class _Incomplete(Exception):
    """The buffer ends inside a reply."""


# Encoded bulk strings of recent text arguments (keys, script SHAs, constants repeat on every read).
_ENCODED: dict[str, bytes] = {}
_ENCODED_MAX = 50_000


def _bulk(arg: Any) -> bytes:
    """``$<len>\r\n<bytes>\r\n`` for one argument."""
    if type(arg) is str:
        cached = _ENCODED.get(arg)
        if cached is None:
            data = arg.encode()
            cached = b"$%d\r\n%s\r\n" % (len(data), data)
            if len(_ENCODED) >= _ENCODED_MAX:
                _ENCODED.clear()
            _ENCODED[arg] = cached
        return cached
    data = _arg_bytes(arg)
    return b"$%d\r\n%s\r\n" % (len(data), data)


def _arg_bytes(arg: Any) -> bytes:
    kind = type(arg)
    if kind is bytes:
        return arg  # type: ignore[no-any-return]
    if kind is str:
        return arg.encode()  # type: ignore[no-any-return]
    if kind is int:
        return b"%d" % arg
    if kind is float:
        return repr(arg).encode()
    if isinstance(arg, bool) or arg is None:
        raise TypeError(f"cannot send {arg!r} to Redis")
    return str(arg).encode()


def encode_commands(commands: Iterable[Command]) -> bytes:
    """RESP-encode commands (arrays of bulk strings) into one buffer (hiredis' encoder when installed:
    the same bytes, half the CPU)."""
    if _hiredis is not None:
        commands = list(commands)
        try:
            return b"".join([_hiredis.pack_command(tuple(command)) for command in commands])
        except TypeError:
            pass  # an argument hiredis does not take: the encoder below decides (or refuses it)
    parts: list[bytes] = []
    append = parts.append
    for command in commands:
        append(b"*%d\r\n" % len(command))
        parts.extend(map(_bulk, command))
    return b"".join(parts)


def _error(message: str) -> RedisError:
    if message.startswith("NOSCRIPT"):
        return NoScriptError(message)
    if message.startswith("LOADING"):
        return BusyLoadingError(message)
    return ResponseError(message)


def parse_reply(buf: bytes, pos: int) -> tuple[Any, int]:
    """Parse one RESP2 reply starting at ``pos``; returns (value, next position).

    Bulk strings come back as bytes, integers as int, nil as None, arrays as lists and error replies as
    exception *objects* (raised by the caller, after the whole pipeline is read). Raises
    ``_Incomplete`` when the buffer ends inside the reply.
    """
    end = buf.find(_CRLF, pos)
    if end < 0:
        raise _Incomplete
    kind = buf[pos]
    if kind == 36:  # $ bulk string
        size = int(buf[pos + 1 : end])
        if size < 0:
            return None, end + 2
        start = end + 2
        stop = start + size
        if stop + 2 > len(buf):
            raise _Incomplete
        return buf[start:stop], stop + 2
    if kind == 58:  # : integer
        return int(buf[pos + 1 : end]), end + 2
    if kind == 42:  # * array
        count = int(buf[pos + 1 : end])
        if count < 0:
            return None, end + 2
        pos = end + 2
        items: list[Any] = []
        append = items.append
        size_of = len(buf)
        for _ in range(count):
            # Inline fast paths for the common elements: bulk strings and integers.
            kind = buf[pos] if pos < size_of else 0
            if kind == 58:
                end = buf.find(_CRLF, pos)
                if end < 0:
                    raise _Incomplete
                append(int(buf[pos + 1 : end]))
                pos = end + 2
            elif kind == 36:
                end = buf.find(_CRLF, pos)
                if end < 0:
                    raise _Incomplete
                size = int(buf[pos + 1 : end])
                if size < 0:
                    append(None)
                    pos = end + 2
                    continue
                start = end + 2
                stop = start + size
                if stop + 2 > size_of:
                    raise _Incomplete
                append(buf[start:stop])
                pos = stop + 2
            else:
                if pos >= size_of:
                    raise _Incomplete
                value, pos = parse_reply(buf, pos)
                append(value)
        return items, pos
    if kind == 43:  # + simple string
        return buf[pos + 1 : end], end + 2
    if kind == 45:  # - error
        return _error(buf[pos + 1 : end].decode("utf-8", "replace")), end + 2
    raise RedisConnectionError(f"Redis protocol error: unexpected reply type {chr(kind)!r}")


_NOT_ENOUGH_DATA = object()  # hiredis' answer while the buffer ends inside a reply


class _Pending:
    __slots__ = ("future", "remaining", "replies", "sent")

    def __init__(self, future: asyncio.Future[list[Any]], count: int, sent: float) -> None:
        self.future = future
        self.remaining = count
        self.replies: list[Any] = []
        self.sent = sent


class _RespProtocol(asyncio.Protocol):
    """One connection: writes pipelines, matches replies to them in order."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.pending: deque[_Pending] = deque()
        self.closed: BaseException | None = None
        self._buf = b""
        self._out: list[bytes] = []  # payloads waiting for this loop iteration's write
        self._reader = (
            _hiredis.Reader(
                protocolError=RedisConnectionError, replyError=_error, notEnoughData=_NOT_ENOUGH_DATA
            )
            if _hiredis is not None
            else None
        )

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # a stream transport (uvloop's is not an asyncio.Transport subclass, but has the same API)
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        reader = self._reader
        if reader is None:
            self._parse(data)
            return
        reader.feed(data)
        pending = self.pending
        try:
            while pending:
                head = pending[0]
                while head.remaining:
                    value = reader.gets()
                    if value is _NOT_ENOUGH_DATA:
                        return
                    head.replies.append(value)
                    head.remaining -= 1
                pending.popleft()
                if not head.future.done():  # a caller that gave up no longer waits
                    head.future.set_result(head.replies)
        except RedisConnectionError as exc:  # hiredis: not RESP
            self._fail(RedisConnectionError(f"Redis protocol error: {exc}"))
            if self.transport is not None:
                self.transport.close()

    def _parse(self, data: bytes) -> None:
        """data_received with the pure-Python parser (no hiredis)."""
        buf = self._buf + data if self._buf else data
        pos = 0
        pending = self.pending
        try:
            while pending:
                head = pending[0]
                while head.remaining:
                    value, pos = parse_reply(buf, pos)
                    head.replies.append(value)
                    head.remaining -= 1
                pending.popleft()
                if not head.future.done():  # a caller that gave up no longer waits
                    head.future.set_result(head.replies)
        except _Incomplete:
            pass
        except RedisConnectionError as exc:
            self._fail(exc)
            if self.transport is not None:
                self.transport.close()
            return
        self._buf = buf[pos:] if pos < len(buf) else b""

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(RedisConnectionError(f"connection to Redis lost: {exc or 'closed'}"))

    def _fail(self, exc: BaseException) -> None:
        if self.closed is None:
            self.closed = exc
        while self.pending:
            head = self.pending.popleft()
            if not head.future.done():
                head.future.set_exception(exc)

    def send(self, payload: bytes, count: int) -> asyncio.Future[list[Any]]:
        if self.closed is not None or self.transport is None or self.transport.is_closing():
            raise RedisConnectionError("connection to Redis is closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[Any]] = loop.create_future()
        self.pending.append(_Pending(future, count, loop.time()))
        # Pipelines sent in the same event-loop iteration (concurrent requests) leave in one write: one
        # send() system call for all of them instead of one each. Each is still one round trip.
        out = self._out
        out.append(payload)
        if len(out) == 1:
            loop.call_soon(self._flush)
        return future

    def _flush(self) -> None:
        out, self._out = self._out, []
        transport = self.transport
        if self.closed is None and transport is not None and not transport.is_closing():
            transport.write(out[0] if len(out) == 1 else b"".join(out))


class LeanRedis:
    """See the module docstring. One instance per process; safe for any number of concurrent callers
    on one event loop."""

    def __init__(
        self,
        host: str = "localhost",
        port: int = 6379,
        *,
        db: int = 0,
        username: str | None = None,
        password: str | None = None,
        tls: bool = False,
        connect_timeout: float = 1.0,
    ) -> None:
        self.host = host
        self.port = port
        self.db = db
        self._username = username
        self._password = password
        self._tls = tls
        self._connect_timeout = connect_timeout
        self._protocol: _RespProtocol | None = None
        self._connecting: asyncio.Future[_RespProtocol] | None = None
        # Commands every new connection sends first (after AUTH/SELECT), e.g. CLIENT TRACKING for the
        # client-side cache (:mod:`prediction.client_cache`); None: nothing more.
        self.connection_setup: Callable[[], Sequence[Command]] | None = None
        self.on_setup_error: Callable[[BaseException], None] | None = None  # a setup command failed
        self.generation = 0  # +1 per connection made: state kept per connection by Redis starts over

    @classmethod
    def from_url(cls, url: str, *, connect_timeout: float = 1.0) -> LeanRedis:
        parsed = urlparse(url)
        if parsed.scheme not in ("redis", "rediss"):
            raise ValueError(f"unsupported Redis URL scheme {parsed.scheme!r} (redis:// or rediss://)")
        path = parsed.path.lstrip("/")
        return cls(
            parsed.hostname or "localhost",
            parsed.port or 6379,
            db=int(path) if path else 0,
            username=unquote(parsed.username) if parsed.username else None,
            password=unquote(parsed.password) if parsed.password else None,
            tls=parsed.scheme == "rediss",
            connect_timeout=connect_timeout,
        )

    # --- connection -----------------------------------------------------------------------------------

    async def _connection(self) -> _RespProtocol:
        protocol = self._protocol
        if protocol is not None and protocol.closed is None:
            return protocol
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._connect())
            # retrieved here so a failure nobody waits for any more is not reported as "never retrieved"
            self._connecting.add_done_callback(lambda f: f.cancelled() or f.exception())
        try:
            return await asyncio.shield(self._connecting)
        finally:
            if self._connecting is not None and self._connecting.done():
                self._connecting = None

    def auth_commands(self) -> list[Command]:
        """What a new connection sends first to be allowed in: ``AUTH`` when the URL has a password."""
        if self._password is None:
            return []
        credentials = (self._username, self._password) if self._username else (self._password,)
        return [("AUTH", *credentials)]

    async def open_connection(self, factory: Callable[[], P]) -> P:
        """A TCP (or TLS, for ``rediss://``) connection to this Redis speaking ``factory``'s protocol;
        callers bound it, and their handshake, with :attr:`connect_timeout`."""
        context = ssl.create_default_context() if self._tls else None
        _, protocol = await asyncio.get_running_loop().create_connection(
            factory, self.host, self.port, ssl=context
        )
        return protocol

    async def _connect(self) -> _RespProtocol:
        try:
            async with asyncio.timeout(self._connect_timeout):
                protocol = await self.open_connection(_RespProtocol)
                setup = self.auth_commands()
                if self.db:
                    setup.append(("SELECT", self.db))
                if setup:
                    _raise_first_error(await protocol.send(encode_commands(setup), len(setup)))
                if self.connection_setup is not None:
                    # sent ahead of every command on this connection, not waited for: connecting costs
                    # no extra round trip (a hung Redis still shows as a read timeout, not a connect
                    # failure); Redis applies them before anything sent after them
                    commands = list(self.connection_setup())
                    sent = protocol.send(encode_commands(commands), len(commands))
                    sent.add_done_callback(self._setup_done)
        except (OSError, TimeoutError) as exc:
            where = f"{self.host}:{self.port}"
            raise RedisConnectionError(f"cannot connect to Redis at {where}: {exc!r}") from exc
        self._protocol = protocol
        self.generation += 1
        return protocol

    def _setup_done(self, sent: asyncio.Future[list[Any]]) -> None:
        if sent.cancelled():
            return
        failure = sent.exception()
        if failure is None:
            failure = next((reply for reply in sent.result() if isinstance(reply, RedisError)), None)
        if failure is not None and self.on_setup_error is not None:
            self.on_setup_error(failure)

    @property
    def connect_timeout(self) -> float:
        return self._connect_timeout

    @property
    def connected(self) -> bool:
        """A connection is open (and was not lost)."""
        protocol = self._protocol
        return protocol is not None and protocol.closed is None

    def reset_if_stalled(self, older_than: float) -> bool:
        """Drop the connection if its oldest unanswered pipeline was sent ``older_than`` seconds ago or
        more (a hung or half-dead connection; a caller merely giving up early is no reason)."""
        protocol = self._protocol
        if protocol is None or not protocol.pending:
            return False
        if asyncio.get_running_loop().time() - protocol.pending[0].sent < older_than:
            return False
        self.reset()
        return True

    def reset(self) -> None:
        """Drop the connection (pending callers fail); the next call reconnects."""
        protocol, self._protocol = self._protocol, None
        if protocol is not None and protocol.transport is not None:
            protocol.transport.close()

    async def aclose(self) -> None:
        self.reset()

    # --- commands -------------------------------------------------------------------------------------

    async def execute(self, commands: Sequence[Command]) -> list[Any]:
        """Send commands in one write and return their replies (raises the first error reply)."""
        if not commands:
            return []
        protocol = await self._connection()
        replies = await protocol.send(encode_commands(commands), len(commands))
        _raise_first_error(replies)
        return replies

    async def script_load(self, source: str) -> str:
        (sha,) = await self.execute([("SCRIPT", "LOAD", source)])
        return bytes(sha).decode()

    def pipeline(self, transaction: bool = False) -> LeanPipeline:
        if transaction:
            raise ValueError("LeanRedis pipelines are not transactions (MULTI/EXEC is not supported)")
        return LeanPipeline(self)


def _raise_first_error(replies: list[Any]) -> None:
    for reply in replies:
        if isinstance(reply, Exception):
            raise reply


class LeanPipeline:
    """The subset of redis-py's pipeline API the online store uses for reads."""

    def __init__(self, client: LeanRedis | LeanRedisCluster) -> None:
        self._client = client
        self._commands: list[Command] = []

    def evalsha(self, sha: str, numkeys: int, *keys_and_args: Any) -> LeanPipeline:
        self._commands.append(("EVALSHA", sha, numkeys, *keys_and_args))
        return self

    def get(self, name: str) -> LeanPipeline:
        self._commands.append(("GET", name))
        return self

    def zcount(self, name: str, min: Any, max: Any) -> LeanPipeline:
        self._commands.append(("ZCOUNT", name, min, max))
        return self

    def zrangebyscore(self, name: str, min: Any, max: Any) -> LeanPipeline:
        self._commands.append(("ZRANGEBYSCORE", name, min, max))
        return self

    def hmget(self, name: str, keys: str | Sequence[str], *args: str) -> LeanPipeline:
        fields = [keys] if isinstance(keys, str) else list(keys)
        self._commands.append(("HMGET", name, *fields, *args))
        return self

    def cached(self) -> list[Any] | None:
        """The replies from the client's memory when it holds them all (a client-side cache), without
        I/O; None otherwise (then :meth:`execute`)."""
        lookup = getattr(self._client, "cached", None)
        return None if lookup is None else cast(list[Any] | None, lookup(self._commands))

    def geosearch(
        self,
        name: str,
        *,
        longitude: float,
        latitude: float,
        radius: float,
        unit: str = "m",
        withhash: bool = False,
    ) -> LeanPipeline:
        command: tuple[Any, ...] = (
            "GEOSEARCH",
            name,
            "FROMLONLAT",
            longitude,
            latitude,
            "BYRADIUS",
            radius,
            unit,
        )
        self._commands.append((*command, "WITHHASH") if withhash else command)
        return self

    async def execute(self) -> list[Any]:
        commands, self._commands = self._commands, []
        return await self._client.execute(commands)


# --- Redis Cluster ------------------------------------------------------------------------------------

SLOTS = 16384
Address = tuple[str, int]


class ShardUnavailableError(RedisConnectionError):
    """One shard of a Redis Cluster cannot be reached while others still answer: the commands that need
    it failed, the rest of the cluster is fine (not a reason to treat Redis as down as a whole)."""


# Slots of recent keys (a feature read names the same restaurants' keys again and again).
_SLOT_OF: dict[Any, int] = {}
_SLOT_OF_MAX = 100_000


def key_slot(key: Any) -> int:
    """The cluster slot of a key (CRC16/XMODEM of its hash tag, as Redis computes it)."""
    slot = _SLOT_OF.get(key)
    if slot is not None:
        return slot
    data = key if type(key) is bytes else _arg_bytes(key)
    start = data.find(b"{")
    if start > -1:
        end = data.find(b"}", start + 1)
        if end > start + 1:
            data = data[start + 1 : end]
    slot = crc_hqx(data, 0) % SLOTS
    if len(_SLOT_OF) >= _SLOT_OF_MAX:
        _SLOT_OF.clear()
    _SLOT_OF[key] = slot
    return slot


_KEY_FIRST = frozenset({"HMGET", "ZCOUNT", "ZRANGEBYSCORE", "GET", "GEOSEARCH"})


def _command_key(command: Command) -> Any | None:
    """The key a command is routed by: the first key of EVAL/EVALSHA (all its keys share one slot), the
    first argument of every other command the store sends; None for a command with no key."""
    name = command[0]
    if name in ("EVALSHA", "EVAL", "evalsha", "eval"):
        return command[3] if int(command[2]) > 0 else None
    return command[1] if len(command) > 1 else None


class LeanRedisCluster:
    """:class:`LeanRedis` over a Redis Cluster (see the module docstring): the same ``execute`` /
    ``pipeline`` / ``script_load`` / ``reset_if_stalled`` / ``aclose`` surface, one LeanRedis per primary."""

    def __init__(
        self,
        seeds: Sequence[Address],
        *,
        username: str | None = None,
        password: str | None = None,
        tls: bool = False,
        connect_timeout: float = 1.0,
        down_seconds: float = 1.0,
        refresh_interval: float = 1.0,
    ) -> None:
        self._seeds = list(seeds)
        self._options: dict[str, Any] = {
            "username": username,
            "password": password,
            "tls": tls,
            "connect_timeout": connect_timeout,
        }
        self._down_seconds = down_seconds
        self._refresh_interval = refresh_interval
        self._nodes: dict[Address, LeanRedis] = {}
        self._primaries: list[LeanRedis] = []
        self._slot_node: list[LeanRedis | None] | None = None
        self._down: dict[LeanRedis, float] = {}  # node -> monotonic time until which it is not tried
        self._mapping: asyncio.Future[None] | None = None
        self._refreshed_at = -1e18
        self._refresh_task: asyncio.Task[None] | None = None

    @classmethod
    def from_url(cls, url: str, *, connect_timeout: float = 1.0) -> LeanRedisCluster:
        seed = LeanRedis.from_url(url, connect_timeout=connect_timeout)
        if seed.db:
            raise ValueError("a Redis Cluster has only database 0")
        return cls(
            [(seed.host, seed.port)],
            username=seed._username,
            password=seed._password,
            tls=seed._tls,
            connect_timeout=connect_timeout,
        )

    # --- topology -------------------------------------------------------------------------------------

    def _node(self, address: Address) -> LeanRedis:
        node = self._nodes.get(address)
        if node is None:
            node = self._nodes[address] = LeanRedis(address[0], address[1], **self._options)
        return node

    async def _ensure_map(self) -> None:
        if self._slot_node is not None:
            return
        if self._mapping is None:
            self._mapping = asyncio.ensure_future(self._load_map())
            self._mapping.add_done_callback(lambda f: f.cancelled() or f.exception())
        try:
            await asyncio.shield(self._mapping)
        finally:
            if self._mapping is not None and self._mapping.done():
                self._mapping = None

    async def _load_map(self) -> None:
        """Read CLUSTER SLOTS from the first node that answers (known primaries first, then the seeds),
        then open a connection to every primary (a shard's failure is told from a cluster's by them)."""
        candidates = list(dict.fromkeys([*((n.host, n.port) for n in self._primaries), *self._seeds]))
        errors: list[str] = []
        for address in candidates:
            node = self._node(address)
            try:
                (reply,) = await node.execute([("CLUSTER", "SLOTS")])
            except ResponseError as exc:
                if "cluster support disabled" not in str(exc):
                    errors.append(f"{address[0]}:{address[1]}: {exc}")
                    continue
                reply = [[0, SLOTS - 1, [address[0].encode(), address[1]]]]  # a standalone Redis: every slot
            except RedisError as exc:
                errors.append(f"{address[0]}:{address[1]}: {exc}")
                continue
            self._apply_map(reply, address)
            self._refreshed_at = asyncio.get_running_loop().time()
            await asyncio.gather(*(self._connect(node) for node in self._primaries), return_exceptions=True)
            return
        raise RedisConnectionError(f"cannot read the Redis Cluster slot map: {'; '.join(errors)}")

    def _apply_map(self, reply: list[Any], asked: Address) -> None:
        slot_node: list[LeanRedis | None] = [None] * SLOTS
        primaries: dict[Address, LeanRedis] = {}
        for entry in reply:
            start, end, primary = int(entry[0]), int(entry[1]), entry[2]
            host = primary[0].decode() if isinstance(primary[0], bytes) else str(primary[0])
            address = (host if host not in ("", "?") else asked[0], int(primary[1]))
            node = primaries.get(address) or self._node(address)
            primaries[address] = node
            slot_node[start : end + 1] = [node] * (end + 1 - start)
        if not primaries:
            raise ResponseError("CLUSTERDOWN the cluster serves no slot")
        self._primaries = list(primaries.values())
        self._slot_node = slot_node

    def _refresh_soon(self) -> None:
        """Re-read the slot map in the background (at most once per ``refresh_interval``)."""
        loop = asyncio.get_running_loop()
        if self._refresh_task is not None and not self._refresh_task.done():
            return
        if loop.time() - self._refreshed_at < self._refresh_interval:
            return
        self._refreshed_at = loop.time()

        async def refresh() -> None:
            with contextlib.suppress(RedisError):
                await self._load_map()

        self._refresh_task = loop.create_task(refresh())

    async def _connect(self, node: LeanRedis) -> _RespProtocol:
        """The node's connection, or a failure at once while the node is marked down."""
        protocol = node._protocol
        if protocol is not None and protocol.closed is None:
            return protocol
        loop = asyncio.get_running_loop()
        until = self._down.get(node)
        if until is not None and loop.time() < until:
            raise self._classify(node, RedisConnectionError(f"{node.host}:{node.port} is marked down"))
        try:
            protocol = await node._connection()
        except RedisConnectionError as exc:
            self._down[node] = loop.time() + self._down_seconds
            self._refresh_soon()
            raise self._classify(node, exc) from exc
        self._down.pop(node, None)
        return protocol

    def _classify(self, failed: LeanRedis, exc: RedisConnectionError) -> RedisConnectionError:
        """A shard's failure while another primary's connection is up; else the cluster's."""
        if isinstance(exc, ShardUnavailableError):
            return exc
        for node in self._primaries:
            protocol = node._protocol
            if node is not failed and protocol is not None and protocol.closed is None:
                return ShardUnavailableError(f"Redis Cluster shard {failed.host}:{failed.port}: {exc}")
        return exc

    # --- commands -------------------------------------------------------------------------------------

    async def execute(self, commands: Sequence[Command]) -> list[Any]:
        """Send each shard's commands in one write, to every shard involved at once, and return the
        replies in command order (raises the first error reply)."""
        if not commands:
            return []
        if self._slot_node is None:
            await self._ensure_map()
        replies = await self._execute(commands, 0)
        _raise_first_error(replies)
        return replies

    async def _execute(self, commands: Sequence[Command], redirections: int) -> list[Any]:
        slot_node = self._slot_node
        assert slot_node is not None
        slot_of = _SLOT_OF.get
        groups: dict[LeanRedis, list[int]] = {}
        for index, command in enumerate(commands):
            # the read path's commands take their key without the general lookup
            key = command[1] if command[0] in _KEY_FIRST else _command_key(command)
            if key is None:
                node: LeanRedis | None = self._primaries[0]
            else:
                slot = slot_of(key)
                node = slot_node[slot if slot is not None else key_slot(key)]
            if node is None:
                raise ResponseError(f"CLUSTERDOWN no node serves the slot of {key!r}")
            group = groups.get(node)
            if group is None:
                groups[node] = [index]
            else:
                group.append(index)
        if len(groups) == 1:
            node = next(iter(groups))
            replies = await self._round_trip(node, commands)
        else:
            sent: list[tuple[LeanRedis, list[int], asyncio.Future[list[Any]] | RedisConnectionError]] = []
            for node, indexes in groups.items():  # every write leaves before any reply is awaited
                try:
                    protocol = node._protocol
                    if protocol is None or protocol.closed is not None:
                        protocol = await self._connect(node)
                    part = [commands[i] for i in indexes]
                    sent.append((node, indexes, protocol.send(encode_commands(part), len(part))))
                except RedisConnectionError as exc:
                    sent.append((node, indexes, exc))
            replies = [None] * len(commands)
            failure: RedisConnectionError | None = None
            for node, indexes, pending in sent:
                try:
                    if isinstance(pending, RedisConnectionError):
                        raise pending
                    part_replies = await pending
                except RedisConnectionError as exc:
                    failure = failure or self._lost(node, exc)
                    continue
                for index, reply in zip(indexes, part_replies, strict=True):
                    replies[index] = reply
            if failure is not None:
                raise failure
        for reply in replies:
            if type(reply) is ResponseError:  # MOVED / ASK are plain ResponseErrors (others: subclasses)
                return await self._follow_redirections(commands, replies, redirections)
        return replies

    async def _round_trip(self, node: LeanRedis, commands: Sequence[Command]) -> list[Any]:
        protocol = node._protocol
        if protocol is None or protocol.closed is not None:
            protocol = await self._connect(node)
        try:
            return await protocol.send(encode_commands(commands), len(commands))
        except RedisConnectionError as exc:
            raise self._lost(node, exc) from exc

    def _lost(self, node: LeanRedis, exc: RedisConnectionError) -> RedisConnectionError:
        self._refresh_soon()
        return self._classify(node, exc)

    async def _follow_redirections(
        self, commands: Sequence[Command], replies: list[Any], redirections: int
    ) -> list[Any]:
        redirected = [
            index
            for index, reply in enumerate(replies)
            if type(reply) is ResponseError and str(reply).startswith(("MOVED ", "ASK "))
        ]
        if not redirected:
            return replies
        if redirections >= 5:
            raise ResponseError(f"too many cluster redirections: {replies[redirected[0]]}")
        moved: list[int] = []
        for index in redirected:
            kind, slot, target = str(replies[index]).split()[:3]
            host, _, port = target.rpartition(":")
            node = self._node((host or self._seeds[0][0], int(port)))
            if kind == "MOVED":
                assert self._slot_node is not None
                self._slot_node[int(slot)] = node
                moved.append(index)
            else:  # ASK: this command only, on the target node, after ASKING
                _, reply = await self._round_trip(node, [("ASKING",), commands[index]])
                replies[index] = reply
        if moved:
            self._refresh_soon()
            again = await self._execute([commands[i] for i in moved], redirections + 1)
            for index, reply in zip(moved, again, strict=True):
                replies[index] = reply
        return replies

    async def script_load(self, source: str) -> str:
        """SCRIPT LOAD on every primary (a script call runs on whichever one serves its keys)."""
        await self._ensure_map()
        results = await asyncio.gather(
            *(self._round_trip(node, [("SCRIPT", "LOAD", source)]) for node in self._primaries),
            return_exceptions=True,
        )
        for result in results:
            if isinstance(result, list) and not isinstance(result[0], Exception):
                return bytes(result[0]).decode()
        for result in results:
            if isinstance(result, BaseException):
                raise result
            if isinstance(result[0], Exception):
                raise result[0]
        raise AssertionError("unreachable")

    def pipeline(self, transaction: bool = False) -> LeanPipeline:
        if transaction:
            raise ValueError("LeanRedis pipelines are not transactions (MULTI/EXEC is not supported)")
        return LeanPipeline(self)

    @property
    def primaries(self) -> list[Address]:
        return [(node.host, node.port) for node in self._primaries]

    def reset_if_stalled(self, older_than: float) -> bool:
        """:meth:`LeanRedis.reset_if_stalled` on every node."""
        return any([node.reset_if_stalled(older_than) for node in list(self._nodes.values())])

    def reset(self) -> None:
        for node in self._nodes.values():
            node.reset()

    async def aclose(self) -> None:
        if self._refresh_task is not None:
            self._refresh_task.cancel()
        self.reset()


def lean_from_url(url: str, *, connect_timeout: float = 1.0) -> LeanRedis | LeanRedisCluster:
    """:class:`LeanRedisCluster` when ``url`` names a node of a Redis Cluster (asked once; see
    :func:`eta_common.redis_client.is_cluster`), :class:`LeanRedis` when it names a standalone Redis. If
    the node cannot be asked (Redis not up yet), the cluster client: it reads the slot map on first use
    and, if the node turns out to be standalone, sends everything to it (a little more CPU per call than
    :class:`LeanRedis`, never a ``MOVED`` storm)."""
    from eta_common.redis_client import cluster_mode

    mode = cluster_mode(url, detect_timeout=max(connect_timeout, 1.0))
    if mode is False:
        return LeanRedis.from_url(url, connect_timeout=connect_timeout)
    return LeanRedisCluster.from_url(url, connect_timeout=connect_timeout)
