"""The online store: Redis key layout, idempotent update scripts and the one-round-trip feature read.

Key layout (hash tags keep one restaurant's keys, and the city's keys, in one Redis Cluster slot each, so
every script call touches one slot and stays atomic):

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
                                       ``u:<group>`` (wall time of last change, ms) and
                                       ``e:<group>`` (latest event time reflected, ms)
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
=============================  ======  ===========================================================

Scripts: ``apply_restaurant`` (one call per restaurant in a batch, on ``rst:{R}``), ``apply_city`` (one call
per batch, on ``drv:{C}``: every driver update in order, plus the batch's PLACED and CANCELLED order events
forwarded as *dispatch* entries — the same events also go to their restaurant's call), and reads are plain
pipelined commands (per restaurant: a ZCOUNT per count window and for the kitchen, a ZRANGEBYSCORE per mean
window, the meta HMGET; per city: the backlog ZCOUNT and the meta HMGET). ASSIGNED updates the driver's state
only when newer than the driver's last event, but settles its order regardless (an assignment is a fact about
the order).

Every update is idempotent (set members are ids; first-write-wins per order field; state changes only
for strictly newer event times), so at-least-once delivery and crash replays cannot double count. The
backlog's zsets are trimmed by event time (``waiting``: older than the 3 h TTL + allowed lateness;
``settled``: older than 6 h + allowed lateness), which never changes a value read at "now".
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt
import redis.asyncio as aioredis
from redis.exceptions import NoScriptError

from eta_common import features as F
from eta_common.customer_features import (
    CUSTOMER_MEAN_DELIVERY_28D,
    CUSTOMER_ORDERS_28D,
    CUSTOMER_READ_REPLIES,
    CustomerFeatures,
    parse_customer_read,
    queue_customer_read,
)
from eta_common.event_facts import EventFacts, event_facts
from eta_common.feature_block import COLUMN, DEFAULT_ROW, FeatureBlock, K

__all__ = ["FeatureReading", "OnlineStore", "RestaurantFeatures", "driver_keys", "restaurant_keys"]

CITY = "city"
# Present once the online state was built; its absence means Redis lost the state (rebuild needed).
INITIALIZED_KEY = "eta:online:initialized"
ORDER_STATE_TTL_S = 6 * 3600
# Order events that also change the city's dispatch backlog (forwarded to the city script).
DISPATCH_ORDER_EVENTS = frozenset({"PLACED", "CANCELLED"})
# Order events the restaurant script applies (PICKED_UP completes an order's pickup wait).
RESTAURANT_ORDER_EVENTS = DISPATCH_ORDER_EVENTS | {"PICKED_UP"}

# Applies a batch of one restaurant's updates in order. KEYS: placed, kitchen, prep, meta, pickup.
# ARGV: now, retention_ms (placements), order_ttl_s, kitchen_ttl_ms, order_key_prefix, prep_retention_ms,
# pickup_retention_ms, then the updates as one JSON array (decoded by Redis' built-in cjson: no
# per-argument overhead) of [type, order_id, event_ms, lat ('' if none), lng, writer span ('' if not
# sampled)], event_ms, lat and lng as strings (kept exactly as written). Returns a string with one
# '0'/'1' "changed" flag per update.
# Per batch, not per update: the trims (at the batch's newest event time: a trim never changes a value
# read at "now") and the group bookkeeping (u:/e:/t:) — the same end state with far fewer Redis calls.
_APPLY_RESTAURANT = """
local placed, kitchen, prep, meta, pickup = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local now, retention, ttl, kitchen_ttl = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local prefix, prep_retention, pickup_retention = ARGV[5], tonumber(ARGV[6]), tonumber(ARGV[7])
local updates = cjson.decode(ARGV[8])
local out = {}
local groups = {}
local trim_placed, trim_kitchen, trim_prep, trim_pickup = nil, nil, nil, nil
local function pickup_wait(oid, picked, ready)
  local wait = picked - ready
  if wait < 0 then wait = 0 end
  redis.call('ZADD', pickup, picked, oid .. ':' .. wait)
  if not trim_pickup or picked > trim_pickup then trim_pickup = picked end
end
local lat, lng = nil, nil
local function touch(group, ems, raw, ref)
  local g = groups[group]
  if not g then
    g = {ems = -1, raw = nil, ref = ''}
    groups[group] = g
  end
  if ref ~= '' then g.ref = ref end
  if ems > g.ems then g.ems = ems; g.raw = raw end
