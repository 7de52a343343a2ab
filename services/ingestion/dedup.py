"""Duplicate detection by event_id, shared by every ingestion replica through Redis.

One key per event_id, ``ingest:dedup:{<shard>}:<event_id>``, in two states:

- ``p`` (pending): a request claimed the id and is publishing it. Set with ``SET NX`` and a short TTL
  (``pending_ttl_seconds``), so a replica that dies mid-publish blocks retries only briefly.
- ``a`` (accepted): the broker acknowledged the record; kept for the dedup horizon
  (``INGESTION_DEDUP_TTL_SECONDS``).

A request that finds ``a`` answers DUPLICATE. One that finds ``p`` answers UNAVAILABLE ("being published
by another request; retry"): answering DUPLICATE there could confirm an event whose first publish then
fails. When publishing fails the claim is deleted, so the client's retry is not mistaken for a
duplicate.

Cost: two Lua scripts per batch (claim, settle), one call per shard the batch touches, each call in one
pipelined round trip — per-key commands cost the Python client several times more CPU than the whole
rest of the pipeline. The shard (crc32 of the event_id modulo :data:`SHARDS`) is a hash tag, so each call
stays in one hash slot while the dedup keyspace spreads over :data:`SHARDS` slots of a Redis Cluster
(more shards: more spread, a little more client CPU per batch).

If Redis is unreachable, dedup fails open (everything counts as new): the aggregator and the archive dedup
by event_id anyway, so the cost is a possible duplicate on the topic, never a lost event.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import zlib
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError, RedisError

from ingestion import metrics

log = logging.getLogger(__name__)

PENDING = b"p"
ACCEPTED = b"a"
SHARDS = 4

# Both scripts get one declared key, the shard's prefix ``ingest:dedup:{NN}`` (its hash tag routes the
# call), and the event ids newline-separated in one argument (ids are printable, so never contain one).
# They build every key as ``<prefix>:<event_id>``, inside the same hash tag, so a call touches one slot.
# One argument instead of one per key: encoding arguments is the Python client's main cost here.

# ARGV[1]: pending TTL (ms), ARGV[2]: ids. Returns one digit per id: 0 claimed now, 1 accepted earlier,
# 2 pending (another request is publishing it).
_CLAIM = """
local out = {}
for id in string.gmatch(ARGV[2], '[^\\n]+') do
  local key = KEYS[1] .. ':' .. id
  if redis.call('SET', key, 'p', 'NX', 'PX', ARGV[1]) then
    out[#out + 1] = '0'
  elseif redis.call('GET', key) == 'a' then
    out[#out + 1] = '1'
  else
    out[#out + 1] = '2'
  end
end
return table.concat(out)
"""
# ARGV[1]: dedup TTL (ms), ARGV[2]: accepted ids (kept as 'a'), ARGV[3]: failed ids (claims deleted).
_SETTLE = """
for id in string.gmatch(ARGV[2], '[^\\n]+') do
  redis.call('SET', KEYS[1] .. ':' .. id, 'a', 'PX', ARGV[1])
end
for id in string.gmatch(ARGV[3], '[^\\n]+') do
  redis.call('DEL', KEYS[1] .. ':' .. id)
end
return 1
"""


class Claim(enum.Enum):
    NEW = 0  # claimed now: publish it
    DUPLICATE = 1  # accepted earlier within the horizon
    IN_FLIGHT = 2  # another request is publishing it right now


_CLAIMS = {"0": Claim.NEW, "1": Claim.DUPLICATE, "2": Claim.IN_FLIGHT}


class DedupStore:
    def __init__(
        self,
        client: aioredis.Redis,
        *,
        ttl_seconds: int,
        pending_ttl_seconds: float,
        timeout_seconds: float = 1.0,
    ) -> None:
        self._client = client
        self._timeout = timeout_seconds
        self._ttl_ms = int(ttl_seconds * 1000)
        self._pending_ms = max(1, int(pending_ttl_seconds * 1000))
        self._sha: dict[str, str] = {}

    @staticmethod
    def shard(event_id: str) -> int:
        return zlib.crc32(event_id.encode()) % SHARDS

    @staticmethod
    def prefix(shard: int) -> str:
        return f"ingest:dedup:{{{shard:02d}}}"

    @staticmethod
    def key(event_id: str) -> str:
        """The Redis key of an event_id."""
        return f"{DedupStore.prefix(DedupStore.shard(event_id))}:{event_id}"

    async def claim(self, event_ids: Sequence[str]) -> list[Claim]:
        """The claim state of each id (ids must be distinct)."""
        if not event_ids:
            return []
        groups: dict[int, list[int]] = defaultdict(list)
        for i, event_id in enumerate(event_ids):
            groups[self.shard(event_id)].append(i)
        calls = [
            (self.prefix(shard), [self._pending_ms, "\n".join(event_ids[i] for i in group)])
            for shard, group in groups.items()
        ]
        try:
            replies = await self._run(_CLAIM, calls)
        except (RedisError, TimeoutError) as exc:
            metrics.DEDUP_ERRORS.labels("claim").inc()
            log.warning("dedup store unavailable; treating events as new", extra={"error": str(exc)})
            return [Claim.NEW] * len(event_ids)
        states = [Claim.NEW] * len(event_ids)
        for group, reply in zip(groups.values(), replies, strict=True):
            codes = reply.decode() if isinstance(reply, bytes) else str(reply)
            for i, code in zip(group, codes, strict=True):
                states[i] = _CLAIMS[code]
        return states

    async def settle(self, accepted: Sequence[str], failed: Sequence[str]) -> None:
        """Mark acknowledged ids accepted (for the horizon) and forget the claims of failed ones."""
        if not accepted and not failed:
            return
        shards: dict[int, tuple[list[str], list[str]]] = defaultdict(lambda: ([], []))
        for event_id in accepted:
            shards[self.shard(event_id)][0].append(event_id)
        for event_id in failed:
            shards[self.shard(event_id)][1].append(event_id)
        calls = [
            (self.prefix(shard), [self._ttl_ms, "\n".join(ok), "\n".join(bad)])
            for shard, (ok, bad) in shards.items()
        ]
        try:
            await self._run(_SETTLE, calls)
        except (RedisError, TimeoutError) as exc:
            metrics.DEDUP_ERRORS.labels("settle").inc()
            log.warning(
                "could not settle dedup claims",
                extra={"error": str(exc), "accepted": len(accepted), "failed": len(failed)},
            )

    async def _run(self, script: str, calls: list[tuple[str, list[Any]]]) -> list[Any]:
        """``script`` once per (keys, args) call, pipelined: one round trip (two after a Redis restart).
        A slow Redis must not stall ingestion: past ``timeout_seconds`` this raises TimeoutError."""
        async with asyncio.timeout(self._timeout):
            return await self._run_once(script, calls)

    async def _run_once(self, script: str, calls: list[tuple[str, list[Any]]]) -> list[Any]:
        for attempt in (1, 2):
            sha = self._sha.get(script)
            if sha is None:
                sha = self._sha[script] = str(await self._client.script_load(script))
            pipe = self._client.pipeline(transaction=False)
            for prefix, args in calls:
                pipe.evalsha(sha, 1, prefix, *args)
            try:
                return list(await pipe.execute())
            except NoScriptError:  # Redis restarted or flushed its script cache
                self._sha.pop(script, None)
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")
