"""Serving reads without a Redis round trip: a client-side cache kept coherent by Redis itself.

A feed or checkout reads, per restaurant, its ready row (``HMGET rst:{R}:row``) and, per request, the
city's state (the dispatch backlog ``ZCOUNT drv:{C}:waiting``, the freshness hashes ``drv:{C}:meta`` and
``eta:aggregators``). Those keys change with events — a restaurant's row when one of its orders moves or
one of its windows passes an edge, the city's keys a few times a second — while they are read hundreds
or thousands of times a second. The round trip for them costs the server more CPU than the rest of a
single prediction's handler (~180 µs of ~290 µs in-process), so this cache keeps their replies in the
process and asks Redis to say when they change:

* **Tracking (Redis ≥ 6, RESP2 with redirection).** A second connection subscribes to
  ``__redis__:invalidate``; the read connection runs ``CLIENT TRACKING on REDIRECT <id> OPTIN`` (sent
  again by every new read connection, see ``LeanRedis.connection_setup``), and each cacheable read that
  misses is sent as ``CLIENT CACHING yes`` + the read, so Redis tracks only the keys kept here. When any
  client changes such a key, Redis pushes its name and the entry is dropped; the next read fetches it.
* **What is cached.** ``HMGET`` of rows, of the two freshness hashes and of a customer's batch features
  (with ``GET`` of their refresh marker): the reply itself. ``ZCOUNT`` of
  a backlog set: the set's scores (one ``ZRANGEBYSCORE … WITHSCORES`` on a miss), counted here for any
  range, so a count that changes only with time (orders leaving the 3-hour window) needs no new fetch.
  A ready row carries its own validity in time (``valid_until``), checked by the reader at every read,
  so a cached row is exactly what Redis would answer: the window edges never depend on invalidation.
* **Never a stale entry kept.** A fetch in flight when its key is invalidated is not stored (the
  invalidation may overtake the reply on the other connection); every entry is dropped, and caching
  stops, whenever either connection is lost or replaced (Redis forgets tracking with the connection),
  and starts again once both are back and tracking is on. ``FLUSHALL``/``FLUSHDB`` invalidate everything.
  A hung Redis or network closes no connection: the invalidation connection is pinged
  (``PREDICTION_CLIENT_CACHE_SILENCE_MS`` / 5) and a ping unanswered for the silence window stops the
  cache the same way: an entry is never served more than that window (and one ping) after Redis last
  spoke.
* **Fetched again ahead of the reads (refresh-ahead).** A key answered from the cache since it was
  stored is *hot*: when Redis invalidates it, its entry is fetched again at once, in the background (one
  round trip for every key invalidated in the same loop iteration), so the next feed that wants it finds
  it in memory instead of paying a round trip in the middle of its read. A key not read since its last
  fetch is only dropped: Redis reads for the refreshes never exceed the reads they save. The refetch is
  an ordinary fetch (tracked, and not kept when invalidated again while on its way), so it changes
  nothing about freshness. ``PREDICTION_CLIENT_CACHE_REFRESH=false`` turns it off.
* **How fresh.** An answer can trail a write by the time the invalidation takes to arrive (well under a
  millisecond on one host) — the same order as the gap between two commands of one uncached read, and
  far below the event → Redis path's own latency. Reads ``as of`` another time and the exact fallback
  path are never cached.

Single Redis only: on a Redis Cluster the service reads through :class:`~prediction.redis_client.
LeanRedisCluster` without this cache (tracking is per node; not done). ``PREDICTION_CLIENT_CACHE=false``
turns it off.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from bisect import bisect_left, bisect_right
from collections.abc import Sequence
from typing import Any, cast

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from eta_common.customer_features import MARKER_KEY as CUSTOMERS_MARKER_KEY
from eta_common.online.keys import AGGREGATORS_KEY
from prediction import metrics
from prediction.redis_client import (
    Command,
    LeanPipeline,
    LeanRedis,
    _hiredis,
    _Incomplete,
    encode_commands,
    parse_reply,
)

__all__ = ["ClientCache", "cacheable_kind"]

log = logging.getLogger(__name__)

INVALIDATE_CHANNEL = b"__redis__:invalidate"
_VALUE, _ZCOUNT = 1, 2  # the reply itself (HMGET, GET) / the sorted set's scores (ZCOUNT)
_MISSING = object()
_CACHING_YES = ("CLIENT", "CACHING", "yes")
_PING = b"*1\r\n$4\r\nPING\r\n"


def cacheable_kind(command: Command) -> int:
    """:data:`_VALUE` or :data:`_ZCOUNT` for the serving reads kept here, else 0 (sent to Redis)."""
    name = command[0]
    key = command[1] if len(command) > 1 else None
    if type(key) is not str:
        return 0
    if name == "HMGET":
        if (
            key.endswith(":row")
            or key.startswith("cust:")
            or key == AGGREGATORS_KEY
            or (key.startswith("drv:") and key.endswith(":meta"))
        ):
            return _VALUE
    elif name == "ZCOUNT":
        if key.startswith("drv:") and key.endswith(":waiting"):
            return _ZCOUNT
    elif name == "GET" and key == CUSTOMERS_MARKER_KEY:
        return _VALUE
    return 0


def _count(scores: list[float], low: Any, high: Any) -> int:
    """``ZCOUNT`` over sorted ``scores``: bounds as Redis takes them (``(x`` exclusive, ``±inf``)."""
    return max(0, _upper(scores, high) - _lower(scores, low))  # an empty range (low > high) counts 0


def _lower(scores: list[float], bound: Any) -> int:
    text = bound.decode() if isinstance(bound, bytes) else str(bound)
    if text.startswith("("):
        return bisect_right(scores, float(text[1:]))
    return bisect_left(scores, float(text))


def _upper(scores: list[float], bound: Any) -> int:
    text = bound.decode() if isinstance(bound, bytes) else str(bound)
    if text.startswith("("):
        return bisect_left(scores, float(text[1:]))
    return bisect_right(scores, float(text))


class _Invalidations(asyncio.Protocol):
    """The redirect connection: (AUTH,) learns its client id, subscribes, then hands every invalidated
    key (or None: everything) to the cache."""

    def __init__(self, cache: ClientCache, expect: list[str]) -> None:
        self.cache = cache
        self.transport: asyncio.Transport | None = None
        self.ready: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.client_id = -1
        self._expect = expect  # the replies still due before messages: "auth", "id", "subscribe"
        self._reader = _hiredis.Reader() if _hiredis is not None else None
        self._buf = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        for reply in self._replies(data):
            if isinstance(reply, Exception):
                self._fail(reply)
                return
            if self._expect:
                step = self._expect.pop(0)
                if step == "id" and isinstance(reply, int):
                    self.client_id = reply
                elif step == "subscribe" and isinstance(reply, list) and reply[:1] == [b"subscribe"]:
                    if not self.ready.done():
                        self.ready.set_result(self.client_id)
                elif step != "auth":
                    self._fail(RedisConnectionError(f"unexpected reply {reply!r} ({step})"))
                    return
            elif isinstance(reply, list) and len(reply) == 3 and reply[1] == INVALIDATE_CHANNEL:
                self.cache._invalidate(reply[2])
            self.cache._unanswered_since = None  # any reply: the channel is alive

    def _replies(self, data: bytes) -> list[Any]:
        out: list[Any] = []
        if self._reader is not None:
            self._reader.feed(data)
            while (value := self._reader.gets()) is not False:
                out.append(value)
            return out
        buf, pos = self._buf + data, 0
        try:
            while pos < len(buf):
                value, end = parse_reply(buf, pos)
                out.append(value)
                pos = end
        except _Incomplete:
            pass
        except RedisError as exc:
            out.append(exc)
        self._buf = buf[pos:]
        return out

    def _fail(self, exc: BaseException) -> None:
        if not self.ready.done():
            self.ready.set_exception(exc)
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ready.done():
            self.ready.set_exception(RedisConnectionError(f"invalidation connection lost: {exc}"))
        self.cache._lost(self)


class ClientCache:
    """A :class:`LeanRedis` with the serving reads cached (see the module docstring). Implements what
    :class:`~eta_common.online_store.OnlineStore` uses of a client: ``pipeline``, ``execute``,
    ``script_load``, ``aclose`` (and ``reset_if_stalled`` for the reader's timeouts)."""

    def __init__(
        self,
        inner: LeanRedis,
        *,
        max_entries: int = 50_000,
        retry_seconds: float = 1.0,
        heartbeat_seconds: float = 0.1,
        silence_seconds: float = 0.5,
        refresh_ahead: bool = False,
        refresh_limit: int = 2_000,
    ) -> None:
        self.inner = inner
        self._max_entries = max_entries
        self._retry = retry_seconds
        # redis key -> {HMGET fields: reply} or {_ZCOUNT: sorted scores}
        self._entries: dict[Any, dict[Any, Any]] = {}
        self._active = False  # both connections up and tracking on: entries may be used and stored
        self._generation = -1  # the read connection the entries were tracked on
        self._events = 0  # +1 per invalidation message or flush
        self._flushed_at = 0  # the last flush's event number: fetches sent before it are not stored
        self._in_flight: dict[Any, int] = {}  # key -> fetches waiting for a reply
        self._invalidated_at: dict[Any, int] = {}  # key (in flight) -> its last invalidation's number
        self._subscriber: _Invalidations | None = None
        self._starting: asyncio.Task[None] | None = None
        self._next_attempt = 0.0
        self._closed = False
        # The invalidation connection is pinged every heartbeat; with nothing heard from it for longer
        # than ``silence_seconds`` (a hung Redis or network: no FIN, so no loss is seen) the cache stops
        # serving, as for a lost connection: an entry is never trusted longer than that without news.
        self._heartbeat_seconds = heartbeat_seconds
        self._silence = silence_seconds
        self._unanswered_since: float | None = None  # the oldest ping sent since the last reply heard
        self._heartbeat: asyncio.Task[None] | None = None
        # refresh-ahead (see the module docstring): keys hit since stored, and what to fetch again
        self._refresh_ahead = refresh_ahead
        self._refresh_limit = refresh_limit  # keys fetched again per round trip at most (the rest: on read)
        self._hot: set[Any] = set()
        self._due: dict[Any, list[Any]] = {}  # key -> its entry's sub-keys (HMGET fields, (), _ZCOUNT)
        self._refreshing: asyncio.Task[None] | None = None

    # --- the client API -------------------------------------------------------------------------------

    def pipeline(self, transaction: bool = False) -> LeanPipeline:
        if transaction:
            raise ValueError("pipelines are not transactions (MULTI/EXEC is not supported)")
        return LeanPipeline(cast(Any, self))

    async def script_load(self, source: str) -> str:
        return await self.inner.script_load(source)

    def reset_if_stalled(self, older_than: float) -> bool:
        return self.inner.reset_if_stalled(older_than)

    async def aclose(self) -> None:
        self._closed = True
        self._active = False
        self._flush()
        for task in (self._starting, self._heartbeat, self._refreshing):
            if task is not None:
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
        if self._subscriber is not None and self._subscriber.transport is not None:
            self._subscriber.transport.close()
        await self.inner.aclose()

    @property
    def active(self) -> bool:
        return self._active

    def __len__(self) -> int:
        return len(self._entries)

    async def execute(self, commands: Sequence[Command]) -> list[Any]:
        inner = self.inner
        if not self._active:
            self._start_soon()
            return await inner.execute(commands)
        if inner.generation != self._generation or not inner.connected:
            # The read connection was lost or replaced: Redis tracked the entries' keys for the old
            # one only. Drop them; a new connection turns tracking on before its first command.
            self._flush()
            if not inner.connected:
                return await inner.execute(commands)
            self._generation = inner.generation
        replies, missing, hits = self._lookup(commands)
        if hits:
            metrics.CLIENT_CACHE_HITS.inc(hits)
        if missing:
            await self._fetch(commands, missing, replies)
        return replies

    def cached(self, commands: Sequence[Command]) -> list[Any] | None:
        """The replies of ``commands`` when every one is in the cache and the cache is current (active,
        on the connection Redis tracks for); None otherwise, having changed nothing (then
        :meth:`execute`). No I/O: a caller answered here awaits nothing."""
        inner = self.inner
        if not self._active or inner.generation != self._generation or not inner.connected:
            return None
        replies, missing, hits = self._lookup(commands)
        if missing:
            return None
        metrics.CLIENT_CACHE_HITS.inc(hits)
        return replies

    def _lookup(self, commands: Sequence[Command]) -> tuple[list[Any], list[tuple[int, int, Any]], int]:
        """The cached replies (None where missing), the misses as (position, kind, key) — kind 0 for a
        command never cached — and the number of hits."""
        entries = self._entries
        hot = self._hot if self._refresh_ahead else None
        replies: list[Any] = [None] * len(commands)
        missing: list[tuple[int, int, Any]] = []  # (position, kind, key)
        hits = 0
        for i, command in enumerate(commands):
            kind = cacheable_kind(command)
            if not kind:
                missing.append((i, 0, None))
                continue
            key = command[1]
            entry = entries.get(key)
            if entry is not None:
                if kind == _ZCOUNT:
                    scores = entry.get(_ZCOUNT)
                    if scores is not None:
                        replies[i] = _count(scores, command[2], command[3])
                        hits += 1
                        if hot is not None:
                            hot.add(key)
                        continue
                else:
                    value = entry.get(command[2:], _MISSING)
                    if value is not _MISSING:
                        replies[i] = list(value) if type(value) is tuple else value
                        hits += 1
                        if hot is not None:
                            hot.add(key)
                        continue
            missing.append((i, kind, key))
        return replies, missing, hits

    # --- misses ---------------------------------------------------------------------------------------

    async def _fetch(
        self,
        commands: Sequence[Command],
        missing: list[tuple[int, int, Any]],
        replies: list[Any],
        *,
        ahead: bool = False,
    ) -> None:
        """The misses (and the commands never cached) in one round trip; what was fetched is kept
        unless its key was invalidated, or the cache flushed, while the reply was on its way."""
        sent: list[Command] = []
        tracked = [key for _, kind, key in missing if kind]
        for i, kind, key in missing:
            if kind == _VALUE:
                sent += [_CACHING_YES, commands[i]]
            elif kind == _ZCOUNT:
                sent += [_CACHING_YES, ("ZRANGEBYSCORE", key, "-inf", "+inf", "WITHSCORES")]
            else:
                sent.append(commands[i])
        in_flight = self._in_flight
        for key in tracked:
            in_flight[key] = in_flight.get(key, 0) + 1
        if tracked:
            (metrics.CLIENT_CACHE_REFRESHES if ahead else metrics.CLIENT_CACHE_MISSES).inc(len(tracked))
        started, generation = self._events, self.inner.generation
        try:
            answers = await self.inner.execute(sent)
            keep = self._active and self.inner.generation == generation and self._flushed_at <= started
            invalidated = self._invalidated_at
            position = 0
            for i, kind, key in missing:
                if not kind:
                    replies[i] = answers[position]
                    position += 1
                    continue
                answer = answers[position + 1]  # after CLIENT CACHING's +OK
                position += 2
                fresh = keep and invalidated.get(key, -1) <= started
                if kind == _VALUE:
                    replies[i] = answer
                    if fresh:  # an HMGET's list kept as a tuple (never handed out: copied per hit)
                        self._store(key, commands[i][2:], tuple(answer) if type(answer) is list else answer)
                else:
                    scores = [float(score) for score in answer[1::2]]  # ascending, as Redis keeps them
                    replies[i] = _count(scores, commands[i][2], commands[i][3])
                    if fresh:
                        self._store(key, _ZCOUNT, scores)
        finally:
            for key in tracked:
                left = in_flight[key] - 1
                if left:
                    in_flight[key] = left
                else:
                    del in_flight[key]
                    self._invalidated_at.pop(key, None)

    def _store(self, key: Any, sub: Any, value: Any) -> None:
        entries = self._entries
        entry = entries.get(key)
        if entry is None:
            if len(entries) >= self._max_entries:  # the oldest key goes (Redis keeps tracking it: harmless)
                oldest = next(iter(entries))
                del entries[oldest]
                self._hot.discard(oldest)
            entry = entries[key] = {}
        entry[sub] = value

    # --- invalidation ---------------------------------------------------------------------------------

    def _invalidate(self, keys: list[bytes] | None) -> None:
        self._events += 1
        metrics.CLIENT_CACHE_INVALIDATIONS.inc()
        if keys is None:  # FLUSHALL / FLUSHDB, or Redis dropped its tracking table
            self._flush()
            return
        entries, in_flight, hot = self._entries, self._in_flight, self._hot
        for raw in keys:
            key = raw.decode() if isinstance(raw, bytes) else raw
            entry = entries.pop(key, None)
            if key in hot:  # only ever filled with refresh-ahead on
                hot.discard(key)
                if entry is not None:
                    self._due[key] = list(entry)
            if key in in_flight:
                self._invalidated_at[key] = self._events
        if self._due and (self._refreshing is None or self._refreshing.done()):
            self._refreshing = asyncio.ensure_future(self._refresh())

    async def _refresh(self) -> None:
        """Fetch the hot keys Redis invalidated again, ahead of the reads that will want them."""
        await asyncio.sleep(0)  # the invalidations of this loop iteration go in the same round trip
        while self._due and self._active and not self._closed:
            due, self._due = self._due, {}
            commands: list[Command] = []
            missing: list[tuple[int, int, Any]] = []
            for key, subs in due.items():
                if key in self._entries or key in self._in_flight:
                    continue  # a read fetched it meanwhile (or is fetching it)
                for sub in subs:
                    if type(sub) is int:  # _ZCOUNT: the sorted set's scores
                        kind, command = _ZCOUNT, ("ZCOUNT", key, "-inf", "+inf")
                    else:
                        kind, command = _VALUE, ("HMGET", key, *sub) if sub else ("GET", key)
                    missing.append((len(commands), kind, key))
                    commands.append(command)
                if len(commands) >= self._refresh_limit:
                    break  # the rest is fetched by the reads that want it
            if not commands:
                continue
            try:
                await self._fetch(commands, missing, [None] * len(commands), ahead=True)
            except (RedisError, OSError, TimeoutError) as exc:  # the reads fetch what they need
                log.debug("refresh-ahead fetch failed", extra={"error": repr(exc)})
                self._due.clear()
                return

    def _flush(self) -> None:
        self._events += 1
        self._flushed_at = self._events
        self._entries.clear()
        self._hot.clear()
        self._due.clear()

    def _deactivate(self, why: str) -> None:
        if self._active:
            log.warning("client-side cache off until tracking is back", extra={"reason": why})
        self._active = False
        metrics.CLIENT_CACHE_ACTIVE.set(0)
        self._flush()

    def _silenced(self) -> None:
        subscriber = self._subscriber
        self._subscriber = None
        self._deactivate(f"nothing heard on the invalidation connection for {self._silence:g} s")
        if subscriber is not None and subscriber.transport is not None:
            subscriber.transport.close()  # the next start opens a new one
        self._start_soon()

    async def _beat(self) -> None:
        """Ping the invalidation connection; a ping unanswered for ``silence_seconds`` stops the cache.
        Judged here, after the event loop has read what arrived (I/O callbacks run before timers in an
        iteration), so a busy or stalled loop is never taken for a silent Redis."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self._heartbeat_seconds)
            subscriber = self._subscriber
            if not self._active or subscriber is None or subscriber.transport is None:
                self._unanswered_since = None
                continue
            now = loop.time()
            if self._unanswered_since is None:
                self._unanswered_since = now
            elif now - self._unanswered_since > self._silence:
                self._unanswered_since = None
                self._silenced()
                continue
            subscriber.transport.write(_PING)

    def _setup_error(self, error: BaseException) -> None:
        """A new read connection's ``CLIENT TRACKING`` failed (a lost connection aside): what it read
        is not tracked."""
        if not isinstance(error, RedisConnectionError):
            self._deactivate(f"tracking refused: {error!r}")

    def _lost(self, subscriber: _Invalidations) -> None:
        if subscriber is self._subscriber:
            self._subscriber = None
            self._deactivate("invalidation connection lost")

    # --- (re)starting ---------------------------------------------------------------------------------

    def _start_soon(self) -> None:
        if self._closed or (self._starting is not None and not self._starting.done()):
            return
        loop = asyncio.get_running_loop()
        if loop.time() < self._next_attempt:
            return
        self._next_attempt = loop.time() + self._retry
        self._starting = asyncio.ensure_future(self._start())
        self._starting.add_done_callback(lambda task: task.cancelled() or task.exception())

    async def start(self) -> None:
        """Turn the cache on now (at service start) instead of on the first read; a failure is logged and
        retried on later reads."""
        if not self._active and not self._closed:
            await self._start()

    async def _start(self) -> None:
        """Subscribe a redirect connection, turn tracking on for the read connection, then cache."""
        inner = self.inner
        try:
            subscriber = self._subscriber
            if subscriber is None or subscriber.transport is None or subscriber.transport.is_closing():
                subscriber = await self._subscribe()
            client_id = subscriber.client_id
            tracking: list[Command] = [
                ("CLIENT", "TRACKING", "off"),
                ("CLIENT", "TRACKING", "on", "REDIRECT", client_id, "OPTIN"),
            ]
            inner.connection_setup = lambda: tracking[1:]
            inner.on_setup_error = self._setup_error
            async with asyncio.timeout(inner.connect_timeout):
                # on the current read connection (a new one sends it itself, first)
                await inner.execute(tracking)
        except (RedisError, OSError, TimeoutError) as exc:
            log.warning("client-side cache not started; retrying", extra={"error": repr(exc)})
            return
        if subscriber is not self._subscriber or self._closed:
            return  # lost meanwhile: the next call starts again
        self._flush()
        self._generation = inner.generation
        self._unanswered_since = None
        if self._heartbeat is None or self._heartbeat.done():
            self._heartbeat = asyncio.ensure_future(self._beat())
        self._active = True
        metrics.CLIENT_CACHE_ACTIVE.set(1)
        log.info("client-side cache on", extra={"redirect_client_id": client_id})

    async def _subscribe(self) -> _Invalidations:
        inner = self.inner
        commands = inner.auth_commands()
        expect = ["auth"] * len(commands) + ["id", "subscribe"]
        commands += [("CLIENT", "ID"), ("SUBSCRIBE", INVALIDATE_CHANNEL)]
        async with asyncio.timeout(inner.connect_timeout):
            subscriber = await inner.open_connection(lambda: _Invalidations(self, expect))
            assert subscriber.transport is not None
            subscriber.transport.write(encode_commands(commands))
            await subscriber.ready
        self._subscriber = subscriber
        return subscriber
