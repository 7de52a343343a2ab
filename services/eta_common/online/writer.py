"""Writing the online store: updates, ready rows and their schedule, the materialised supply counts.

* :meth:`OnlineWriter.apply` applies a batch in one pipeline (``apply_restaurant`` calls of up to
  :data:`RESTAURANTS_PER_CALL` restaurants each — of one cluster slot each on a Redis Cluster — which also
  re-materialise the restaurants' ready rows, and one ``apply_city`` call per market), then registers
  each touched row's ``valid_until`` in its due bucket (a second, small pipeline).
* The **row timer** (:meth:`claim_due` + :meth:`materialize`) re-materialises rows whose ``valid_until``
  is near: windows drain by themselves, so a quiet restaurant's row must be recomputed when its oldest
  order leaves a window. It computes the next row ahead of time, as of the edge, into the row's ``n``
  field (readers take whichever of ``w`` and ``n`` is valid), so reads do not depend on the timer's
  punctuality. Claims are leased in Redis, so several aggregators share the work and a dead one's
  claims come back.
* The **supply refresher** (:meth:`refresh_supply`) counts the free drivers near every restaurant of the
  buckets it holds (one GEOSEARCH around them all, counted with Redis' own arithmetic) and writes each
  count into the restaurant's row: a prediction no longer searches the geo index.

Every update is idempotent (set members are ids; first-write-wins per order field; state changes only
for strictly newer event times), so at-least-once delivery and crash replays cannot double count; a row
is a pure function of the sorted sets at its ``computed`` time, so recomputing it is always safe.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from json.encoder import c_make_encoder, encode_basestring  # type: ignore[attr-defined]
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot

from eta_common import features as F
from eta_common.online.connection import Call, Pipelines
from eta_common.online.geo import count_within, covering_disc, decode_geohashes
from eta_common.online.keys import (
    AGGREGATORS_KEY,
    CITY,
    INITIALIZED_KEY,
    LIVE_AGGREGATOR_MS,
    MARKETS_KEY,
    ROW_BUCKETS,
    driver_keys,
    due_key,
    restaurant_keys,
    row_bucket,
    row_key,
    supply_lock_key,
)
from eta_common.online.rows import supply_text
from eta_common.online.updates import DISPATCH_ORDER_EVENTS, DriverUpdate, RestaurantUpdate
from eta_common.timeutil import now_ms as wall_ms

__all__ = ["ORDER_STATE_TTL_S", "RESTAURANTS_PER_CALL", "SUPPLY_CHUNK", "OnlineWriter"]

log = logging.getLogger(__name__)

ORDER_STATE_TTL_S = 6 * 3600
REBUILDING = b"rebuilding:"  # the initialized key's value while a rebuild runs
FORGET_AGGREGATOR_MS = 3_600_000
# Restaurants counted per numpy pass of the supply refresh (bounds its distance matrix: n × drivers).
SUPPLY_CHUNK = 500
# Restaurants per apply_restaurant call. A call has a fixed cost on both sides (the aggregator packs it and
# reads its reply; Redis starts a script), which one call per restaurant paid for every restaurant of a
# batch; the bound keeps a call short (~25 µs of Redis per restaurant) so reads are not held up behind it.
RESTAURANTS_PER_CALL = 32
_COUNT_WINDOWS = ",".join(str(w.window_ms) for w in F.WINDOW_COUNTS)
_PREP_WINDOWS = ",".join(str(m.window_ms) for m in F.WINDOW_MEANS)
_PICKUP_WINDOWS = ",".join(str(m.window_ms) for m in F.PICKUP_WAIT_MEANS)

_json_encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))
# The json module's C encoder, made once: JSONEncoder.encode makes one per call (~2 µs of the ~3 µs it
# costs per restaurant and batch). Same settings, same text: the update lists hold strings only.
_c_encode = (
    None
    if c_make_encoder is None
    else c_make_encoder(None, None, encode_basestring, None, ":", ",", False, False, True)
)


def _json(rows: Any) -> str:
    if _c_encode is None:  # CPython without its _json accelerator
        return _json_encoder.encode(rows)
    return "".join(_c_encode(rows, 0))


def _valid_until(raw: bytes) -> tuple[bytes, bytes]:
    """(flags, valid_until) of one restaurant's part of an ``apply_restaurant`` result, valid_until as the
    text of its due score (``inf``: no window changes by itself)."""
    flags, _, until = raw.rpartition(b"|")
    return flags, until or b"inf"


def _per_restaurant(chunks: Sequence[Sequence[int]], results: Sequence[bytes], n: int) -> list[bytes]:
    """Each restaurant's part of the ``apply_restaurant`` results (one per call, parts joined by ';'; the
    results may go on with other calls'), in the order of the restaurants the calls were made from."""
    out = [b""] * n
    for positions, result in zip(chunks, results[: len(chunks)], strict=True):
        for position, part in zip(positions, result.split(b";"), strict=True):
            out[position] = part
    return out


