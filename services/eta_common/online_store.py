"""The online store: Redis key layout, idempotent update scripts, ready rows and the serving read.

One concern per module in :mod:`eta_common.online` (key layout, the Lua scripts, the writer, the exact
read, the ready rows, the serving read); this module is their public surface: :class:`OnlineStore` is
the writer and the reader over one Redis client.
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis

from eta_common import features as F
from eta_common.feature_block import FeatureReading, RestaurantFeatures
from eta_common.online.geo import BULK_NEARBY_MIN, count_within, decode_geohashes
from eta_common.online.keys import (
    CITY,
    INITIALIZED_KEY,
    ROW_BUCKETS,
    driver_keys,
    due_key,
    restaurant_keys,
    row_bucket,
    row_key,
)
from eta_common.online.reader import OnlineReader
from eta_common.online.updates import (
    DISPATCH_ORDER_EVENTS,
    RESTAURANT_ORDER_EVENTS,
    DriverUpdate,
    RestaurantUpdate,
    update_from_event,
    update_from_facts,
)
from eta_common.online.writer import ORDER_STATE_TTL_S, OnlineWriter
from eta_common.redis_client import redis_from_url

__all__ = [
    "BULK_NEARBY_MIN",
    "CITY",
    "DISPATCH_ORDER_EVENTS",
    "INITIALIZED_KEY",
    "ORDER_STATE_TTL_S",
    "RESTAURANT_ORDER_EVENTS",
    "ROW_BUCKETS",
    "DriverUpdate",
    "FeatureReading",
    "OnlineStore",
    "RestaurantFeatures",
    "RestaurantUpdate",
    "count_within",
    "decode_geohashes",
    "driver_keys",
    "due_key",
    "restaurant_keys",
    "row_bucket",
    "row_key",
    "update_from_event",
    "update_from_facts",
]


class OnlineStore(OnlineWriter, OnlineReader):
    """Async access to the online features. One instance per process (it holds the connection)."""

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        allowed_lateness_ms: int = F.DEFAULT_ALLOWED_LATENESS_MS,
        city: str = CITY,
    ) -> None:
        OnlineWriter.__init__(self, client, allowed_lateness_ms=allowed_lateness_ms, city=city)
        self._init_reader(city)

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> OnlineStore:
        """A store on a Redis or on a Redis Cluster (any node's URL; see :mod:`eta_common.redis_client`)."""
        return cls(redis_from_url(url, decode_responses=False), **kwargs)