end
for n, u in ipairs(updates) do
  local etype, oid, raw, ref = u[1], u[2], u[3], u[6]
  local ems = tonumber(raw)
  local okey = prefix .. oid
  local changed = '0'
  if u[4] ~= '' then lat, lng = u[4], u[5] end
  if etype == 'PLACED' then
    if redis.call('ZADD', placed, 'NX', ems, oid) == 1 then changed = '1' end
    if not trim_placed or ems > trim_placed then trim_placed = ems end
    touch('orders', ems, raw, ref)
  elseif etype == 'ORDER_ACCEPTED' then
    if redis.call('HSETNX', okey, 'accepted', raw) == 1 then
      changed = '1'
      redis.call('EXPIRE', okey, ttl)
      local ready = redis.call('HGET', okey, 'ready')
      if ready then
        redis.call('ZADD', prep, ready, oid .. ':' .. (tonumber(ready) - ems))
      elseif not redis.call('HGET', okey, 'cancelled') then
        redis.call('ZADD', kitchen, ems, oid)
      end
    end
    if not trim_kitchen or ems > trim_kitchen then trim_kitchen = ems end
    touch('kitchen', ems, raw, ref)
  elseif etype == 'ORDER_READY' then
    if redis.call('HSETNX', okey, 'ready', raw) == 1 then
      changed = '1'
      redis.call('EXPIRE', okey, ttl)
      redis.call('ZREM', kitchen, oid)
      local accepted = redis.call('HGET', okey, 'accepted')
      if accepted then
        redis.call('ZADD', prep, ems, oid .. ':' .. (ems - tonumber(accepted)))
      end
      local picked = redis.call('HGET', okey, 'picked')
      if picked then pickup_wait(oid, tonumber(picked), ems) end
    end
    if not trim_prep or ems > trim_prep then trim_prep = ems end
    touch('kitchen', ems, raw, ref)
  elseif etype == 'PICKED_UP' then
    if redis.call('HSETNX', okey, 'picked', raw) == 1 then
      changed = '1'
      redis.call('EXPIRE', okey, ttl)
      local ready = redis.call('HGET', okey, 'ready')
      if ready then pickup_wait(oid, ems, tonumber(ready)) end
    end
    touch('pickup', ems, raw, ref)
  elseif etype == 'CANCELLED' then
    if redis.call('HSETNX', okey, 'cancelled', raw) == 1 then
      changed = '1'
      redis.call('EXPIRE', okey, ttl)
      redis.call('ZREM', kitchen, oid)
    end
    touch('kitchen', ems, raw, ref)
  elseif etype == 'OPENED' or etype == 'CLOSED' or etype == 'BUSY' then
    local prev = tonumber(redis.call('HGET', meta, 'status_ms') or '-1')
    if ems > prev then
      redis.call('HSET', meta, 'status', etype, 'status_ms', raw)
      changed = '1'
    end
    touch('status', ems, raw, ref)
  end
  out[n] = changed
end
if trim_placed then redis.call('ZREMRANGEBYSCORE', placed, '-inf', '(' .. (trim_placed - retention)) end
if trim_kitchen then redis.call('ZREMRANGEBYSCORE', kitchen, '-inf', '(' .. (trim_kitchen - kitchen_ttl)) end
if trim_prep then redis.call('ZREMRANGEBYSCORE', prep, '-inf', '(' .. (trim_prep - prep_retention)) end
if trim_pickup then
  redis.call('ZREMRANGEBYSCORE', pickup, '-inf', '(' .. (trim_pickup - pickup_retention))