class OnlineWriter(Pipelines):
    def __init__(
        self,
        client: aioredis.Redis,
        *,
        allowed_lateness_ms: int = F.DEFAULT_ALLOWED_LATENESS_MS,
        city: str = CITY,
    ) -> None:
        super().__init__(client)
        self._cluster = isinstance(client, RedisCluster)
        self.retention_ms = F.MAX_WINDOW_MS + allowed_lateness_ms
        self.prep_retention_ms = F.MAX_PREP_WINDOW_MS + allowed_lateness_ms
        self.pickup_retention_ms = F.MAX_PICKUP_WINDOW_MS + allowed_lateness_ms
        self.waiting_retention_ms = F.WAITING_ORDER_TTL_MS + allowed_lateness_ms
        self.settled_retention_ms = F.SETTLED_ORDER_RETENTION_MS + allowed_lateness_ms
        # apply_restaurant's constants (see its header): retentions, TTLs and the row's windows
        self._restaurant_constants = "|".join(
            str(value)
            for value in (
                self.retention_ms,
                ORDER_STATE_TTL_S,
                F.KITCHEN_ORDER_TTL_MS,
                self.prep_retention_ms,
                self.pickup_retention_ms,
                _COUNT_WINDOWS,
                _PREP_WINDOWS,
                _PICKUP_WINDOWS,
            )
        )
        self.city = city  # the default market
        self._city_keys = driver_keys(city)
        self._market_keys: dict[str, dict[str, str]] = {city: self._city_keys}
        self._markets_seen: set[str] = set()

    def _head(self, now_ms: int) -> str:
        """``apply_restaurant``'s first argument: ``now`` and the writer's constants, one string."""
        return f"{now_ms}|{self._restaurant_constants}"

    def _chunks(self, restaurant_ids: Sequence[str]) -> list[list[int]]:
        """Positions of the restaurants per ``apply_restaurant`` call: at most
        :data:`RESTAURANTS_PER_CALL` each, and on a Redis Cluster all of one slot."""
        n, size = len(restaurant_ids), RESTAURANTS_PER_CALL
        if not self._cluster:
            return [list(range(start, min(start + size, n))) for start in range(0, n, size)]
        by_slot: dict[int, list[int]] = defaultdict(list)
        for position, restaurant_id in enumerate(restaurant_ids):
            by_slot[key_slot(row_key(restaurant_id).encode())].append(position)
        return [same[i : i + size] for same in by_slot.values() for i in range(0, len(same), size)]

    def _restaurant_calls(
        self, restaurant_ids: Sequence[str], updates: Sequence[list[list[str]]], head: str, *ahead: Any
    ) -> tuple[list[list[int]], Callable[[dict[str, str]], list[Call]]]:
        """The ``apply_restaurant`` calls for these restaurants (each with its updates): their positions
        per call, and the calls given the scripts' SHAs."""
        chunks = self._chunks(restaurant_ids)
        made = [
            ([row_key(restaurant_ids[p]) for p in positions], _json([updates[p] for p in positions]))
            for positions in chunks
        ]

        def calls(sha: dict[str, str]) -> list[Call]:
            script = sha["apply_restaurant"]
            return [("EVALSHA", script, len(keys), *keys, head, text, *ahead) for keys, text in made]

        return chunks, calls

    async def apply(self, updates: Sequence[RestaurantUpdate | DriverUpdate], *, now_ms: int) -> list[int]:
        """Apply updates in one pipeline (one round trip): script calls of up to
        :data:`RESTAURANTS_PER_CALL` restaurants, and one per market for the city (every driver update,
        plus the PLACED and CANCELLED order events with an order id, which change the dispatch backlog),
        each applying its updates in order; then register the touched rows' ``valid_until``. Returns 1
        per update that changed state (in its restaurant's keys or the city's)."""
        if not updates:
            return []
        default = self.city
        by_restaurant: dict[str, tuple[list[int], list[list[str]]]] = {}
        market_of: dict[str, str] = {}
        by_market: dict[str, tuple[list[int], list[list[str]]]] = {}  # city-wide updates per market
        for index, u in enumerate(updates):
            market = u.market or default
            if type(u) is DriverUpdate:
                group = by_market.get(market)
                if group is None:
                    group = by_market[market] = ([], [])
                group[0].append(index)
                group[1].append(
                    [
                        u.event_type,
                        u.driver_id,
                        u.order_id,
                        str(u.event_ms),
                        repr(u.lat),
                        repr(u.lng),
                        u.writer,
                    ]
                )
                continue
            assert type(u) is RestaurantUpdate
            rid = u.restaurant_id
            group = by_restaurant.get(rid)
            if group is None:
                group = by_restaurant[rid] = ([], [])
                market_of[rid] = market
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
                city = by_market.get(market)
                if city is None:
                    city = by_market[market] = ([], [])
                city[0].append(index)
                city[1].append([u.event_type, "", u.order_id, raw, "", "", u.writer])
        groups = list(by_restaurant.items())
        cities = list(by_market.items())
        head = self._head(now_ms)
        chunks, restaurant_calls = self._restaurant_calls(
            [restaurant_id for restaurant_id, _ in groups], [rows for _, (_, rows) in groups], head
        )

        def calls(sha: dict[str, str]) -> list[Call]:
            city_sha = sha["apply_city"]
            out = restaurant_calls(sha)
            for market, (_, rows) in cities:
                dkeys = self._keys_of(market)
                out.append(
                    (
                        "EVALSHA",
                        city_sha,
                        5,
                        dkeys["free"],
                        dkeys["state"],
                        dkeys["meta"],
                        dkeys["waiting"],
                        dkeys["settled"],
                        now_ms,
                        self.waiting_retention_ms,
                        self.settled_retention_ms,
                        _json(rows),
                    )
                )
            return out

        results = await self._run_calls(calls)
        changed = [0] * len(updates)
        due: dict[str, list[tuple[str, bytes]]] = defaultdict(list)
        parts = _per_restaurant(chunks, results, len(groups))
        for (restaurant_id, (indices, _)), part in zip(groups, parts, strict=True):
            flags, until = _valid_until(part)
            due[market_of[restaurant_id]].append((restaurant_id, until))
            for index, flag in zip(indices, flags, strict=True):
                changed[index] = flag - 48  # b"0"/b"1"
        for (_, (indices, _)), flags in zip(cities, results[len(chunks) :], strict=True):
            for index, flag in zip(indices, flags, strict=True):
                changed[index] |= flag - 48
        new_markets = {m for m in (*due, *by_market) if m not in self._markets_seen}
        if due or new_markets:
            await self._register(due, new_markets)
        return changed

    def _keys_of(self, market: str) -> dict[str, str]:
        keys = self._market_keys.get(market)
        if keys is None:
            keys = self._market_keys[market] = driver_keys(market)
        return keys

    async def markets(self) -> list[str]:
        """Every market a writer has seen (the default one included)."""
        found = {m.decode() if isinstance(m, bytes) else m for m in await self.client.smembers(MARKETS_KEY)}
        return sorted(found | {self.city})

    async def materialize(
        self, restaurant_ids: Sequence[str], *, now_ms: int, lookahead_ms: int = 0, market: str = ""
    ) -> dict[str, float]:
        """Recompute the rows of these restaurants (of ``market``, default: the writer's) and register
        when each is next due (returned, ``inf`` when no window can change by itself). Without
        ``lookahead_ms``: as of ``now_ms``. With it (the row timer): as of each row's ``valid_until``,
        into the row's ``n`` field when that is still ahead, so a read at the edge finds a valid row
        without waiting for the timer."""
        if not restaurant_ids:
            return {}
        ahead = ("ahead", lookahead_ms) if lookahead_ms > 0 else ()
        chunks, calls = self._restaurant_calls(
            restaurant_ids, [[] for _ in restaurant_ids], self._head(now_ms), *ahead
        )
        parts = _per_restaurant(chunks, await self._run_calls(calls), len(restaurant_ids))
        due = [(rid, _valid_until(part)[1]) for rid, part in zip(restaurant_ids, parts, strict=True)]
        await self._register({market or self.city: due}, set())
        return {rid: float(until) for rid, until in due}

    async def _register(self, due: dict[str, list[tuple[str, bytes]]], new_markets: set[str]) -> None:
        """Each row's next re-materialisation time into its market's bucket (one ZADD per bucket), and
        markets not seen before into the markets set."""
        buckets: dict[tuple[str, int], list[Any]] = defaultdict(list)
        for market, rows in due.items():
            for restaurant_id, until in rows:
                pieces = buckets[(market, row_bucket(restaurant_id))]
                pieces.append(until)
                pieces.append(restaurant_id)

        def calls(_: dict[str, str]) -> list[Call]:
            out: list[Call] = [
                ("ZADD", due_key(bucket, market), *pieces) for (market, bucket), pieces in buckets.items()
            ]
            if new_markets:
                out.append(("SADD", MARKETS_KEY, *sorted(new_markets)))
            return out

        await self._run_calls(calls)
        self._markets_seen |= new_markets

    async def claim_due(
        self,
        *,
        now_ms: int,
        lease_ms: int,
        limit: int,
        buckets: Iterable[int] = range(ROW_BUCKETS),
        market: str = "",
    ) -> list[str]:
        """Claim up to ``limit`` rows per bucket of ``market`` (default: the writer's) due by ``now_ms``
        (leased for ``lease_ms``: :meth:`materialize` registers their next time)."""
        chosen = list(buckets)
        market = market or self.city

        def build(pipe: Any) -> None:
            for bucket in chosen:
                pipe.evalsha(self._sha["claim_due"], 1, due_key(bucket, market), now_ms, lease_ms, limit)

        results = await self._run(build)
        return [member.decode() for members in results for member in members]

    async def refresh_supply(
        self, *, now_ms: int, owner: str, hold_ms: int, market: str = "", restamp_ms: int = 0
    ) -> int:
        """Count the free drivers near the restaurants of ``market`` (default: the writer's) in every
        bucket this process can hold for ``hold_ms`` (``SET NX PX``: one refresher per bucket per period,
        across aggregators) and write the counts into their rows. Returns the number of rows written.

        ``restamp_ms`` > 0: a count equal to the one in the row is left as it is until the row's count is
        that old (its as-of instant, ``now_ms - restamp_ms`` or earlier); a changed count is written at
        once. The row keeps the count, the instant it was counted and the drivers' provenance then, so it
        stays exact as of that instant; only the reported age grows (to at most ``restamp_ms`` plus the
        refresh period). Every write of ``s`` invalidates the row in every serving replica's client-side
        cache, so not restamping unchanged counts every period saves those replicas a Redis round trip
        per row read afterwards, and Redis the writes."""
        market = market or self.city

        def lock(pipe: Any) -> None:
            for bucket in range(ROW_BUCKETS):
                pipe.set(supply_lock_key(bucket, market), owner, nx=True, px=hold_ms)

        held = [
            bucket
            for bucket, ok in zip(range(ROW_BUCKETS), await self._run(lock, scripts=False), strict=True)
            if ok
        ]
        if not held:
            return 0

        def members(pipe: Any) -> None:
            for bucket in held:
                pipe.zrange(due_key(bucket, market), 0, -1)

        ids = [m.decode() for found in await self._run(members, scripts=False) for m in found]
        if not ids:
            return 0

        def meta(pipe: Any) -> None:
            for restaurant_id in ids:
                pipe.hmget(restaurant_keys(restaurant_id)["meta"], ("lat", "lng"))
                if restamp_ms > 0:
                    pipe.hget(row_key(restaurant_id), "s")

        replies = await self._run(meta, scripts=False)
        if restamp_ms > 0:
            places, current = replies[0::2], dict(zip(ids, replies[1::2], strict=True))
        else:
            places, current = replies, {}
        located: list[tuple[str, tuple[float, float]]] = []
        unplaced: list[str] = []
        for restaurant_id, (lat, lng) in zip(ids, places, strict=True):
            if lat is None or lng is None:
                unplaced.append(restaurant_id)
            else:
                located.append((restaurant_id, (float(lat), float(lng))))
        counts: dict[str, str] = {}
        for start in range(0, len(located), SUPPLY_CHUNK):
            chunk = located[start : start + SUPPLY_CHUNK]
            counts.update(await self._count_chunk(chunk, self._keys_of(market)))
        as_of = now_ms
        for restaurant_id in unplaced:
            counts[restaurant_id] = supply_text_unknown(as_of)
        if restamp_ms > 0:
            counts = {
                rid: text
                for rid, text in counts.items()
                if not _same_recent_count(current.get(rid), text, now_ms - restamp_ms)
            }
        if not counts:
            return 0

        def write(pipe: Any) -> None:
            for restaurant_id, text in counts.items():
                pipe.hset(row_key(restaurant_id), "s", text)

        await self._run(write, scripts=False)
        return len(counts)

    async def _count_chunk(
        self, chunk: Sequence[tuple[str, tuple[float, float]]], keys: dict[str, str]
    ) -> dict[str, str]:
        """One GEOSEARCH around the chunk and the drivers group's freshness, read together; the as-of
        time is taken just before the read (a count is exact for the driver state at that instant up to
        the read's own round trip)."""
        points = [location for _, location in chunk]
        centre, radius = covering_disc(points, F.SUPPLY_RADIUS_KM)

        def build(pipe: Any) -> None:
            pipe.hmget(keys["meta"], ("u:drivers", "e:drivers", "t:drivers"))
            pipe.geosearch(
                keys["free"], longitude=centre[1], latitude=centre[0], radius=radius, unit="km", withhash=True
            )

        as_of = wall_ms()
        (updated, event, writer), found = await self._run(build, scripts=False)
        if updated is None:  # no driver event ever seen: the supply is unknown, not zero
            return {rid: supply_text_unknown(as_of) for rid, _ in chunk}
        lat, lng = decode_geohashes([int(member[1]) for member in found])
        counted = count_within(points, lat, lng, F.SUPPLY_RADIUS_KM)
        event_ms = None if event is None else int(event)
        return {
            rid: supply_text(count, as_of, event_ms, writer)
            for (rid, _), count in zip(chunk, counted, strict=True)
        }

    async def publish_progress(self, member: str, caught_up_ms: int, *, now_ms: int) -> int | None:
        """Say when this aggregator was last current (see :class:`aggregator.consumer.Progress`); returns
        the store's freshness instant: the oldest among the aggregators heard from within
        :data:`LIVE_AGGREGATOR_MS` (what a read takes as "known current as of")."""

        def build(pipe: Any) -> None:
            pipe.evalsha(
                self._sha["publish_progress"],
                1,
                AGGREGATORS_KEY,
                member,
                caught_up_ms,
                now_ms,
                LIVE_AGGREGATOR_MS,
                FORGET_AGGREGATOR_MS,
            )

        (current,) = await self._run(build)
        return None if current is None else int(current)

    async def is_initialized(self) -> bool:
        """False when the online store was never built, was lost (flushed, new Redis) or is being
        rebuilt."""
        value = await self.client.get(INITIALIZED_KEY)
        raw = value.encode() if isinstance(value, str) else value
        initialized = raw is not None and not raw.startswith(REBUILDING)
        if value is None:
            self._markets_seen.clear()  # the markets set went with it: the rebuild registers them again
        return initialized

    async def begin_rebuild(self) -> str:
        """Say a rebuild starts (the store stays uninitialized); returns its token for
        :meth:`finish_rebuild`."""
        token = secrets.token_hex(8)
        await self.client.set(INITIALIZED_KEY, REBUILDING + token.encode())
        return token

    async def finish_rebuild(self, token: str, *, now_ms: int) -> bool:
        """Mark the store initialized — unless it was flushed (or another rebuild began) since
        :meth:`begin_rebuild`: then this rebuild's result is incomplete and the store stays
        uninitialized, so the next check rebuilds again. Returns whether it was marked."""

        def build(pipe: Any) -> None:
            pipe.evalsha(self._sha["finish_rebuild"], 1, INITIALIZED_KEY, REBUILDING + token.encode(), now_ms)

        (marked,) = await self._run(build)
        return bool(marked)


def _same_recent_count(written: Any, text: str, oldest_ms: int) -> bool:
    """Whether the row's ``s`` (``written``, bytes or None) holds the same count as ``text``, counted at
    ``oldest_ms`` or later (then it need not be written again)."""
    if not written:
        return False
    if isinstance(written, str):
        written = written.encode()
    count, _, rest = written.partition(b"|")
    as_of, _, _ = rest.partition(b"|")
    try:
        return count.decode() == text.partition("|")[0] and int(as_of) >= oldest_ms
    except ValueError:
        return False


def supply_text_unknown(as_of_ms: int) -> str:
    """The ``s`` field when the count cannot be known (no location, no driver event ever)."""
    return f"nan|{as_of_ms}||"
