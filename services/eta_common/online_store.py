"""The online store: Redis key layout, idempotent update scripts and the one-round-trip feature read.

Key layout (hash tags keep one restaurant's keys, and the city's keys, in one Redis Cluster slot each, so
every script call touches one slot and stays atomic):

=============================  ======  ===========================================================
key                            type    content
=============================  ======  ===========================================================
``rst:{R}:placed``             zset    order_id → PLACED event time (ms); windowed order counts
``rst:{R}:o:<order_id>``       hash    accepted / ready / cancelled event times of one order (TTL)
``rst:{R}:kitchen``            zset    order_id → ACCEPTED time, while in the kitchen
``rst:{R}:prep``               zset    "order_id:prep_ms" → READY time; windowed mean prep time
``rst:{R}:meta``               hash    lat, lng, status, status_ms, and per feature group
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

Scripts: ``apply_restaurant`` (one call per restaurant in a batch, on ``rst:{R}``), ``apply_city`` (one
call per batch, on ``drv:{C}``: every driver update in order, plus the batch's PLACED and CANCELLED
order events forwarded as *dispatch* entries — the same events also go to their restaurant's call), and
the reads ``read_restaurant`` (``rst:{R}``) and ``read_city`` (``drv:{C}``: the backlog count and the
city groups' freshness). ASSIGNED updates the driver's state only when newer than the driver's last
event, but settles its order regardless (an assignment is a fact about the order).

Every update is idempotent (set members are ids; first-write-wins per order field; state changes only
for strictly newer event times), so at-least-once delivery and crash replays cannot double count. The
backlog's zsets are trimmed by event time (``waiting``: older than the 3 h TTL + allowed lateness;
``settled``: older than 6 h + allowed lateness), which never changes a value read at "now".
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError

from eta_common import features as F

__all__ = ["FeatureReading", "OnlineStore", "RestaurantFeatures", "driver_keys", "restaurant_keys"]

CITY = "city"
# Present once the online state was built; its absence means Redis lost the state (rebuild needed).
INITIALIZED_KEY = "eta:online:initialized"
ORDER_STATE_TTL_S = 6 * 3600
# Order events that also change the city's dispatch backlog (forwarded to the city script).
DISPATCH_ORDER_EVENTS = frozenset({"PLACED", "CANCELLED"})

# Applies a batch of one restaurant's updates in order. KEYS: placed, kitchen, prep, meta.
# ARGV: now, retention_ms (placements), order_ttl_s, kitchen_ttl_ms, order_key_prefix,
# prep_retention_ms, then 6 per update:
# type, order_id, event_ms, lat ('' if none), lng, writer span ('' if not sampled).
# Returns one 0/1 "changed" flag per update.
_APPLY_RESTAURANT = """
local placed, kitchen, prep, meta = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local now, retention, ttl, kitchen_ttl = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local prefix, prep_retention = ARGV[5], tonumber(ARGV[6])
local out = {}
local touched = {}
local ref = ''
local function touch(group, ems, raw)
  touched[group] = true
  if ref ~= '' then redis.call('HSET', meta, 't:' .. group, ref) end
  local prev = tonumber(redis.call('HGET', meta, 'e:' .. group) or '0')
  if ems > prev then redis.call('HSET', meta, 'e:' .. group, raw) end
