"""Several markets at once: each its own restaurants, drivers, customers and area, market_id on every
event and on its checkout ETA request, streams merged in event-time order; without markets the city is the
single default-market city it always was (no market_id on the wire)."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

from eta.v1 import eta_pb2
from eta_common.event_facts import event_facts
from eta_common.features import haversine_km
from simulator.__main__ import build_parser, city_configs
from simulator.checkout import CheckoutEta, is_placed
from simulator.city import CityConfig
from simulator.engine import CitySimulation
from simulator.markets import MarketSpec, Platform, market_configs, parse_markets
from simulator.messages import event_ms
from simulator.seed import write_history
from simulator.tests.helpers import DAY_MS, MONDAY
from simulator.tests.test_seed import FakeArchive

NOON = MONDAY + 11 * 3_600_000


def test_parse_markets() -> None:
    assert parse_markets("berlin:20, munich:8:30") == [MarketSpec("berlin", 20), MarketSpec("munich", 8, 30)]
    for bad in ("", "berlin", "berlin:0", "berlin:x", "ber:lin:1:2", "a{b}:3", "b:2,b:3", "b:2:0"):
        with pytest.raises(ValueError, match=r"."):
            parse_markets(bad)


def test_each_market_has_its_own_size_area_and_seed() -> None:
    configs = market_configs(CityConfig(), parse_markets("berlin:20,munich:8,atlantis:4:7"))
    assert [c.market for c in configs] == ["berlin", "munich", "atlantis"]
    assert [c.restaurants for c in configs] == [20, 8, 4]
    assert [c.fleet_size for c in configs] == [60, 24, 7]
    assert [c.seed for c in configs] == [42, 43, 44]
    assert configs[0].radius_km == 5.0
    assert configs[1].radius_km < 5.0
    centres = [(c.center_lat, c.center_lng) for c in configs]
    for i, a in enumerate(centres):
        for b in centres[i + 1 :]:
            assert haversine_km(*a, *b) > 50  # areas far apart


def test_platform_runs_markets_at_once_with_their_market_on_every_event() -> None:
    configs = market_configs(CityConfig(), parse_markets("berlin:6,munich:3"))
    platform = Platform(configs, start_ms=MONDAY)
    events = list(platform.run_until(MONDAY + DAY_MS))
    times = [event_ms(e) for e in events]
    assert times == sorted(times)  # merged in event-time order
    by_market: Counter[str] = Counter()
    restaurants: dict[str, set[str]] = {"berlin": set(), "munich": set()}
    drivers: dict[str, set[str]] = {"berlin": set(), "munich": set()}
    for event in events:
        facts = event_facts(event)
        assert facts is not None
        assert facts.market in ("berlin", "munich")
        by_market[facts.market] += 1
        for entity in (facts.restaurant_id, facts.driver_id, facts.customer_id):
            if entity:
                assert entity.startswith(f"{facts.market}-")  # ids unique across markets
        if facts.restaurant_id:
            restaurants[facts.market].add(facts.restaurant_id)
        if facts.driver_id and facts.kind == "driver":
            drivers[facts.market].add(facts.driver_id)
    assert by_market["berlin"] > 0
    assert by_market["munich"] > 0
    assert len(drivers["berlin"]) > len(drivers["munich"]) > 0  # different sizes
    assert len(restaurants["berlin"]) == 6
    assert len(restaurants["munich"]) == 3
    counters = platform.counters
    assert counters.events == len(events)
    assert counters.orders_placed == sum(c.counters.orders_placed for c in platform.cities) > 0
    again = list(Platform(configs, start_ms=MONDAY).run_until(MONDAY + DAY_MS))
    assert again == events  # deterministic


def test_without_markets_the_city_is_unchanged() -> None:
    args = build_parser().parse_args(["seed"])
    (config,) = city_configs(args)
    assert config.market == ""
    direct = list(CitySimulation(config, start_ms=NOON).run_until(NOON + 3_600_000))
    via_platform = list(Platform([config], start_ms=NOON).run_until(NOON + 3_600_000))
    assert via_platform == direct
    for event in direct:
        kind = event.WhichOneof("payload")
        assert kind is not None
        assert getattr(event, kind).market_id == ""  # the old shape: no market_id on the wire
        facts = event_facts(event)
        assert facts is not None
        assert facts.restaurant_id is None or facts.restaurant_id.startswith("rst-")


def test_cli_markets_option() -> None:
    args = build_parser().parse_args(["live", "--markets", "berlin:5,munich:2:9", "--seed", "7"])
    configs = city_configs(args)
    assert [(c.market, c.restaurants, c.fleet_size, c.seed) for c in configs] == [
        ("berlin", 5, 15, 7),
        ("munich", 2, 9, 8),
    ]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["seed", "--markets", "no:colons:here:x"])


async def test_seeded_history_of_two_markets() -> None:
    archive = FakeArchive()
    configs = market_configs(CityConfig(), parse_markets("berlin:4,munich:2"))
    stats = await write_history(archive, configs, days=0.5, end_ms=MONDAY + DAY_MS // 2 + 12 * 3_600_000)
    items = [i for b in archive.batches for i in b]
    assert stats.events_generated == len(items) > 0
    markets = Counter(f.market for f in (event_facts(i.event) for i in items) if f is not None)
    assert set(markets) == {"berlin", "munich"}
    delivered = {o.restaurant_id.split("-", 1)[0] for o in stats.outcomes}
    assert delivered == {"berlin", "munich"}


class _Stub:
    def __init__(self) -> None:
        self.requests: list[eta_pb2.PredictEtaRequest] = []

    async def PredictEta(self, request: eta_pb2.PredictEtaRequest, **_: Any) -> eta_pb2.PredictEtaResponse:
        self.requests.append(request)
        return eta_pb2.PredictEtaResponse(model_version="m")


async def test_checkout_asks_in_the_order_market() -> None:
    configs = market_configs(CityConfig(), parse_markets("berlin:4,munich:2"))
    platform = Platform(configs, start_ms=NOON)
    stub = _Stub()
    checkout = CheckoutEta(stub)  # type: ignore[arg-type]
    for event in platform.run_until(NOON + 2 * 3_600_000):
        if is_placed(event):
            await checkout.ask(event)
    assert {r.market_id for r in stub.requests} == {"berlin", "munich"}
    assert all(r.restaurant_id.startswith(f"{r.market_id}-") for r in stub.requests)
