"""Point-in-time feature values from event history (the offline path).

Replays archived events in the order the online path saw them (ingest time, or apply time when known)
through an in-memory model of exactly the semantics the Redis scripts in :mod:`eta_common.online_store`
implement, and evaluates features at query times. A query at time t sees only events seen at or before
t, so no value from the future — including late-arriving events — can leak into a training row; late events
(beyond the allowed lateness) are ignored exactly as online.

Markets: city-wide state — driver states, the free drivers, the dispatch backlog — is kept per market, as
online (each market under its own hash tag): a driver event moves its market's drivers (and an ASSIGNED
one settles the order in its market's backlog), a PLACED/CANCELLED order event its market's backlog, and a
query counts the free drivers and the backlog of its own market only. Restaurant state is per restaurant
(ids are platform-wide). An empty market is the default market (``ETA_DEFAULT_MARKET``).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from eta_common import features as F
from eta_common.markets import DEFAULT_MARKET

__all__ = ["FeatureQuery", "HistoryEvent", "OfflineFeatureBuilder"]


@dataclass(frozen=True)
class HistoryEvent:
    """The columns of an archived event the feature logic needs."""

    kind: str  # driver | kitchen | order
    type: str  # enum name, e.g. PLACED, ORDER_READY, LOCATION
    event_ms: int
    ingest_ms: int
    restaurant_id: str | None = None
    driver_id: str | None = None
    order_id: str | None = None
    lat: float | None = None
    lng: float | None = None
    # When the online store could first have seen it (default: ingest time). The consistency check uses
    # the recorded Redis apply time here; lateness is always judged by ingest time.
    visible_ms: int | None = None
    market: str = ""  # the event's market_id ('' = the default market)

    @property
    def seen_ms(self) -> int:
        return self.ingest_ms if self.visible_ms is None else self.visible_ms


@dataclass(frozen=True)
class FeatureQuery:
    """Evaluate a restaurant's features at ``at_ms`` (e.g. an order's placement time)."""

    key: str
    restaurant_id: str
    at_ms: int
    restaurant_lat: float
    restaurant_lng: float
    market: str = ""  # the restaurant's market, whose city-wide features are read ('' = default)


@dataclass
class _Restaurant:
    placed: dict[str, int] = field(default_factory=dict)
    orders: dict[str, dict[str, int]] = field(default_factory=dict)
    kitchen: dict[str, int] = field(default_factory=dict)
    prep: dict[str, int] = field(default_factory=dict)  # "order:prep_ms" -> ready_ms
    pickup: dict[str, int] = field(default_factory=dict)  # "order:wait_ms" -> picked_ms
    status: str | None = None
    status_ms: int = -1


@dataclass
class _Driver:
    status: str = "offline"
    last_ms: int = -1
    lat: float = math.nan
    lng: float = math.nan


# Order events that change the city's dispatch backlog (besides ASSIGNED driver events with an order id).
_DISPATCH_ORDER_EVENTS = frozenset({"PLACED", "CANCELLED"})
# The backlog's sets are trimmed (same cutoffs as the Redis script) only once they outgrow this; trimming
# never changes a value, so doing it lazily keeps the replay linear.
_DISPATCH_TRIM_AT = 1024


@dataclass
class _Dispatch:
    """A market's dispatch backlog (``drv:{C}:waiting`` / ``drv:{C}:settled`` online, C the market)."""

    waiting: dict[str, int] = field(default_factory=dict)  # order_id -> PLACED ms, no outcome seen
    settled: dict[str, int] = field(default_factory=dict)  # order_id -> first ASSIGNED/CANCELLED ms
    seen: bool = False  # any PLACED, CANCELLED or ASSIGNED (with an order id) applied: the group exists
    trim_waiting_at: int = _DISPATCH_TRIM_AT
    trim_settled_at: int = _DISPATCH_TRIM_AT


@dataclass
class _Market:
    """A market's city-wide state: its drivers, the free ones, its dispatch backlog."""

    drivers: dict[str, _Driver] = field(default_factory=dict)
    free: set[str] = field(default_factory=set)
    dispatch: _Dispatch = field(default_factory=_Dispatch)