end
for i = 7, #ARGV, 6 do
  local etype, oid, raw, lat, lng = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4]
  ref = ARGV[i + 5]
  local ems = tonumber(raw)
  local okey = prefix .. oid
  local changed = 0
  if lat ~= '' then redis.call('HSET', meta, 'lat', lat, 'lng', lng) end
  if etype == 'PLACED' then
    changed = redis.call('ZADD', placed, 'NX', ems, oid)
    redis.call('ZREMRANGEBYSCORE', placed, '-inf', '(' .. (ems - retention))
    touch('orders', ems, raw)
  elseif etype == 'ORDER_ACCEPTED' then
    if redis.call('HSETNX', okey, 'accepted', raw) == 1 then
      changed = 1
      redis.call('EXPIRE', okey, ttl)
      local ready = redis.call('HGET', okey, 'ready')
      if ready then
        redis.call('ZADD', prep, ready, oid .. ':' .. (tonumber(ready) - ems))
      elseif not redis.call('HGET', okey, 'cancelled') then
        redis.call('ZADD', kitchen, ems, oid)
      end
    end
    redis.call('ZREMRANGEBYSCORE', kitchen, '-inf', '(' .. (ems - kitchen_ttl))
    touch('kitchen', ems, raw)
  elseif etype == 'ORDER_READY' then
    if redis.call('HSETNX', okey, 'ready', raw) == 1 then
      changed = 1
      redis.call('EXPIRE', okey, ttl)
      redis.call('ZREM', kitchen, oid)
      local accepted = redis.call('HGET', okey, 'accepted')
      if accepted then
        redis.call('ZADD', prep, ems, oid .. ':' .. (ems - tonumber(accepted)))
      end
    end
    redis.call('ZREMRANGEBYSCORE', prep, '-inf', '(' .. (ems - prep_retention))
    touch('kitchen', ems, raw)
  elseif etype == 'CANCELLED' then
    if redis.call('HSETNX', okey, 'cancelled', raw) == 1 then
      changed = 1
      redis.call('EXPIRE', okey, ttl)
      redis.call('ZREM', kitchen, oid)
    end
    touch('kitchen', ems, raw)
  elseif etype == 'OPENED' or etype == 'CLOSED' or etype == 'BUSY' then
    local prev = tonumber(redis.call('HGET', meta, 'status_ms') or '-1')
    if ems > prev then
      redis.call('HSET', meta, 'status', etype, 'status_ms', raw)
      changed = 1
    end
    touch('status', ems, raw)
  end
  out[#out + 1] = changed
end
for group, _ in pairs(touched) do redis.call('HSET', meta, 'u:' .. group, now) end
return out
"""

# Applies a batch of city-level updates in order. KEYS: free (geo), state, meta, waiting, settled.
# ARGV: now, waiting_retention_ms, settled_retention_ms, then 7 per update:
# type, driver_id, order_id, event_ms, lat, lng, writer span ('' if not sampled).
# Types PLACED and CANCELLED are dispatch entries (order events forwarded by OnlineStore.apply; driver_id,
# lat and lng are ''); every other type is a driver event. Returns one 0/1 "changed" flag per update.
_APPLY_CITY = """
local free, state, meta, waiting, settled = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local now, waiting_retention, settled_retention = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local out = {}
local max_ems = tonumber(redis.call('HGET', meta, 'e:drivers') or '0')
local max_raw = nil
local last_ref = ''
local drivers_seen = false
local dmax_ems = tonumber(redis.call('HGET', meta, 'e:dispatch') or '0')
local dmax_raw = nil
local dlast_ref = ''
local dispatch_seen = false
local function settle(oid, ems, raw, ref)
  dispatch_seen = true
  if ref ~= '' then dlast_ref = ref end
  if ems > dmax_ems then dmax_ems = ems; dmax_raw = raw end
  local changed = redis.call('ZADD', settled, 'NX', ems, oid)
  changed = changed + redis.call('ZREM', waiting, oid)
  redis.call('ZREMRANGEBYSCORE', settled, '-inf', '(' .. (ems - settled_retention))
  if changed > 0 then return 1 end
  return 0
end
for i = 4, #ARGV, 7 do
  local etype, did, oid, raw = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local lat, lng, ref = ARGV[i + 4], ARGV[i + 5], ARGV[i + 6]
  local ems = tonumber(raw)
  if etype == 'PLACED' then
    dispatch_seen = true
    if ref ~= '' then dlast_ref = ref end
    if ems > dmax_ems then dmax_ems = ems; dmax_raw = raw end
    local changed = 0
    if not redis.call('ZSCORE', settled, oid) then
      changed = redis.call('ZADD', waiting, 'NX', ems, oid)
    end
    redis.call('ZREMRANGEBYSCORE', waiting, '-inf', '(' .. (ems - waiting_retention))
    out[#out + 1] = changed
  elseif etype == 'CANCELLED' then
    out[#out + 1] = settle(oid, ems, raw, ref)
  else
    drivers_seen = true
    if ref ~= '' then last_ref = ref end
    local changed = 0
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
      changed = 1
    end
    out[#out + 1] = changed
  end
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
return out
"""

# The city-level values of a read. KEYS: meta, waiting. ARGV: t, waiting TTL (ms).
# Returns: orders waiting (PLACED after t − TTL), then u:/e:/t: of the drivers and dispatch groups.
_READ_CITY = """
local meta, waiting = KEYS[1], KEYS[2]
local t = tonumber(ARGV[1])
local out = {redis.call('ZCOUNT', waiting, '(' .. (t - tonumber(ARGV[2])), '+inf')}
local fields = redis.call('HMGET', meta, 'u:drivers', 'e:drivers', 't:drivers',
  'u:dispatch', 'e:dispatch', 't:dispatch')
for i, v in ipairs(fields) do out[i + 1] = v or false end
return out
"""

_READ_RESTAURANT = """
local placed, kitchen, prep, meta = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local t = tonumber(ARGV[1])
local out = {}
local i = 1
local nwin = tonumber(ARGV[2])
for w = 1, nwin do
  out[i] = redis.call('ZCOUNT', placed, '(' .. (t - tonumber(ARGV[2 + w])), t)
  i = i + 1
end
local base = 2 + nwin
out[i] = redis.call('ZCOUNT', kitchen, '(' .. (t - tonumber(ARGV[base + 1])), '+inf'); i = i + 1
local nmean = tonumber(ARGV[base + 2])
for w = 1, nmean do
  local members = redis.call('ZRANGEBYSCORE', prep, '(' .. (t - tonumber(ARGV[base + 2 + w])), t)
  local sum, n = 0, 0
  for _, m in ipairs(members) do
    local sep = string.find(m, ':[^:]*$')
    sum = sum + tonumber(string.sub(m, sep + 1)); n = n + 1
  end
  out[i] = tostring(sum); out[i + 1] = n; i = i + 2
end
local fields = redis.call('HMGET', meta, 'status', 'lat', 'lng', 'u:orders', 'e:orders', 't:orders',
  'u:kitchen', 'e:kitchen', 't:kitchen', 'u:status', 'e:status', 't:status')
for _, v in ipairs(fields) do out[i] = v or false; i = i + 1 end
return out
"""


# Free drivers within the radius of a point, counted server-side. KEYS: free (geo).
# ARGV: lng, lat, radius_km.
_COUNT_NEARBY = """
return #redis.call('GEOSEARCH', KEYS[1], 'FROMLONLAT', ARGV[1], ARGV[2], 'BYRADIUS', ARGV[3], 'km')
"""


def restaurant_keys(restaurant_id: str) -> dict[str, str]:
    tag = f"rst:{{{restaurant_id}}}"
    return {
        "placed": f"{tag}:placed",
        "kitchen": f"{tag}:kitchen",
        "prep": f"{tag}:prep",
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


@dataclass(frozen=True)
class FeatureReading:
    """One feature value with its freshness."""

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


@dataclass(frozen=True)
class RestaurantUpdate:
    """One order/kitchen event in the form the restaurant script takes."""

    restaurant_id: str
    event_type: str
    order_id: str
    event_ms: int
    lat: float | None = None
    lng: float | None = None
    # "<trace_id>-<span_id>" of the (sampled) span that applied it, stored as the feature's provenance.
    writer: str = ""


@dataclass(frozen=True)
class DriverUpdate:
    driver_id: str
    event_type: str
    event_ms: int
    lat: float
    lng: float
    writer: str = ""
    # The order an ASSIGNED event assigns (settles it in the dispatch backlog); '' when none.
    order_id: str = ""


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
        self.waiting_retention_ms = F.WAITING_ORDER_TTL_MS + allowed_lateness_ms
        self.settled_retention_ms = F.SETTLED_ORDER_RETENTION_MS + allowed_lateness_ms
        self.city = city
        self._sources = {
            "apply_restaurant": _APPLY_RESTAURANT,
            "apply_city": _APPLY_CITY,
            "read_restaurant": _READ_RESTAURANT,
            "read_city": _READ_CITY,
            "count_nearby": _COUNT_NEARBY,
        }
        self._sha: dict[str, str] = {}

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

    async def _run(self, build: Callable[[Any], None]) -> list[Any]:
        """Build a pipeline with ``build(pipe)`` and execute it (one round trip)."""
        if not self._sha:
            await self._load_scripts()
        for attempt in (1, 2):
            pipe = self.client.pipeline(transaction=False)
            build(pipe)
            try:
                return list(await pipe.execute())
            except NoScriptError:
                if attempt == 2:
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
        by_restaurant: dict[str, list[int]] = {}
        city: list[int] = []
        for index, update in enumerate(updates):
            if isinstance(update, DriverUpdate):
                city.append(index)
            else:
                by_restaurant.setdefault(update.restaurant_id, []).append(index)
                if update.event_type in DISPATCH_ORDER_EVENTS and update.order_id:
                    city.append(index)
        dkeys = driver_keys(self.city)
        groups = list(by_restaurant.items())

        def build(pipe: Any) -> None:
            for restaurant_id, indices in groups:
                keys = restaurant_keys(restaurant_id)
                args: list[Any] = [
                    now_ms,
                    self.retention_ms,
                    ORDER_STATE_TTL_S,
                    F.KITCHEN_ORDER_TTL_MS,
                    keys["order_prefix"],
                    self.prep_retention_ms,
                ]
                for index in indices:
                    u = updates[index]
                    assert isinstance(u, RestaurantUpdate)
                    args += [
                        u.event_type,
                        u.order_id,
                        u.event_ms,
                        "" if u.lat is None else repr(u.lat),
                        "" if u.lng is None else repr(u.lng),
                        u.writer,
                    ]
                pipe.evalsha(
                    self._sha["apply_restaurant"],
                    4,
                    keys["placed"],
                    keys["kitchen"],
                    keys["prep"],
                    keys["meta"],
                    *args,
                )
            if city:
                args = [now_ms, self.waiting_retention_ms, self.settled_retention_ms]
                for index in city:
                    c = updates[index]
                    if isinstance(c, DriverUpdate):
                        args += [c.event_type, c.driver_id, c.order_id, c.event_ms, c.lat, c.lng, c.writer]
                    else:  # a dispatch entry: the order event's effect on the city's backlog
                        args += [c.event_type, "", c.order_id, c.event_ms, "", "", c.writer]
                pipe.evalsha(
                    self._sha["apply_city"],
                    5,
                    dkeys["free"],
                    dkeys["state"],
                    dkeys["meta"],
                    dkeys["waiting"],
                    dkeys["settled"],
                    *args,
                )

        results = await self._run(build)
        changed = [0] * len(updates)
        for (_, indices), flags in zip(groups, results, strict=False):
            for index, flag in zip(indices, flags, strict=True):
                changed[index] = int(flag)
        if city:
            for index, flag in zip(city, results[-1], strict=True):
                changed[index] |= int(flag)
        return changed

    async def is_initialized(self) -> bool:
        """False when the online store was never built or was lost (flushed, new Redis)."""
        return bool(await self.client.exists(INITIALIZED_KEY))

    async def mark_initialized(self, now_ms: int) -> None:
        await self.client.set(INITIALIZED_KEY, str(now_ms))

    def _queue_read(self, pipe: Any, restaurant_id: str, now_ms: int) -> None:
        keys = restaurant_keys(restaurant_id)
        pipe.evalsha(
            self._sha["read_restaurant"],
            4,
            keys["placed"],
            keys["kitchen"],
            keys["prep"],
            keys["meta"],
            now_ms,
            len(F.WINDOW_COUNTS),
            *(w.window_ms for w in F.WINDOW_COUNTS),
            F.KITCHEN_ORDER_TTL_MS,
            len(F.WINDOW_MEANS),
            *(m.window_ms for m in F.WINDOW_MEANS),
        )

    def _queue_city(self, pipe: Any, now_ms: int) -> None:
        keys = driver_keys(self.city)
        pipe.evalsha(self._sha["read_city"], 2, keys["meta"], keys["waiting"], now_ms, F.WAITING_ORDER_TTL_MS)

    def _queue_nearby(self, pipe: Any, location: tuple[float, float]) -> None:
        # counted inside Redis: the reply is one integer, not every driver id in the radius
        pipe.evalsha(
            self._sha["count_nearby"],
            1,
            driver_keys(self.city)["free"],
            location[1],
            location[0],
            F.SUPPLY_RADIUS_KM,
        )

    async def read_restaurants(
        self, requests: Sequence[tuple[str, tuple[float, float]]], *, now_ms: int
    ) -> list[RestaurantFeatures]:
        """Features of many restaurants (id, location) in one round trip, e.g. for a home feed."""
        if not requests:
            return []

        def build(pipe: Any) -> None:
            self._queue_city(pipe, now_ms)
            for restaurant_id, location in requests:
                self._queue_read(pipe, restaurant_id, now_ms)
                self._queue_nearby(pipe, location)

        results = await self._run(build)
        city = results[0]
        return [
            self._assemble(rid, now_ms, results[1 + 2 * i], city, results[2 + 2 * i], location)
            for i, (rid, location) in enumerate(requests)
        ]

    async def read_restaurant(
        self, restaurant_id: str, *, now_ms: int, location: tuple[float, float] | None = None
    ) -> RestaurantFeatures:
        """All online features of one restaurant: one round trip when ``location`` is given, else two
        (the restaurant's stored location is read first)."""
        if location is not None:
            return (await self.read_restaurants([(restaurant_id, location)], now_ms=now_ms))[0]

        def build(pipe: Any) -> None:
            self._queue_city(pipe, now_ms)
            self._queue_read(pipe, restaurant_id, now_ms)

        city, raw = await self._run(build)
        nearby = None
        fields = len(F.WINDOW_COUNTS) + 1 + 2 * len(F.WINDOW_MEANS)  # status, lat, lng follow the values
        lat, lng = raw[fields + 1], raw[fields + 2]
        if lat not in (False, None):
            location = (float(lat), float(lng))
            (nearby,) = await self._run(lambda pipe: self._queue_nearby(pipe, location))
        return self._assemble(restaurant_id, now_ms, raw, city, nearby, location)

    def _assemble(
        self,
        restaurant_id: str,
        now_ms: int,
        raw: list[Any],
        city: list[Any],
        nearby: int | None,
        location: tuple[float, float] | None,
    ) -> RestaurantFeatures:
        nwin = len(F.WINDOW_COUNTS)
        counts = [int(x) for x in raw[:nwin]]
        in_kitchen = int(raw[nwin])
        nmean = len(F.WINDOW_MEANS)
        preps = [(float(raw[nwin + 1 + 2 * k]), int(raw[nwin + 2 + 2 * k])) for k in range(nmean)]
        status, _lat, _lng, *groups = raw[nwin + 1 + 2 * nmean :]
        orders, kitchen, status_meta = (_Provenance.of(groups[i : i + 3]) for i in (0, 3, 6))
        waiting = int(city[0])
        drivers, dispatch = _Provenance.of(city[1:4]), _Provenance.of(city[4:7])
        out = RestaurantFeatures(restaurant_id=restaurant_id, as_of_ms=now_ms, location=location)
        for window, count in zip(F.WINDOW_COUNTS, counts, strict=True):
            out.readings[window.name] = orders.reading(window.name, float(count), orders.updated is not None)
        out.readings[F.ORDERS_IN_KITCHEN] = kitchen.reading(
            F.ORDERS_IN_KITCHEN, float(in_kitchen), kitchen.updated is not None
        )
        for mean, (prep_sum_ms, prep_n) in zip(F.WINDOW_MEANS, preps, strict=True):
            prep = prep_sum_ms / prep_n / 60_000.0 if prep_n else F.DEFAULTS[mean.name]
            out.readings[mean.name] = kitchen.reading(mean.name, prep, prep_n > 0)
        busy = 1.0 if status in (b"BUSY", "BUSY") else 0.0
        out.readings[F.KITCHEN_BUSY] = status_meta.reading(F.KITCHEN_BUSY, busy, status not in (None, False))
        known = nearby is not None and drivers.updated is not None
        free = float(nearby) if nearby is not None and known else F.DEFAULTS[F.FREE_DRIVERS_NEARBY]
        out.readings[F.FREE_DRIVERS_NEARBY] = drivers.reading(F.FREE_DRIVERS_NEARBY, free, known)
        backlog_known = dispatch.updated is not None
        backlog = float(waiting) if backlog_known else F.DEFAULTS[F.ORDERS_WAITING_FOR_DRIVER]
        out.readings[F.ORDERS_WAITING_FOR_DRIVER] = dispatch.reading(
            F.ORDERS_WAITING_FOR_DRIVER, backlog, backlog_known
        )
        return out


@dataclass(frozen=True)
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


def update_from_event(event: Any) -> RestaurantUpdate | DriverUpdate | None:
    """Map an ``eta.v1.Event`` to the online update it causes (None for events with no online effect)."""
    from eta.v1 import events_pb2
    from eta_common.timeutil import ms_from_timestamp

    kind = event.WhichOneof("payload")
    if kind == "driver":
        d = event.driver
        return DriverUpdate(
            d.driver_id,
            events_pb2.DriverEvent.Type.Name(d.type),
            ms_from_timestamp(d.event_time),
            d.location.lat,
            d.location.lng,
            order_id=d.order_id,
        )
    if kind == "kitchen":
        k = event.kitchen
        loc = k.restaurant_location if k.HasField("restaurant_location") else None
        return RestaurantUpdate(
            k.restaurant_id,
            events_pb2.KitchenEvent.Type.Name(k.type),
            k.order_id,
            ms_from_timestamp(k.event_time),
            loc.lat if loc else None,
            loc.lng if loc else None,
        )
    if kind == "order":
        o = event.order
        etype = events_pb2.OrderEvent.Type.Name(o.type)
        if etype not in ("PLACED", "CANCELLED"):
            return None
        loc = o.restaurant_location if o.HasField("restaurant_location") else None
        return RestaurantUpdate(
            o.restaurant_id,
            etype,
            o.order_id,
            ms_from_timestamp(o.event_time),
            loc.lat if loc else None,
            loc.lng if loc else None,
        )
    return None
