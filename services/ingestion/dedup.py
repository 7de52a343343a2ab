"""Duplicate detection by event_id, shared across ingestion replicas through Redis.

``claim`` atomically marks ids as seen (SET NX EX); ids already marked are duplicates. When publishing
fails, ``release`` forgets the ids so the client's retry is not mistaken for a duplicate. If Redis is
unreachable, dedup fails open (everything counts as new): the aggregator and the archive dedup by
event_id anyway, so the cost is a possible duplicate on the topic, never a lost event.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import redis.asyncio as aioredis
from redis.exceptions import RedisError

log = logging.getLogger(__name__)


class DedupStore:
    def __init__(self, client: aioredis.Redis, *, ttl_seconds: int) -> None:
        self._client = client
        self._ttl = ttl_seconds

    @staticmethod
    def _key(event_id: str) -> str:
        return f"ingest:dedup:{event_id}"

    async def claim(self, event_ids: Sequence[str]) -> list[bool]:
        """True for each id claimed now (new), False for duplicates (also within the same batch)."""
        if not event_ids:
            return []
        try:
            pipe = self._client.pipeline(transaction=False)
            for event_id in event_ids:
                pipe.set(self._key(event_id), b"1", nx=True, ex=self._ttl)
            return [bool(x) for x in await pipe.execute()]
        except RedisError as exc:
            log.warning("dedup store unavailable; treating events as new", extra={"error": str(exc)})
            seen: set[str] = set()
            out = []
            for event_id in event_ids:
                out.append(event_id not in seen)
                seen.add(event_id)
            return out

    async def release(self, event_ids: Sequence[str]) -> None:
        if not event_ids:
            return
        try:
            await self._client.delete(*(self._key(event_id) for event_id in event_ids))
        except RedisError as exc:
            log.warning("could not release dedup claims", extra={"error": str(exc), "count": len(event_ids)})
