"""One Redis client, the online store's scripts loaded on it, and pipelines of one round trip."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from eta_common.online.scripts import SCRIPT_NAMES, script_source

_pack_command: Any
try:  # hiredis' C packer (a dependency of the project); without it the script calls go through redis-py
    from hiredis import pack_command as _pack_command
except ImportError:  # pragma: no cover
    _pack_command = None

__all__ = ["Call", "Pipelines"]

DEADLINE_PER_COMMAND_S = 0.005
# A command as its arguments, e.g. ("EVALSHA", sha, 1, key, arg): str, bytes or int.
Call = tuple[Any, ...]


class Pipelines:
    """Scripts are loaded once (``SCRIPT LOAD``) and called by SHA inside plain pipelines, so an update
    batch or a feature read is exactly one round trip; if Redis lost its script cache (restart,
    ``SCRIPT FLUSH``) the scripts are reloaded and the pipeline retried once."""

    def __init__(self, client: aioredis.Redis) -> None:
        self.client = client
        self._sha: dict[str, str] = {}
        # The update path's script calls skip redis-py's pipeline on a single Redis (see _run_calls).
        self._direct = _pack_command is not None and not isinstance(client, RedisCluster)

    async def close(self) -> None:
        await self.client.aclose()

    async def _load_scripts(self) -> None:
        # Publish the whole table at once: a concurrent _run() must never see it half loaded.
        self._sha = {name: str(await self.client.script_load(script_source(name))) for name in SCRIPT_NAMES}

    async def _run(self, build: Callable[[Any], None], *, scripts: bool = True) -> list[Any]:
        """Build a pipeline with ``build(pipe)`` and execute it (one round trip). ``scripts=False``: the
        pipeline calls no script (reads), so none are loaded first."""
        if scripts and not self._sha:
            await self._load_scripts()
        for attempt in (1, 2):
            pipe = self.client.pipeline(transaction=False)
            build(pipe)
            try:
                return list(await pipe.execute())
            except NoScriptError:
                if attempt == 2 or not scripts:
                    raise
                await self._load_scripts()
        raise AssertionError("unreachable")

    async def _run_calls(self, calls: Callable[[dict[str, str]], Sequence[Call]]) -> list[Any]:
        """Run the script calls ``calls(sha_by_script_name)`` in one round trip, like :meth:`_run`.

        On a single Redis they are packed by hiredis into one buffer, written at once on a pooled
        connection and their replies read straight off it: redis-py's pipeline spends ~8 µs of the
        aggregator's CPU per command (argument encoding, packing, per-reply bookkeeping), and the update
        path sends one command per restaurant of a batch. A lost connection is retried once on a fresh one
        (the calls are idempotent), as redis-py's pipeline would. On a Redis Cluster, a redis-py pipeline
        (it routes each command to its slot's node)."""
        if not self._direct:

            def build(pipe: Any) -> None:
                for command, *args in calls(self._sha):
                    if command == "EVALSHA":
                        pipe.evalsha(*args)
                    else:
                        pipe.execute_command(command, *args)

            return await self._run(build)
        if not self._sha:
            await self._load_scripts()
        # Lost connections and a lost script cache are counted apart: a Redis that restarts empty gives
        # refused connections first and then NOSCRIPT, and that NOSCRIPT must still get its reload.
        reloads = failures = 0
        while True:
            try:
                return await self._send_direct([_pack_command(call) for call in calls(self._sha)])
            except NoScriptError:
                reloads += 1
                if reloads > 2:
                    raise
                await self._load_scripts()
            except RedisConnectionError:
                failures += 1
                if failures >= 3:
                    raise

    async def _send_direct(self, packed: list[bytes]) -> list[Any]:
        pool = self.client.connection_pool
        conn = await pool.get_connection()  # type: ignore[no-untyped-call]
        replies: list[Any] = []
        # One deadline for the replies rather than redis-py's timeout per reply (half the CPU of reading
        # one): the connection's socket timeout plus 5 ms per command (a script call takes ~0.1 ms).
        timeout = conn.socket_timeout
        deadline = None if not timeout else timeout + DEADLINE_PER_COMMAND_S * len(packed)
        try:
            try:
                await conn.send_packed_command(packed)
                async with asyncio.timeout(deadline):
                    for _ in packed:
                        try:
                            replies.append(await conn.read_response(timeout=math.inf))
                        except ResponseError as exc:  # read the rest: the connection stays in step
                            replies.append(exc)
            except TimeoutError as exc:
                await conn.disconnect(nowait=True)
                raise RedisTimeoutError(f"Timeout reading {len(packed)} replies") from exc
            except BaseException:
                # a failure or a cancellation mid-way leaves replies on the socket: never reuse it
                await conn.disconnect(nowait=True)
                raise
        finally:
            await pool.release(conn)
        for reply in replies:
            if isinstance(reply, ResponseError):
                raise reply
        return replies
