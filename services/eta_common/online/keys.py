"""The online store's Redis key layout.

Hash tags keep one restaurant's keys, one city's keys and one due bucket's key in one Redis Cluster slot
each, so every script call touches one slot and stays atomic.

=============================  ======  ===========================================================
key                            type    content
=============================  ======  ===========================================================
``rst:{R}:placed``             zset    order_id → PLACED event time (ms); windowed order counts
``rst:{R}:o:<order_id>``       hash    accepted / ready / cancelled / picked event times of one order (TTL)
``rst:{R}:kitchen``            zset    order_id → ACCEPTED time, while in the kitchen
``rst:{R}:prep``               zset    "order_id:prep_ms" → READY time; windowed mean prep time
``rst:{R}:pickup``             zset    "order_id:wait_ms" → PICKED_UP time; windowed mean pickup wait
``rst:{R}:meta``               hash    lat, lng, status, status_ms, and per feature group (``orders``,
                                       ``kitchen``, ``status``, ``pickup``)
                                       ``u:<group>`` (wall time of last change, ms),
                                       ``e:<group>`` (latest event time reflected, ms) and
                                       ``t:<group>`` (the sampled writer span)
``rst:{R}:row``                hash    the **ready row**: ``w`` every restaurant feature at the time it
                                       was computed with ``valid_until`` (see ``rows``), ``s`` the
                                       materialised free-driver count with its as-of time
``eta:rows:{C:<b>}``           zset    restaurant_id → when the row timer should next look at its row
                                       (its valid_until), for the city's restaurants of bucket ``b``
                                       (crc32 of the id mod :data:`ROW_BUCKETS`): the row timer's
                                       schedule and the supply refresher's list
``eta:supply:{C:<b>}``         string  who refreshes the bucket's supply counts this period (SET NX PX)
``drv:{C}:free``               geo     free drivers at their last position
``drv:{C}:state``              hash    driver_id → "status|event_ms" (ordering guard)
``drv:{C}:waiting``            zset    order_id → PLACED event time, for orders of the city with no
                                       ASSIGNED and no CANCELLED seen: the dispatch backlog
                                       (``orders_waiting_for_driver`` = ZCOUNT over (t − 3 h, +inf))
``drv:{C}:settled``            zset    order_id → event time of its first ASSIGNED or CANCELLED:
                                       remembers outcomes so a PLACED arriving after its
                                       outcome (out of order, replay) is never counted
``drv:{C}:meta``               hash    ``u:``/``e:``/``t:`` freshness of the groups ``drivers``
                                       (driver events) and ``dispatch`` (PLACED, CANCELLED,
                                       ASSIGNED with an order id)
``eta:online:initialized``     string  present once the online state was built (absent: rebuild)
``eta:markets``                set     every market seen by a writer (C above is a market)
``eta:aggregators``            hash    aggregator → "<caught up ms>|<written ms>": when it last had every
                                       event it fetched visible, and when it said so (see ``reader``)
=============================  ======  ===========================================================
"""

from __future__ import annotations

import zlib

from eta_common.markets import DEFAULT_MARKET

__all__ = [
    "AGGREGATORS_KEY",
    "CITY",
    "INITIALIZED_KEY",
    "LIVE_AGGREGATOR_MS",
    "MARKETS_KEY",
    "ROW_BUCKETS",
    "driver_keys",
    "due_key",
    "restaurant_keys",
    "row_bucket",
    "row_key",
    "supply_lock_key",
]

CITY = DEFAULT_MARKET  # the city-wide keys' hash tag is the market (see eta_common.markets)
MARKETS_KEY = "eta:markets"  # set: every market the writers have seen (the row maintenance's list)
AGGREGATORS_KEY = "eta:aggregators"  # hash: aggregator → "<caught up ms>|<written ms>" (freshness)
# An aggregator heard from within this long counts for the store's freshness (the consumer session
# timeout is 10 s: a dead one's partitions have moved by then, and their new owner reports its own).
LIVE_AGGREGATOR_MS = 30_000
INITIALIZED_KEY = "eta:online:initialized"
# Due buckets: enough that a platform's restaurants spread over Redis Cluster shards, few enough that
# the row timer's per-tick claim (one script call per bucket) stays cheap. Fixed: writers and timers
# must agree on it.
ROW_BUCKETS = 16


def restaurant_keys(restaurant_id: str) -> dict[str, str]:
    tag = f"rst:{{{restaurant_id}}}"
    return {
        "placed": f"{tag}:placed",
        "kitchen": f"{tag}:kitchen",
        "prep": f"{tag}:prep",
        "pickup": f"{tag}:pickup",
        "meta": f"{tag}:meta",
        "row": f"{tag}:row",
        "order_prefix": f"{tag}:o:",
    }


def row_key(restaurant_id: str) -> str:
    return f"rst:{{{restaurant_id}}}:row"


def driver_keys(city: str = CITY) -> dict[str, str]:
    """The city's keys (drivers and the dispatch backlog), all on the ``drv:{city}`` hash tag."""
    tag = f"drv:{{{city}}}"
    return {
        "free": f"{tag}:free",
        "state": f"{tag}:state",
        "meta": f"{tag}:meta",
        "waiting": f"{tag}:waiting",
        "settled": f"{tag}:settled",
    }


def row_bucket(restaurant_id: str) -> int:
    return zlib.crc32(restaurant_id.encode()) % ROW_BUCKETS


def due_key(bucket: int, city: str = CITY) -> str:
    return f"eta:rows:{{{city}:{bucket}}}"


def supply_lock_key(bucket: int, city: str = CITY) -> str:
    return f"eta:supply:{{{city}:{bucket}}}"