end
local fields = {}
if lat then fields[#fields + 1] = 'lat'; fields[#fields + 1] = lat; fields[#fields + 1] = 'lng'
  fields[#fields + 1] = lng end
for group, g in pairs(groups) do
  fields[#fields + 1] = 'u:' .. group; fields[#fields + 1] = now
  if g.ref ~= '' then fields[#fields + 1] = 't:' .. group; fields[#fields + 1] = g.ref end
  local prev = tonumber(redis.call('HGET', meta, 'e:' .. group) or '0')
  if g.ems > prev then fields[#fields + 1] = 'e:' .. group; fields[#fields + 1] = g.raw end
end
if #fields > 0 then redis.call('HSET', meta, unpack(fields)) end
return table.concat(out)
"""

# Applies a batch of city-level updates in order. KEYS: free (geo), state, meta, waiting, settled.
# ARGV: now, waiting_retention_ms, settled_retention_ms, then the updates as one JSON array of
# [type, driver_id, order_id, event_ms, lat, lng, writer span ('' if not sampled)], all strings.
# Types PLACED and CANCELLED are dispatch entries (order events forwarded by OnlineStore.apply; driver_id,
# lat and lng are ''); every other type is a driver event. Returns a string of one '0'/'1' "changed"
# flag per update. The backlog trims run once, at the batch's newest event times.
_APPLY_CITY = """
local free, state, meta, waiting, settled = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local now, waiting_retention, settled_retention = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local updates = cjson.decode(ARGV[4])
local out = {}
local max_ems = tonumber(redis.call('HGET', meta, 'e:drivers') or '0')
local max_raw = nil
local last_ref = ''
local drivers_seen = false
local dmax_ems = tonumber(redis.call('HGET', meta, 'e:dispatch') or '0')
local dmax_raw = nil
local dlast_ref = ''
local dispatch_seen = false
local trim_waiting, trim_settled = nil, nil
local function settle(oid, ems, raw, ref)
  dispatch_seen = true
  if ref ~= '' then dlast_ref = ref end
  if ems > dmax_ems then dmax_ems = ems; dmax_raw = raw end
  local changed = redis.call('ZADD', settled, 'NX', ems, oid)
  changed = changed + redis.call('ZREM', waiting, oid)
  if not trim_settled or ems > trim_settled then trim_settled = ems end
  if changed > 0 then return '1' end
  return '0'
end
for n, u in ipairs(updates) do
  local etype, did, oid, raw = u[1], u[2], u[3], u[4]
  local lat, lng, ref = u[5], u[6], u[7]
  local ems = tonumber(raw)
  if etype == 'PLACED' then
    dispatch_seen = true
    if ref ~= '' then dlast_ref = ref end
    if ems > dmax_ems then dmax_ems = ems; dmax_raw = raw end
    local changed = '0'
    if not redis.call('ZSCORE', settled, oid) then
      if redis.call('ZADD', waiting, 'NX', ems, oid) == 1 then changed = '1' end
    end
    if not trim_waiting or ems > trim_waiting then trim_waiting = ems end
    out[n] = changed
  elseif etype == 'CANCELLED' then
    out[n] = settle(oid, ems, raw, ref)
  else
    drivers_seen = true
    if ref ~= '' then last_ref = ref end
    local changed = '0'
    if etype == 'ASSIGNED' and oid ~= '' then changed = settle(oid, ems, raw, ref) end
    local status, last = 'offline', -1
    local cur = redis.call('HGET', state, did)
    if cur then
      local sep = string.find(cur, '|', 1, true)
      status = string.sub(cur, 1, sep - 1)
      last = tonumber(string.sub(cur, sep + 1))
    end
    if ems > last then
      if etype == 'ONLINE' or etype == 'DELIVERED' then status = 'free'
      elseif etype == 'OFFLINE' then status = 'offline'
      elseif etype == 'ASSIGNED' then status = 'busy' end
      redis.call('HSET', state, did, status .. '|' .. raw)
      if status == 'free' then
        redis.call('GEOADD', free, lng, lat, did)
      else
        redis.call('ZREM', free, did)
      end
      if ems > max_ems then max_ems = ems; max_raw = raw end
      changed = '1'
    end
    out[n] = changed
  end
end
if trim_waiting then
  redis.call('ZREMRANGEBYSCORE', waiting, '-inf', '(' .. (trim_waiting - waiting_retention))
end
if trim_settled then
  redis.call('ZREMRANGEBYSCORE', settled, '-inf', '(' .. (trim_settled - settled_retention))
end
if drivers_seen then
  redis.call('HSET', meta, 'u:drivers', now)
  if max_raw then redis.call('HSET', meta, 'e:drivers', max_raw) end
  if last_ref ~= '' then redis.call('HSET', meta, 't:drivers', last_ref) end
end
if dispatch_seen then
  redis.call('HSET', meta, 'u:dispatch', now)
  if dmax_raw then redis.call('HSET', meta, 'e:dispatch', dmax_raw) end
  if dlast_ref ~= '' then redis.call('HSET', meta, 't:dispatch', dlast_ref) end
end
return table.concat(out)
"""

# Reads are plain commands in one pipeline, not scripts: Redis 6.2 turns every reply of a command called
# from Lua into Lua values and the script's result back into a reply, which made a restaurant read script
# cost ~70 µs of Redis CPU against ~25 µs for the same commands pipelined (measured here; see the README's
# design section). Every command touches one key, so reads stay cluster-friendly. A read is not atomic
# across its commands: an update landing between two of them can make one group's value a few
# milliseconds newer than another's, never a wrong value.
# The fields of drv:{C}:meta a read takes: the freshness of the drivers and dispatch groups.
_CITY_FIELDS = ("u:drivers", "e:drivers", "t:drivers", "u:dispatch", "e:dispatch", "t:dispatch")
# The fields of rst:{R}:meta a read takes: status, location, then u:/e:/t: of four groups.
_META_FIELDS = (
    "status", "lat", "lng", "u:orders", "e:orders", "t:orders", "u:kitchen", "e:kitchen", "t:kitchen",
    "u:status", "e:status", "t:status", "u:pickup", "e:pickup", "t:pickup",
)  # fmt: skip
_NWIN, _NMEAN, _NPICKUP = len(F.WINDOW_COUNTS), len(F.WINDOW_MEANS), len(F.PICKUP_WAIT_MEANS)
# replies per restaurant: a ZCOUNT per count window, the kitchen ZCOUNT, a ZRANGEBYSCORE per mean window
# (prep, then pickup wait), the meta HMGET
RESTAURANT_READ_REPLIES = _NWIN + 1 + _NMEAN + _NPICKUP + 1


@dataclass(frozen=True, slots=True)
class _Bounds:
    """The score ranges of one read at ``now`` (exclusive lower bounds as Redis range strings)."""

    now: int
    counts: tuple[str, ...]
    kitchen: str
    prep: tuple[str, ...]
    pickup: tuple[str, ...]
    waiting: str

    @classmethod
    def at(cls, now: int) -> _Bounds:
        return cls(
            now,
            tuple(f"({now - w.window_ms}" for w in F.WINDOW_COUNTS),
            f"({now - F.KITCHEN_ORDER_TTL_MS}",
            tuple(f"({now - m.window_ms}" for m in F.WINDOW_MEANS),
            tuple(f"({now - m.window_ms}" for m in F.PICKUP_WAIT_MEANS),
            f"({now - F.WAITING_ORDER_TTL_MS}",
        )


def _sum_values(members: Sequence[bytes]) -> float:
    """Sum of the values of window members ``<order_id>:<value>`` (the text after the last colon)."""
    return sum(float(m[m.rindex(b":") + 1 :]) for m in members)


# From this many restaurants on, a read fetches the free drivers around the whole batch once (GEOSEARCH
# WITHHASH, ~20 µs in Redis) and counts per restaurant here, instead of one GEOSEARCH per restaurant
# (~25 µs each in Redis): same counts, a fraction of the Redis time for a home feed.
BULK_NEARBY_MIN = 8
_GEO_STEP = 26  # Redis GEO: 52-bit geohashes, 26 bits per coordinate
_GEO_LAT_MIN, _GEO_LAT_MAX = -85.05112878, 85.05112878


def _even_bits(x: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    """The even bits of each value, compacted (Redis' ``deinterleave64`` for one half)."""
    x = x & np.uint64(0x5555555555555555)
    for shift, mask in ((1, 0x3333333333333333), (2, 0x0F0F0F0F0F0F0F0F), (4, 0x00FF00FF00FF00FF)):
        x = (x | (x >> np.uint64(shift))) & np.uint64(mask)
    x = (x | (x >> np.uint64(8))) & np.uint64(0x0000FFFF0000FFFF)
    return (x | (x >> np.uint64(16))) & np.uint64(0x00000000FFFFFFFF)


def decode_geohashes(hashes: Sequence[int]) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """(lat, lng) of Redis GEO members from their 52-bit scores, exactly as Redis decodes them (the
    centre of the geohash cell: the position GEOSEARCH measures distances to)."""
    bits = np.array(hashes, dtype=np.uint64)
    cells = float(1 << _GEO_STEP)
    ilat, ilng = _even_bits(bits).astype(np.float64), _even_bits(bits >> np.uint64(1)).astype(np.float64)
    lat_scale, lng_scale = _GEO_LAT_MAX - _GEO_LAT_MIN, 360.0
    lat = (
        (_GEO_LAT_MIN + (ilat * 1.0 / cells) * lat_scale)
        + (_GEO_LAT_MIN + ((ilat + 1) * 1.0 / cells) * lat_scale)
    ) / 2
    lng = (
        (-180.0 + (ilng * 1.0 / cells) * lng_scale) + (-180.0 + ((ilng + 1) * 1.0 / cells) * lng_scale)
    ) / 2
    return np.clip(lat, _GEO_LAT_MIN, _GEO_LAT_MAX), np.clip(lng, -180.0, 180.0)


def count_within(
    points: Sequence[tuple[float, float]],
    lat: npt.NDArray[np.float64],
    lng: npt.NDArray[np.float64],
    km: float,
) -> list[int]:
    """For each (lat, lng) point, how many of the positions are within ``km`` (Redis GEO's distance:
    haversine on its Earth radius, ``distance <= radius``)."""
    if not len(lat):
        return [0] * len(points)
    centre = np.radians(np.asarray(points, dtype=np.float64))  # (n, 2): lat, lng
    lat1, lng1 = centre[:, :1], centre[:, 1:]
    lat2, lng2 = np.radians(lat)[None, :], np.radians(lng)[None, :]
    u, v = np.sin((lat2 - lat1) / 2), np.sin((lng2 - lng1) / 2)
    distance = 2.0 * F.EARTH_RADIUS_M * np.arcsin(np.sqrt(u * u + np.cos(lat1) * np.cos(lat2) * v * v))
    counts: list[int] = np.count_nonzero(distance <= km * 1000.0, axis=1).tolist()
    return counts


def restaurant_keys(restaurant_id: str) -> dict[str, str]:
    tag = f"rst:{{{restaurant_id}}}"
    return {
        "placed": f"{tag}:placed",
        "kitchen": f"{tag}:kitchen",
        "prep": f"{tag}:prep",
        "pickup": f"{tag}:pickup",
        "meta": f"{tag}:meta",
        "order_prefix": f"{tag}:o:",
    }


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


@dataclass(slots=True)  # not frozen: a frozen init costs 4x, and a read builds 8 per restaurant
class FeatureReading:
    """One feature value with its freshness (a value object: never changed after the read)."""

    name: str
    value: float
    present: bool
    updated_ms: int | None = None
    event_ms: int | None = None
    # (trace_id, span_id) of the aggregator span that last changed it, when that span was sampled.
    writer: tuple[int, int] | None = None

    def age_seconds(self, now_ms: int) -> float | None:
        return None if self.updated_ms is None else max(0.0, (now_ms - self.updated_ms) / 1000.0)


@dataclass
class RestaurantFeatures:
    restaurant_id: str
    as_of_ms: int
    readings: dict[str, FeatureReading] = field(default_factory=dict)
    location: tuple[float, float] | None = None

    def vector(self, names: Sequence[str]) -> list[float]:
        return [self.readings[name].value for name in names]


class RestaurantUpdate(NamedTuple):
    """One order/kitchen event in the form the restaurant script takes (a tuple: cheap on the hot path)."""

    restaurant_id: str
    event_type: str
    order_id: str
    event_ms: int
    lat: float | None = None
    lng: float | None = None
    # "<trace_id>-<span_id>" of the (sampled) span that applied it, stored as the feature's provenance.
    writer: str = ""


class DriverUpdate(NamedTuple):
    driver_id: str
    event_type: str
    event_ms: int
    lat: float
    lng: float
    writer: str = ""
    # The order an ASSIGNED event assigns (settles it in the dispatch backlog); '' when none.
    order_id: str = ""


_json = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def _int_or_none(raw: Any) -> int | None:
    return None if raw in (None, False, b"", "") else int(raw)


class OnlineStore:
    """Async access to the online features. One instance per process (it holds the connection pool).

    Scripts are loaded once (``SCRIPT LOAD``) and called by SHA inside plain pipelines, so an update
    batch or a feature read is exactly one round trip; if Redis lost its script cache (restart,
    ``SCRIPT FLUSH``) the scripts are reloaded and the pipeline retried once.
    """

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        allowed_lateness_ms: int = F.DEFAULT_ALLOWED_LATENESS_MS,
        city: str = CITY,
    ) -> None:
        self.client = client
        self.retention_ms = F.MAX_WINDOW_MS + allowed_lateness_ms
        self.prep_retention_ms = F.MAX_PREP_WINDOW_MS + allowed_lateness_ms
        self.pickup_retention_ms = F.MAX_PICKUP_WINDOW_MS + allowed_lateness_ms
        self.waiting_retention_ms = F.WAITING_ORDER_TTL_MS + allowed_lateness_ms
        self.settled_retention_ms = F.SETTLED_ORDER_RETENTION_MS + allowed_lateness_ms
        self.city = city
        self._sources = {
            "apply_restaurant": _APPLY_RESTAURANT,
            "apply_city": _APPLY_CITY,
        }
        self._sha: dict[str, str] = {}
        self._free_key = driver_keys(city)["free"]

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> OnlineStore:
        return cls(aioredis.Redis.from_url(url, decode_responses=False), **kwargs)

    async def close(self) -> None:
        await self.client.aclose()

    async def _load_scripts(self) -> None:
        # Publish the whole table at once: a concurrent _run() must never see it half loaded.
        self._sha = {
            name: str(await self.client.script_load(source)) for name, source in self._sources.items()
        }

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

    async def apply(self, updates: Sequence[RestaurantUpdate | DriverUpdate], *, now_ms: int) -> list[int]:
        """Apply updates in one pipeline (one round trip): one script call per restaurant and one for the
        city (every driver update, plus the PLACED and CANCELLED order events with an order id, which
        change the dispatch backlog), each applying its updates in order. Returns 1 per update that
        changed state (in its restaurant's keys or the city's)."""
        if not updates:
            return []
        by_restaurant: dict[str, tuple[list[int], list[list[str]]]] = {}
        city: list[int] = []
        city_rows: list[list[str]] = []
        for index, u in enumerate(updates):
            if type(u) is DriverUpdate:
                city.append(index)
                lat, lng = repr(u.lat), repr(u.lng)
                city_rows.append([u.event_type, u.driver_id, u.order_id, str(u.event_ms), lat, lng, u.writer])
                continue
            assert type(u) is RestaurantUpdate
            group = by_restaurant.get(u.restaurant_id)
            if group is None:
                group = by_restaurant[u.restaurant_id] = ([], [])
            raw = str(u.event_ms)
            group[0].append(index)
            group[1].append(
                [
                    u.event_type,
                    u.order_id,
                    raw,
                    "" if u.lat is None else repr(u.lat),
                    "" if u.lng is None else repr(u.lng),
                    u.writer,
                ]
            )
            if u.event_type in DISPATCH_ORDER_EVENTS and u.order_id:
                city.append(index)
                city_rows.append([u.event_type, "", u.order_id, raw, "", "", u.writer])
        dkeys = driver_keys(self.city)
        groups = list(by_restaurant.items())

        def build(pipe: Any) -> None:
            for restaurant_id, (_, rows) in groups:
                keys = restaurant_keys(restaurant_id)
                pipe.evalsha(
                    self._sha["apply_restaurant"],
                    5,
                    keys["placed"],
                    keys["kitchen"],
                    keys["prep"],
                    keys["meta"],
                    keys["pickup"],
                    now_ms,
                    self.retention_ms,
                    ORDER_STATE_TTL_S,
                    F.KITCHEN_ORDER_TTL_MS,
                    keys["order_prefix"],
                    self.prep_retention_ms,
                    self.pickup_retention_ms,
                    _json(rows),
                )
            if city:
                pipe.evalsha(
                    self._sha["apply_city"],
                    5,
                    dkeys["free"],
                    dkeys["state"],
                    dkeys["meta"],
                    dkeys["waiting"],
                    dkeys["settled"],
                    now_ms,
                    self.waiting_retention_ms,
                    self.settled_retention_ms,
                    _json(city_rows),
                )

        results = await self._run(build)
        changed = [0] * len(updates)
        for (_, (indices, _)), flags in zip(groups, results, strict=False):
            for index, flag in zip(indices, flags, strict=True):
                changed[index] = flag - 48  # b"0"/b"1"
        if city:
            for index, flag in zip(city, results[-1], strict=True):
                changed[index] |= flag - 48
        return changed

    async def is_initialized(self) -> bool:
        """False when the online store was never built or was lost (flushed, new Redis)."""
        return bool(await self.client.exists(INITIALIZED_KEY))

    async def mark_initialized(self, now_ms: int) -> None:
        await self.client.set(INITIALIZED_KEY, str(now_ms))

    @staticmethod
    def _queue_read(pipe: Any, restaurant_id: str, bounds: _Bounds) -> None:
        """The :data:`RESTAURANT_READ_REPLIES` commands of one restaurant's read."""
        tag = f"rst:{{{restaurant_id}}}"  # restaurant_keys(), without building the dict on the hot path
        now = bounds.now
        placed = f"{tag}:placed"
        for low in bounds.counts:
            pipe.zcount(placed, low, now)
        pipe.zcount(f"{tag}:kitchen", bounds.kitchen, "+inf")
        prep = f"{tag}:prep"
        for low in bounds.prep:
            pipe.zrangebyscore(prep, low, now)
        pickup = f"{tag}:pickup"
        for low in bounds.pickup:
            pipe.zrangebyscore(pickup, low, now)
        pipe.hmget(f"{tag}:meta", _META_FIELDS)

    def _queue_city(self, pipe: Any, bounds: _Bounds) -> None:
        """Two replies: the backlog count and the city groups' freshness."""
        keys = driver_keys(self.city)
        pipe.zcount(keys["waiting"], bounds.waiting, "+inf")
        pipe.hmget(keys["meta"], _CITY_FIELDS)

    def _queue_nearby(self, pipe: Any, location: tuple[float, float]) -> None:
        """The free drivers' ids within the supply radius (the read counts them)."""
        pipe.geosearch(
            self._free_key,
            longitude=location[1],
            latitude=location[0],
            radius=F.SUPPLY_RADIUS_KM,
            unit="km",
        )

    async def read_restaurants(
        self,
        requests: Sequence[tuple[str, tuple[float, float]]],
        *,
        now_ms: int,
        customer_id: str = "",
    ) -> list[RestaurantFeatures]:
        """:meth:`read_block` as one :class:`RestaurantFeatures` per restaurant."""
        if not requests:
            return []
        return (await self.read_block(requests, now_ms=now_ms, customer_id=customer_id)).restaurants()

    async def read_block(
        self,
        requests: Sequence[tuple[str, tuple[float, float]]],
        *,
        now_ms: int,
        customer_id: str = "",
    ) -> FeatureBlock:
        """Features of many restaurants (id, location) in one round trip, e.g. for a home feed; with a
        ``customer_id``, the customer's batch history features too (the same for every restaurant).

        From :data:`BULK_NEARBY_MIN` restaurants on, the free drivers around all of them come from one
        GEOSEARCH (a disc around their centroid that holds every restaurant's supply disc) and are
        counted here; below that, one GEOSEARCH per restaurant."""
        if not requests:
            return FeatureBlock.defaults(requests, now_ms)
        bounds = _Bounds.at(now_ms)
        bulk = len(requests) >= BULK_NEARBY_MIN
        if bulk:
            lats = [location[0] for _, location in requests]
            lngs = [location[1] for _, location in requests]
            centre = (sum(lats) / len(lats), sum(lngs) / len(lngs))
            spread = max(
                F.haversine_km(centre[0], centre[1], lat, lng) for lat, lng in zip(lats, lngs, strict=True)
            )
            radius = spread + F.SUPPLY_RADIUS_KM + 0.01  # margin: extra drivers are filtered out below
        queue_read = self._queue_read

        def build(pipe: Any) -> None:
            self._queue_city(pipe, bounds)
            if customer_id:
                queue_customer_read(pipe, customer_id)
            if bulk:
                pipe.geosearch(
                    self._free_key,
                    longitude=centre[1],
                    latitude=centre[0],
                    radius=radius,
                    unit="km",
                    withhash=True,
                )
                for restaurant_id, _location in requests:
                    queue_read(pipe, restaurant_id, bounds)
            else:
                for restaurant_id, location in requests:
                    queue_read(pipe, restaurant_id, bounds)
                    self._queue_nearby(pipe, location)

        results = await self._run(build, scripts=False)
        city = _City.of(results[0], results[1])
        base = 2
        customer = _NO_CUSTOMER
        if customer_id:
            customer = parse_customer_read(results[base : base + CUSTOMER_READ_REPLIES])
            base += CUSTOMER_READ_REPLIES
        n = RESTAURANT_READ_REPLIES
        nearby: list[int | None]
        if bulk:
            lat, lng = decode_geohashes([int(member[1]) for member in results[base]])
            counted = count_within([location for _, location in requests], lat, lng, F.SUPPLY_RADIUS_KM)
            nearby = list(counted)
            base += 1
            raws = [results[base + n * i : base + n * (i + 1)] for i in range(len(requests))]
        else:
            step = n + 1
            raws = [results[base + step * i : base + step * i + n] for i in range(len(requests))]
            nearby = [len(results[base + step * i + n]) for i in range(len(requests))]
        return _block(
            [rid for rid, _ in requests],
            [location for _, location in requests],
            now_ms,
            raws,
            city,
            nearby,
            customer,
        )

    async def read_restaurant(
        self, restaurant_id: str, *, now_ms: int, location: tuple[float, float] | None = None
    ) -> RestaurantFeatures:
        """All online features of one restaurant: one round trip when ``location`` is given, else two
        (the restaurant's stored location is read first)."""
        if location is not None:
            return (await self.read_restaurants([(restaurant_id, location)], now_ms=now_ms))[0]
        bounds = _Bounds.at(now_ms)

        def build(pipe: Any) -> None:
            self._queue_city(pipe, bounds)
            self._queue_read(pipe, restaurant_id, bounds)

        results = await self._run(build, scripts=False)
        city = _City.of(results[0], results[1])
        raw = results[2:]
        nearby = None
        _status, lat, lng = raw[-1][:3]
        if lat not in (False, None):
            location = (float(lat), float(lng))
            (drivers,) = await self._run(lambda pipe: self._queue_nearby(pipe, location), scripts=False)
            nearby = len(drivers)
        block = _block([restaurant_id], [location], now_ms, [raw], city, [nearby], _NO_CUSTOMER)
        return block.restaurant(0)


def _num(raw: Any) -> float:
    """A stored number (bytes/str), NaN when absent."""
    return math.nan if raw is None or raw is False or raw in {b"", ""} else float(raw)


_C = COLUMN
_COUNT_COLUMNS = [_C[w.name] for w in F.WINDOW_COUNTS]
_KITCHEN_COLUMN = _C[F.ORDERS_IN_KITCHEN]
# per mean window, prep then pickup wait (an empty window keeps the default: NaN, not present)
_MEAN_COLUMNS = [_C[m.name] for m in F.WINDOW_MEANS] + [_C[m.name] for m in F.PICKUP_WAIT_MEANS]
_BUSY_COLUMN = _C[F.KITCHEN_BUSY]
_FREE_COLUMN = _C[F.FREE_DRIVERS_NEARBY]
_BACKLOG_COLUMN = _C[F.ORDERS_WAITING_FOR_DRIVER]
_CUSTOMER_ORDERS_COLUMN = _C[CUSTOMER_ORDERS_28D]
_CUSTOMER_MEAN_COLUMN = _C[CUSTOMER_MEAN_DELIVERY_28D]
# The columns each restaurant group's provenance applies to, with the positions of its u:/e:/t: fields
# in _META_FIELDS: orders, kitchen (count and prep means), status, pickup wait.
_GROUPS = (
    (_COUNT_COLUMNS, 3),
    ([_KITCHEN_COLUMN, *(_C[m.name] for m in F.WINDOW_MEANS)], 6),
    ([_BUSY_COLUMN], 9),
    ([_C[m.name] for m in F.PICKUP_WAIT_MEANS], 12),
)
_NO_WRITERS: tuple[None, ...] = (None,) * K


def _block(
    restaurant_ids: list[str],
    locations: list[tuple[float, float] | None],
    now_ms: int,
    raws: Sequence[Sequence[Any]],
    city: _City,
    nearby: Sequence[int | None],
    customer: CustomerFeatures,
) -> FeatureBlock:
    """The block of a read from each restaurant's :data:`RESTAURANT_READ_REPLIES` replies: each row
    starts from a copy of the defaults with the city's and the customer's values in place."""
    nan = math.nan
    # the row every restaurant starts from: defaults, plus what the city and the customer say
    base_values, base_present = list(DEFAULT_ROW), [False] * K
    base_updated, base_event = [nan] * K, [nan] * K
    drivers, dispatch = city.drivers, city.dispatch
    for k, group in ((_FREE_COLUMN, drivers), (_BACKLOG_COLUMN, dispatch)):
        base_updated[k] = nan if group.updated is None else float(group.updated)
        base_event[k] = nan if group.event is None else float(group.event)
    if dispatch.updated is not None:
        base_values[_BACKLOG_COLUMN], base_present[_BACKLOG_COLUMN] = float(city.waiting), True
    drivers_known = drivers.updated is not None
    if customer is not _NO_CUSTOMER:
        known_at = customer.as_of_ms
        at = nan if known_at is None else float(known_at)
        mean = customer.mean_delivery_minutes_last_28_days
        base_values[_CUSTOMER_ORDERS_COLUMN] = customer.orders_last_28_days
        base_present[_CUSTOMER_ORDERS_COLUMN] = known_at is not None
        base_values[_CUSTOMER_MEAN_COLUMN] = mean
        base_present[_CUSTOMER_MEAN_COLUMN] = not math.isnan(mean)
        for k in (_CUSTOMER_ORDERS_COLUMN, _CUSTOMER_MEAN_COLUMN):
            base_updated[k] = base_event[k] = at
    city_refs = (drivers.writer, dispatch.writer)
    values_rows: list[list[float]] = []
    present_rows: list[list[bool]] = []
    updated_rows: list[list[float]] = []
    event_rows: list[list[float]] = []
    writers: list[Sequence[Any]] = []
    mean_end = _NWIN + 1 + _NMEAN + _NPICKUP
    for raw, count in zip(raws, nearby, strict=True):
        meta = raw[-1]
        values, present = base_values.copy(), base_present.copy()
        updated, event = base_updated.copy(), base_event.copy()
        for columns, at in _GROUPS:
            u, e = _num(meta[at]), _num(meta[at + 1])
            for k in columns:
                updated[k] = u
                event[k] = e
        orders_known = not math.isnan(updated[_COUNT_COLUMNS[0]])
        for j, k in enumerate(_COUNT_COLUMNS):
            values[k], present[k] = float(raw[j]), orders_known
        kitchen_known = not math.isnan(updated[_KITCHEN_COLUMN])
        values[_KITCHEN_COLUMN], present[_KITCHEN_COLUMN] = float(raw[_NWIN]), kitchen_known
        for members, k in zip(raw[_NWIN + 1 : mean_end], _MEAN_COLUMNS, strict=True):
            if members:
                values[k], present[k] = _sum_values(members) / len(members) / 60_000.0, True
        status = meta[0]
        values[_BUSY_COLUMN] = 1.0 if status in {b"BUSY", "BUSY"} else 0.0
        present[_BUSY_COLUMN] = status is not None and status is not False
        if drivers_known and count is not None:
            values[_FREE_COLUMN], present[_FREE_COLUMN] = float(count), True
        values_rows.append(values)
        present_rows.append(present)
        updated_rows.append(updated)
        event_rows.append(event)
        refs = (meta[5], meta[8], meta[11], meta[14])
        if refs == (None, None, None, None) and city_refs == (None, None):
            writers.append(_NO_WRITERS)
        else:
            per_column: list[Any] = [None] * K
            for ref, (columns, _at) in zip(refs, _GROUPS, strict=True):
                for k in columns:
                    per_column[k] = ref
            per_column[_FREE_COLUMN], per_column[_BACKLOG_COLUMN] = city_refs
            writers.append(per_column)
    return FeatureBlock(
        restaurant_ids, locations, now_ms, values_rows, present_rows, updated_rows, event_rows, writers
    )


@dataclass(slots=True)
class _Provenance:
    """The u:/e:/t: fields of one feature group."""

    updated: int | None
    event: int | None
    writer: tuple[int, int] | None

    @classmethod
    def of(cls, fields: Sequence[Any]) -> _Provenance:
        writer = None
        if len(fields) > 2 and fields[2] not in (None, False, b"", ""):
            ref = fields[2].decode() if isinstance(fields[2], bytes) else str(fields[2])
            trace_hex, _, span_hex = ref.partition("-")
            writer = (int(trace_hex, 16), int(span_hex, 16))
        return cls(_int_or_none(fields[0]), _int_or_none(fields[1]), writer)

    def reading(self, name: str, value: float, present: bool) -> FeatureReading:
        return FeatureReading(name, value, present, self.updated, self.event, self.writer)


@dataclass(slots=True)
class _City:
    """The city-level part of a read (the backlog and the drivers/dispatch groups' freshness)."""

    waiting: int
    drivers: _Provenance
    dispatch: _Provenance

    @classmethod
    def of(cls, waiting: Any, fields: Sequence[Any]) -> _City:
        """From the replies of the backlog ZCOUNT and the HMGET of :data:`_CITY_FIELDS`."""
        return cls(int(waiting), _Provenance.of(fields[0:3]), _Provenance.of(fields[3:6]))


_NO_CUSTOMER = CustomerFeatures(math.nan, math.nan, None)


def update_from_event(event: Any) -> RestaurantUpdate | DriverUpdate | None:
    """Map an ``eta.v1.Event`` to the online update it causes (None for events with no online effect)."""
    facts = event_facts(event)
    return None if facts is None else update_from_facts(facts)


def update_from_facts(f: EventFacts) -> RestaurantUpdate | DriverUpdate | None:
    """The online update of an event's facts (None: no online effect, e.g. a type this build does not
    know, or an order event other than PLACED/CANCELLED; the event is still archived)."""
    if not f.known_type:
        return None
    if f.kind == "driver":
        assert f.driver_id is not None
        assert f.lat is not None
        assert f.lng is not None
        return DriverUpdate(f.driver_id, f.type, f.event_ms, f.lat, f.lng, "", f.order_id or "")
    if f.kind == "order" and f.type not in RESTAURANT_ORDER_EVENTS:
        return None
    assert f.restaurant_id is not None
    return RestaurantUpdate(f.restaurant_id, f.type, f.order_id or "", f.event_ms, f.lat, f.lng)