class OfflineFeatureBuilder:
    """Stateful replay; feed events in ingest order with :meth:`apply`, ask with :meth:`features_at`."""

    def __init__(self, *, allowed_lateness_ms: int = F.DEFAULT_ALLOWED_LATENESS_MS) -> None:
        self.allowed_lateness_ms = allowed_lateness_ms
        self.retention_ms = F.MAX_WINDOW_MS + allowed_lateness_ms
        self.prep_retention_ms = F.MAX_PREP_WINDOW_MS + allowed_lateness_ms
        self.pickup_retention_ms = F.MAX_PICKUP_WINDOW_MS + allowed_lateness_ms
        self.waiting_retention_ms = F.WAITING_ORDER_TTL_MS + allowed_lateness_ms
        self.settled_retention_ms = F.SETTLED_ORDER_RETENTION_MS + allowed_lateness_ms
        self._restaurants: dict[str, _Restaurant] = {}
        self._markets: dict[str, _Market] = {}
        self._empty = _Market()

    def _market(self, market: str) -> _Market:
        key = market or DEFAULT_MARKET
        found = self._markets.get(key)
        if found is None:
            found = self._markets[key] = _Market()
        return found

    @property
    def markets(self) -> list[str]:
        """The markets with city-wide state so far."""
        return sorted(self._markets)

    def apply(self, ev: HistoryEvent) -> None:
        if F.is_late(ev.event_ms, ev.ingest_ms, self.allowed_lateness_ms):
            return
        if ev.kind == "driver":
            if ev.type == "LOCATION" and not F.ping_kept(ev.driver_id or "", ev.event_ms):
                return  # the keep rule: the aggregator neither applies nor archives this ping
            self._apply_driver(ev)
            return
        if ev.type in _DISPATCH_ORDER_EVENTS:
            self._apply_dispatch(ev)  # online: forwarded to its market's city script as well
        if ev.restaurant_id:
            self._apply_restaurant(ev)

    def _apply_driver(self, ev: HistoryEvent) -> None:
        assert ev.driver_id is not None
        m = self._market(ev.market)
        if ev.type == "ASSIGNED" and ev.order_id:
            # settles the order whether or not it is newer than the driver's state (a fact about the order)
            self._settle(m.dispatch, ev.order_id, ev.event_ms)
        driver = m.drivers.setdefault(ev.driver_id, _Driver())
        if ev.event_ms <= driver.last_ms:
            return
        if ev.type in ("ONLINE", "DELIVERED"):
            driver.status = "free"
        elif ev.type == "OFFLINE":
            driver.status = "offline"
        elif ev.type == "ASSIGNED":
            driver.status = "busy"
        driver.last_ms = ev.event_ms
        if driver.status == "free":
            driver.lat, driver.lng = float(ev.lat or 0.0), float(ev.lng or 0.0)
            m.free.add(ev.driver_id)
        else:
            m.free.discard(ev.driver_id)

    def _settle(self, d: _Dispatch, order_id: str, event_ms: int) -> None:
        """An order got its outcome (ASSIGNED or CANCELLED): never waiting again."""
        d.seen = True
        d.settled.setdefault(order_id, event_ms)
        d.waiting.pop(order_id, None)
        if len(d.settled) > d.trim_settled_at:
            cutoff = event_ms - self.settled_retention_ms
            d.settled = {k: v for k, v in d.settled.items() if v >= cutoff}
            d.trim_settled_at = max(_DISPATCH_TRIM_AT, 2 * len(d.settled))

    def _apply_dispatch(self, ev: HistoryEvent) -> None:
        """A PLACED or CANCELLED order event's effect on its market's backlog."""
        oid, ems = ev.order_id, ev.event_ms
        if not oid:
            return
        d = self._market(ev.market).dispatch
        if ev.type == "CANCELLED":
            self._settle(d, oid, ems)
            return
        d.seen = True
        if oid not in d.settled:
            d.waiting.setdefault(oid, ems)
        if len(d.waiting) > d.trim_waiting_at:
            cutoff = ems - self.waiting_retention_ms
            d.waiting = {k: v for k, v in d.waiting.items() if v >= cutoff}
            d.trim_waiting_at = max(_DISPATCH_TRIM_AT, 2 * len(d.waiting))

    def _apply_restaurant(self, ev: HistoryEvent) -> None:
        assert ev.restaurant_id is not None
        r = self._restaurants.setdefault(ev.restaurant_id, _Restaurant())
        oid, ems = ev.order_id or "", ev.event_ms
        if ev.type == "PLACED":
            r.placed.setdefault(oid, ems)
            cutoff = ems - self.retention_ms
            r.placed = {k: v for k, v in r.placed.items() if v >= cutoff} if len(r.placed) > 512 else r.placed
        elif ev.type == "ORDER_ACCEPTED":
            state = r.orders.setdefault(oid, {})
            if "accepted" not in state:
                state["accepted"] = ems
                if "ready" in state:
                    r.prep[f"{oid}:{state['ready'] - ems}"] = state["ready"]
                elif "cancelled" not in state:
                    r.kitchen[oid] = ems
        elif ev.type == "ORDER_READY":
            state = r.orders.setdefault(oid, {})
            if "ready" not in state:
                state["ready"] = ems
                r.kitchen.pop(oid, None)
                if "accepted" in state:
                    r.prep[f"{oid}:{ems - state['accepted']}"] = ems
                if "picked" in state:
                    self._pickup_wait(r, oid, state["picked"], ems)
            if len(r.prep) > 256:  # same trimming as the Redis script; keeps the replay linear
                cutoff = ems - self.prep_retention_ms
                r.prep = {k: v for k, v in r.prep.items() if v >= cutoff}
        elif ev.type == "PICKED_UP":
            state = r.orders.setdefault(oid, {})
            if "picked" not in state:
                state["picked"] = ems
                if "ready" in state:
                    self._pickup_wait(r, oid, ems, state["ready"])
        elif ev.type == "CANCELLED":
            state = r.orders.setdefault(oid, {})
            if "cancelled" not in state:
                state["cancelled"] = ems
                r.kitchen.pop(oid, None)
        elif ev.type in ("OPENED", "CLOSED", "BUSY") and ems > r.status_ms:
            r.status, r.status_ms = ev.type, ems

    def _pickup_wait(self, r: _Restaurant, oid: str, picked_ms: int, ready_ms: int) -> None:
        r.pickup[f"{oid}:{max(0, picked_ms - ready_ms)}"] = picked_ms
        if len(r.pickup) > 256:  # same trimming as the Redis script
            cutoff = picked_ms - self.pickup_retention_ms
            r.pickup = {k: v for k, v in r.pickup.items() if v >= cutoff}

    def features_at(self, query: FeatureQuery) -> dict[str, float]:
        """Online-equivalent feature values (those the aggregator maintains) at ``query.at_ms``."""
        t = query.at_ms
        r = self._restaurants.get(query.restaurant_id, _Restaurant())
        out: dict[str, float] = {}
        for window in F.WINDOW_COUNTS:
            lo = t - window.window_ms
            out[window.name] = float(sum(1 for ms in r.placed.values() if lo < ms <= t))
        out[F.ORDERS_IN_KITCHEN] = float(
            sum(1 for ms in r.kitchen.values() if ms > t - F.KITCHEN_ORDER_TTL_MS)
        )
        for mean in F.WINDOW_MEANS:
            lo = t - mean.window_ms
            preps = [int(member.rsplit(":", 1)[1]) for member, ready in r.prep.items() if lo < ready <= t]
            out[mean.name] = (sum(preps) / len(preps) / 60_000.0) if preps else F.DEFAULTS[mean.name]
        for wait in F.PICKUP_WAIT_MEANS:
            lo = t - wait.window_ms
            waits = [int(member.rsplit(":", 1)[1]) for member, at in r.pickup.items() if lo < at <= t]
            out[wait.name] = (sum(waits) / len(waits) / 60_000.0) if waits else math.nan
        out[F.KITCHEN_BUSY] = 1.0 if r.status == "BUSY" else 0.0
        m = self._markets.get(query.market or DEFAULT_MARKET, self._empty)
        if m.drivers:
            drivers = m.drivers
            out[F.FREE_DRIVERS_NEARBY] = float(
                sum(
                    1
                    for d in m.free
                    if F.haversine_km(
                        query.restaurant_lat, query.restaurant_lng, drivers[d].lat, drivers[d].lng
                    )
                    <= F.SUPPLY_RADIUS_KM
                )
            )
        else:
            out[F.FREE_DRIVERS_NEARBY] = F.DEFAULTS[F.FREE_DRIVERS_NEARBY]
        if m.dispatch.seen:
            cutoff = t - F.WAITING_ORDER_TTL_MS
            out[F.ORDERS_WAITING_FOR_DRIVER] = float(
                sum(1 for ms in m.dispatch.waiting.values() if ms > cutoff)
            )
        else:
            out[F.ORDERS_WAITING_FOR_DRIVER] = F.DEFAULTS[F.ORDERS_WAITING_FOR_DRIVER]
        return out

    def run(
        self, events: Iterable[HistoryEvent], queries: Sequence[FeatureQuery]
    ) -> Iterator[tuple[FeatureQuery, dict[str, float]]]:
        """Replay ``events`` (sorted by ``seen_ms``) and answer each query (any order) at its time."""
        ordered = sorted(queries, key=lambda q: q.at_ms)
        times = [q.at_ms for q in ordered]
        qi = 0
        for ev in events:
            # every query strictly before this event's ingestion sees the state without it
            end = bisect.bisect_left(times, ev.seen_ms, lo=qi)
            while qi < end:
                yield ordered[qi], self.features_at(ordered[qi])
                qi += 1
            self.apply(ev)
        while qi < len(ordered):
            yield ordered[qi], self.features_at(ordered[qi])
            qi += 1
