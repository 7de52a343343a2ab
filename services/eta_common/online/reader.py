"""The serving read: ready rows first, the exact read only where a row is not valid at the read's time.

One round trip reads the city (backlog count and freshness: two commands per request, not per
restaurant), the customer's batch features when asked, and one ``HMGET rst:{R}:row w s`` per restaurant.
A row is used when ``computed <= now < valid_until`` and its supply count exists; that answer is exact by
construction (see :mod:`eta_common.online.rows`). Every other restaurant (the aggregator lags behind a
window edge, the row was never built, a read ``as of`` another time) is read from the sorted sets in a
second round trip (:mod:`eta_common.online.exact`, today's exact read with a GEOSEARCH for its supply),
so answers stay exact either way; the block counts both paths.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis

from eta_common import features as F
from eta_common.customer_features import (
    CUSTOMER_READ_REPLIES,
    CustomerFeatures,
    parse_customer_read,
    queue_customer_read,
)
from eta_common.feature_block import FeatureBlock, FeatureColumns, RestaurantFeatures
from eta_common.online.assemble import (
    NO_CUSTOMER,
    City,
    RestaurantState,
    RowTemplate,
    Supply,
    assemble,
    assemble_columns,
    template_of,
)
from eta_common.online.connection import Pipelines
from eta_common.online.exact import (
    CITY_READ_REPLIES,
    RESTAURANT_READ_REPLIES,
    Bounds,
    queue_city,
    queue_exact,
    reduce_exact,
)
from eta_common.online.geo import BULK_NEARBY_MIN, count_within, covering_disc, decode_geohashes
from eta_common.online.keys import CITY, driver_keys
from eta_common.online.rows import ROW_FIELDS, parse_row, parse_supply, valid_row

__all__ = ["OnlineReader"]

Location = tuple[float, float]
# Parsed ready rows kept (by their bytes); at ~1 KB each, a bound of 20k is ~20 MB.
TEMPLATE_CACHE_SIZE = 20_000


class OnlineReader(Pipelines):
    def __init__(self, client: aioredis.Redis, *, city: str = CITY) -> None:
        super().__init__(client)
        self._init_reader(city)

    def _init_reader(self, city: str) -> None:
        self._reader_city_keys = driver_keys(city)
        self._reader_market_keys: dict[str, dict[str, str]] = {}
        self._templates: dict[tuple[bytes, bytes], tuple[int, float, RowTemplate]] = {}
        # the client can answer reads from memory (the prediction service's client-side cache)
        self._memory_reads = hasattr(self.client, "cached")

    async def read_restaurants(
        self, requests: Sequence[tuple[str, Location]], *, now_ms: int, customer_id: str = ""
    ) -> list[RestaurantFeatures]:
        """:meth:`read_block` as one :class:`RestaurantFeatures` per restaurant."""
        if not requests:
            return []
        return (await self.read_block(requests, now_ms=now_ms, customer_id=customer_id)).restaurants()

    def _city_keys_of(self, market: str) -> dict[str, str]:
        if not market:
            return self._reader_city_keys
        keys = self._reader_market_keys.get(market)
        if keys is None:
            keys = self._reader_market_keys[market] = driver_keys(market)
        return keys

    def read_from_memory(
        self,
        requests: Sequence[tuple[str, Location]],
        *,
        now_ms: int,
        customer_id: str = "",
        market: str = "",
    ) -> FeatureBlock | None:
        """:meth:`read_block` answered without I/O, when the client holds every reply in memory (the
        prediction service's client-side cache, which Redis invalidates) and every restaurant has a row
        valid at ``now_ms``; None otherwise (then :meth:`read_block`). A hit awaits nothing, so the
        caller needs no timeout, pipeline or round-trip bookkeeping around it. (When a row turns out
        not valid, :meth:`read_block` reads again: those cached replies count twice as cache hits.)"""
        found = self._memory_read(requests, now_ms, customer_id, market)
        if found is None:
            return None
        city, customer, states = found
        return self._block(requests, now_ms, states, city, customer, 0)

    def read_columns_from_memory(
        self,
        requests: Sequence[tuple[str, Location]],
        *,
        now_ms: int,
        customer_id: str = "",
        market: str = "",
    ) -> FeatureColumns | None:
        """:meth:`read_from_memory` as arrays (a feed): the same answer, built from the cached row
        templates' packed rows in one array instead of a list per row; None when the read needs I/O."""
        found = self._memory_read(requests, now_ms, customer_id, market)
        if found is None:
            return None
        city, customer, templates = found
        locations: list[Location | None] = [location for _, location in requests]
        return assemble_columns([rid for rid, _ in requests], locations, templates, city, customer)

    def _memory_read(
        self, requests: Sequence[tuple[str, Location]], now_ms: int, customer_id: str, market: str
    ) -> tuple[City, CustomerFeatures, list[RowTemplate]] | None:
        """The serving read's city, customer and row templates from the client's memory; None when any
        reply is not there or any restaurant has no row valid at ``now_ms``."""
        if not requests or not self._memory_reads:
            return None
        pipe: Any = self.client.pipeline(transaction=False)
        self._queue_read(pipe, requests, self._city_keys_of(market), now_ms, customer_id)
        results = pipe.cached()
        if results is None:
            return None
        city, customer, states, stale = self._parse_read(results, now_ms, customer_id)
        if stale:
            return None
        return city, customer, states  # type: ignore[return-value]  # none stale: every one a template

    async def read_block(
        self,
        requests: Sequence[tuple[str, Location]],
        *,
        now_ms: int,
        customer_id: str = "",
        market: str = "",
    ) -> FeatureBlock:
        """Features of many restaurants (id, location) of one market (default: the reader's) — e.g. a
        home feed — with, given a ``customer_id``, the customer's batch history features (the same for
        every restaurant)."""
        if not requests:
            return FeatureBlock.defaults(requests, now_ms)
        city_keys = self._city_keys_of(market)
        results = await self._run(
            lambda pipe: self._queue_read(pipe, requests, city_keys, now_ms, customer_id), scripts=False
        )
        city, customer, states, stale = self._parse_read(results, now_ms, customer_id)
        if stale:
            exact = await self._read_exact([requests[i] for i in stale], Bounds.at(now_ms), city, city_keys)
            for i, state in zip(stale, exact, strict=True):
                states[i] = state
        return self._block(requests, now_ms, states, city, customer, len(stale))

    @staticmethod
    def _queue_read(
        pipe: Any,
        requests: Sequence[tuple[str, Location]],
        city_keys: dict[str, str],
        now_ms: int,
        customer_id: str,
    ) -> None:
        """The serving read's commands: the city part, the customer's when asked, a row per restaurant."""
        queue_city(pipe, city_keys, now_ms)
        if customer_id:
            queue_customer_read(pipe, customer_id)
        for restaurant_id, _location in requests:
            pipe.hmget(f"rst:{{{restaurant_id}}}:row", ROW_FIELDS)

    def _parse_read(
        self, results: Sequence[Any], now_ms: int, customer_id: str
    ) -> tuple[City, CustomerFeatures, list[RestaurantState | RowTemplate | None], list[int]]:
        """The city, the customer, each restaurant's row valid at ``now_ms`` (None where there is none)
        and the positions of those without one (they need the exact read)."""
        city = City.of(results[0], results[1], results[2], now_ms)
        base = CITY_READ_REPLIES
        customer = NO_CUSTOMER
        if customer_id:
            customer = parse_customer_read(results[base : base + CUSTOMER_READ_REPLIES])
            base += CUSTOMER_READ_REPLIES
        states: list[RestaurantState | RowTemplate | None] = []
        stale: list[int] = []
        template = self._template
        for i, (w, n, s) in enumerate(results[base:]):
            found = template(w, s, now_ms) if s else None
            if found is None and n and s:
                found = template(n, s, now_ms)
            states.append(found)
            if found is None:
                stale.append(i)
        return city, customer, states, stale

    @staticmethod
    def _block(
        requests: Sequence[tuple[str, Location]],
        now_ms: int,
        states: Sequence[RestaurantState | RowTemplate | None],
        city: City,
        customer: CustomerFeatures,
        from_fallback: int,
    ) -> FeatureBlock:
        block = assemble(
            [rid for rid, _ in requests],
            [location for _, location in requests],
            now_ms,
            [state for state in states if state is not None],
            city,
            customer,
        )
        block.from_fallback = from_fallback
        block.from_rows = len(requests) - from_fallback
        return block

    def _template(self, packed: bytes, supply: bytes, now_ms: int) -> RowTemplate | None:
        """The row template of a ready row version (``w`` or ``n``) with its supply, when valid at
        ``now_ms``. Parsed templates are cached by the row's bytes: a restaurant's row is read by every
        feed it appears in and changes only with its events, so a hot row is parsed once, not per read."""
        key = (packed, supply)
        cached = self._templates.get(key)
        if cached is None:
            row = parse_row(packed, parse_supply(supply))
            if row is None:
                return None
            if len(self._templates) >= TEMPLATE_CACHE_SIZE:
                self._templates.clear()  # simple bound: rows change, old bytes are never asked again
            cached = self._templates[key] = (row.computed_ms, row.valid_until_ms, template_of(row.state))
        computed, valid_until, found = cached
        return found if computed <= now_ms < valid_until else None

    async def read_exact(
        self, requests: Sequence[tuple[str, Location]], *, now_ms: int, market: str = ""
    ) -> FeatureBlock:
        """The exact read from the sorted sets, ignoring the ready rows (the source of truth: checks,
        tests, and what the serving read falls back to)."""
        bounds = Bounds.at(now_ms)
        city_keys = self._city_keys_of(market)

        def build(pipe: Any) -> None:
            queue_city(pipe, city_keys, now_ms)

        waiting, fields, current = await self._run(build, scripts=False)
        city = City.of(waiting, fields, current, now_ms)
        states = await self._read_exact(requests, bounds, city, city_keys) if requests else []
        block = assemble(
            [rid for rid, _ in requests], [loc for _, loc in requests], now_ms, states, city, NO_CUSTOMER
        )
        block.from_fallback = len(requests)
        return block

    async def _read_exact(
        self,
        requests: Sequence[tuple[str, Location | None]],
        bounds: Bounds,
        city: City,
        city_keys: dict[str, str],
    ) -> list[RestaurantState]:
        """The exact read of these restaurants (one round trip), supply counted around each location
        (one GEOSEARCH per restaurant, or one around them all from :data:`BULK_NEARBY_MIN` on)."""
        free = city_keys["free"]
        placed = [location for _, location in requests if location is not None]
        bulk = len(placed) >= BULK_NEARBY_MIN

        def build(pipe: Any) -> None:
            if bulk:
                centre, radius = covering_disc(placed, F.SUPPLY_RADIUS_KM)
                pipe.geosearch(
                    free, longitude=centre[1], latitude=centre[0], radius=radius, unit="km", withhash=True
                )
            for restaurant_id, location in requests:
                queue_exact(pipe, restaurant_id, bounds)
                if not bulk and location is not None:
                    pipe.geosearch(
                        free,
                        longitude=location[1],
                        latitude=location[0],
                        radius=F.SUPPLY_RADIUS_KM,
                        unit="km",
                    )

        results = await self._run(build, scripts=False)
        drivers = city.drivers
        known = drivers.updated is not None
        updated = float("nan") if drivers.updated is None else float(drivers.updated)
        event = float("nan") if drivers.event is None else float(drivers.event)
        position = 0
        counted: list[int] = []
        if bulk:
            lat, lng = decode_geohashes([int(member[1]) for member in results[0]])
            counted = count_within(placed, lat, lng, F.SUPPLY_RADIUS_KM)
            position = 1
        states: list[RestaurantState] = []
        n = RESTAURANT_READ_REPLIES
        placed_index = 0
        for _restaurant_id, location in requests:
            state = reduce_exact(results[position : position + n])
            position += n
            count: int | None = None
            if location is not None:
                if bulk:
                    count = counted[placed_index]
                    placed_index += 1
                else:
                    count = len(results[position])
                    position += 1
            if known and count is not None:
                state = state._replace(supply=Supply(float(count), updated, event, drivers.writer))
            states.append(state)
        return states

    async def read_restaurant(
        self, restaurant_id: str, *, now_ms: int, location: Location | None = None, market: str = ""
    ) -> RestaurantFeatures:
        """All online features of one restaurant. Without ``location``, the stored one: still one round
        trip when the ready row is valid (it carries the location)."""
        if location is not None:
            block = await self.read_block([(restaurant_id, location)], now_ms=now_ms, market=market)
            return block.restaurant(0)
        bounds = Bounds.at(now_ms)
        city_keys = self._city_keys_of(market)

        def build(pipe: Any) -> None:
            queue_city(pipe, city_keys, now_ms)
            pipe.hmget(f"rst:{{{restaurant_id}}}:row", ROW_FIELDS)

        waiting, city_fields, current, (w, n, s) = await self._run(build, scripts=False)
        city = City.of(waiting, city_fields, current, now_ms)
        supply = parse_supply(s)
        row = valid_row(w, n, supply, now_ms) if supply is not None else None
        any_row = row or parse_row(w, supply)
        stored = any_row.location if any_row is not None else None
        if row is not None:
            block = assemble([restaurant_id], [stored], now_ms, [row.state], city, NO_CUSTOMER)
            block.from_rows = 1
            return block.restaurant(0)
        if stored is None:  # no row (or one without a location): the location from the meta hash
            meta_key = f"rst:{{{restaurant_id}}}:meta"
            ((lat, lng),) = await self._run(lambda pipe: pipe.hmget(meta_key, ("lat", "lng")), scripts=False)
            stored = (float(lat), float(lng)) if lat is not None and lng is not None else None
        (state,) = await self._read_exact([(restaurant_id, stored)], bounds, city, city_keys)
        block = assemble([restaurant_id], [stored], now_ms, [state], city, NO_CUSTOMER)
        block.from_fallback = 1
        return block.restaurant(0)
