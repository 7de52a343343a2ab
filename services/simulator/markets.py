"""Several markets (cities) of different sizes at once.

``--markets berlin:20,munich:8:30`` is two cities: Berlin with 20 restaurants (and its default fleet, 60
drivers) and Munich with 8 restaurants and 30 drivers. Each market is a
:class:`~simulator.engine.CitySimulation` of its own: its own restaurants, drivers and customers (ids
prefixed with the market, ``berlin-rst-000``), its own area (a known city's centre, else a point 100 km
further south per market; the radius grows with the square root of the restaurant count, 5 km for 20),
its own random seed (the base seed + the market's index), and ``market_id`` on every event and on its
checkout predictions. :class:`Platform` runs them on one clock and merges their event streams in
event-time order, with the interface of one ``CitySimulation`` (what seed and live mode use).

Without ``--markets`` the simulator is one city that names no market (its events carry no market_id: the
default market), exactly as before markets existed.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace

from eta.v1 import events_pb2
from eta_common.markets import MARKET_ID_PATTERN
from simulator.city import CityConfig
from simulator.engine import CitySimulation, OrderOutcome, SimCounters
from simulator.messages import event_ms

__all__ = ["KNOWN_CENTRES", "MarketSpec", "Platform", "market_configs", "parse_markets"]

# Centres of a few cities (lat, lng); any other market name gets a centre of its own (see market_configs).
KNOWN_CENTRES: dict[str, tuple[float, float]] = {
    "berlin": (52.52, 13.405),
    "hamburg": (53.551, 9.994),
    "munich": (48.137, 11.575),
    "cologne": (50.938, 6.96),
    "frankfurt": (50.11, 8.682),
    "stuttgart": (48.776, 9.183),
    "leipzig": (51.34, 12.375),
    "vienna": (48.208, 16.373),
    "zurich": (47.377, 8.541),
    "amsterdam": (52.373, 4.892),
}
REFERENCE_RESTAURANTS = 20  # the default city: 20 restaurants in a 5 km disc, 4000 customers
CUSTOMERS_PER_RESTAURANT = 200


@dataclass(frozen=True)
class MarketSpec:
    market: str
    restaurants: int
    drivers: int | None = None  # None: the default fleet for the restaurants


def parse_markets(text: str) -> list[MarketSpec]:
    """``name:restaurants[:drivers],…`` → specs. Raises ValueError with the reason."""
    specs: list[MarketSpec] = []
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            continue
        parts = item.split(":")
        if len(parts) not in (2, 3):
            raise ValueError(f"{item!r}: expected name:restaurants[:drivers]")
        name = parts[0]
        if MARKET_ID_PATTERN.fullmatch(name) is None:
            raise ValueError(f"{name!r}: a market id is 1..64 characters of [A-Za-z0-9_.-]")
        try:
            restaurants = int(parts[1])
            drivers = int(parts[2]) if len(parts) == 3 else None
        except ValueError as exc:
            raise ValueError(f"{item!r}: restaurants and drivers are whole numbers") from exc
        if restaurants < 1 or (drivers is not None and drivers < 1):
            raise ValueError(f"{item!r}: restaurants and drivers must be >= 1")
        if any(s.market == name for s in specs):
            raise ValueError(f"{name!r}: market given twice")
        specs.append(MarketSpec(name, restaurants, drivers))
    if not specs:
        raise ValueError("no market given")
    return specs


def market_configs(base: CityConfig, specs: Sequence[MarketSpec]) -> list[CityConfig]:
    """One city configuration per market: the base's parameters, the market's size, area and seed."""
    configs = []
    for i, spec in enumerate(specs):
        centre = KNOWN_CENTRES.get(spec.market.lower())
        if centre is None:  # 100 km south of the base centre per market index: areas never overlap
            centre = (base.center_lat - 0.9 * (i + 1), base.center_lng)
        scale = math.sqrt(spec.restaurants / REFERENCE_RESTAURANTS)
        radius = round(min(15.0, max(2.0, base.radius_km * scale)), 3)
        configs.append(
            replace(
                base,
                market=spec.market,
                seed=base.seed + i,
                restaurants=spec.restaurants,
                drivers=spec.drivers,
                customers=max(100, CUSTOMERS_PER_RESTAURANT * spec.restaurants),
                center_lat=centre[0],
                center_lng=centre[1],
                radius_km=radius,
                customer_radius_km=round(radius + 0.5, 3),
            )
        )
    return configs


class Platform:
    """Several cities on one clock: the interface of :class:`CitySimulation` that seed and live mode use,
    with the event streams merged in event-time order (ties: market order) and the counters summed."""

    def __init__(
        self,
        configs: Sequence[CityConfig],
        *,
        start_ms: int,
        time_origin_ms: int | None = None,
        time_scale: float = 1.0,
        on_outcome: Callable[[OrderOutcome], None] | None = None,
    ) -> None:
        if not configs:
            raise ValueError("at least one city")
        markets = [c.market for c in configs]
        if len(set(markets)) != len(markets):
            raise ValueError("every city needs its own market")
        self.outcomes: list[OrderOutcome] = []
        self._on_outcome = on_outcome

        def collect(outcome: OrderOutcome) -> None:
            self.outcomes.append(outcome)
            if on_outcome is not None:
                on_outcome(outcome)

        self.cities = [
            CitySimulation(
                config,
                start_ms=start_ms,
                time_origin_ms=time_origin_ms,
                time_scale=time_scale,
                on_outcome=collect,
            )
            for config in configs
        ]
        first = self.cities[0]
        self.config = first.config
        self.configs = list(configs)
        self.start_ms = first.start_ms
        self.time_origin_ms = first.time_origin_ms
        self.time_scale = time_scale

    @property
    def now_ms(self) -> int:
        return max(c.now_ms for c in self.cities)

    def event_time_ms(self, sim_ms: int) -> int:
        return self.cities[0].event_time_ms(sim_ms)

    def sim_time_ms(self, event_ms_: int) -> int:
        return self.cities[0].sim_time_ms(event_ms_)

    def next_happening_ms(self) -> int | None:
        times = [t for t in (c.next_happening_ms() for c in self.cities) if t is not None]
        return min(times) if times else None

    @property
    def orders_waiting_for_driver(self) -> int:
        return sum(c.orders_waiting_for_driver for c in self.cities)

    @property
    def counters(self) -> SimCounters:
        total = SimCounters()
        for c in self.cities:
            k = c.counters
            total.events += k.events
            total.orders_placed += k.orders_placed
            total.orders_delivered += k.orders_delivered
            total.orders_cancelled += k.orders_cancelled
            total.orders_waited_for_driver += k.orders_waited_for_driver
        return total

    @property
    def restaurants(self) -> int:
        return sum(c.config.restaurants for c in self.cities)

    @property
    def fleet_size(self) -> int:
        return sum(c.config.fleet_size for c in self.cities)

    def run_until(self, end_ms: int) -> Iterator[events_pb2.Event]:
        """Every city's happenings up to ``end_ms``, merged by event time (each stream is ordered)."""
        if len(self.cities) == 1:
            return self.cities[0].run_until(end_ms)
        return heapq.merge(*(c.run_until(end_ms) for c in self.cities), key=event_ms)
