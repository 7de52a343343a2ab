"""Online = offline on a multi-market simulated day: three markets of different sizes at once — Berlin and
the default market on the same streets (the worst case for one market's drivers leaking into another's
supply), Munich elsewhere — flow through Kafka and the aggregator hour by hour; at each hour the online
features of restaurants of every market are read in their market and logged as served (with the market, and
for default-market restaurants also without one, as a client that predates markets logs); the consistency
check recomputes every logged value from the PostgreSQL history, per market, and must find zero
mismatches. The city-wide values must differ between the markets sharing streets (else the check proves
nothing about markets)."""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Iterator

import asyncpg
import pytest

from aggregator.consistency import ONLINE_FEATURES
from devstack.stack import LocalStack
from devstack.synthetic import Sent, produce, unique_count
from eta_common import features as F
from eta_common.config import KafkaSettings
from eta_common.markets import DEFAULT_MARKET
from eta_common.online_store import OnlineStore
from eta_common.timeutil import ms_from_timestamp, now_ms
from simulator.city import CityConfig
from simulator.markets import Platform, market_configs, parse_markets
from tests.integration.conftest import own_stack
from tests.integration.helpers import check_day, log_served
from tests.integration.test_feature_guarantees import AGGREGATOR_ENV, wait_archived

pytestmark = pytest.mark.integration
HOUR = 3_600_000


@pytest.fixture(scope="module")
def markets_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    with own_stack(tmp_path_factory, "markets", services=("aggregator",), extra_env=AGGREGATOR_ENV) as stack:
        yield stack


def _configs() -> list[CityConfig]:
    base = CityConfig(seed=9)
    berlin, munich = market_configs(base, parse_markets("berlin:6:18,munich:3:10"))
    # the default market (no market_id on its events): a small city on Berlin's streets
    default = CityConfig(seed=3, restaurants=4, drivers=12, customers=800)
    return [berlin, munich, default]


def _simulated_day(end_ms: int) -> tuple[list[Sent], dict[str, tuple[str, tuple[float, float]]]]:
    platform = Platform(_configs(), start_ms=end_ms - 24 * HOUR)
    rng = random.Random(7)
    sent = []
    for event in platform.run_until(end_ms):
        kind = event.WhichOneof("payload")
        assert kind is not None
        event_ms = ms_from_timestamp(getattr(event, kind).event_time)
        delay = rng.choice([rng.randrange(20, 2_000)] * 30 + [rng.randrange(5_000, 120_000), 6 * 60_000])
        sent.append(Sent(event, event_ms + delay))
    sent.sort(key=lambda s: s.ingest_ms)
    restaurants = {
        r.id: (city.config.market, (r.location.lat, r.location.lng))
        for city in platform.cities
        for r in city.city.restaurants
    }
    return sent, restaurants


async def test_zero_mismatches_on_a_multi_market_day(markets_stack: LocalStack) -> None:
    end = now_ms() - 10 * 60_000
    stream, restaurants = _simulated_day(end)
    markets = {m for m, _ in restaurants.values()}
    assert markets == {"berlin", "munich", ""}
    settings = KafkaSettings(bootstrap_servers=markets_stack.kafka)
    store = OnlineStore.from_url(markets_stack.redis_url)
    conn = await asyncpg.connect(markets_stack.database_url)
    rng = random.Random(13)
    served = 0
    city_wide: dict[str, set[tuple[float, float]]] = defaultdict(set)
    try:
        produced = 0
        for checkpoint in range(end - 23 * HOUR, end + 1, HOUR):
            chunk = []
            while produced < len(stream) and stream[produced].ingest_ms <= checkpoint:
                chunk.append(stream[produced])
                produced += 1
            await produce(settings, chunk)
            await wait_archived(markets_stack, "", unique_count(stream[:produced]))
            picks = [rng.choice(sorted(r for r, (m, _) in restaurants.items() if m == market)) for market in
                     ("berlin", "munich", "")]  # fmt: skip
            for rid in picks:
                market, location = restaurants[rid]
                # a default-market restaurant is read twice: with the market named, and old-shaped
                logged_markets = [market or DEFAULT_MARKET, None] if not market else [market]
                for logged in logged_markets:
                    reading = await store.read_restaurant(
                        rid, now_ms=checkpoint, location=location, market=market
                    )
                    values = {name: reading.readings[name].value for name in ONLINE_FEATURES}
                    city_wide[market].add(
                        (values[F.FREE_DRIVERS_NEARBY], values[F.ORDERS_WAITING_FOR_DRIVER])
                    )
                    await log_served(
                        conn, checkpoint, f"mkt-{checkpoint}-{rid}-{logged}", rid, values, logged
                    )
                    served += 1
        archived = await conn.fetch("SELECT coalesce(market_id, '') AS m, count(*) FROM events GROUP BY 1")
        report = await check_day(conn, end)
    finally:
        await conn.close()
        await store.close()
    assert {r["m"] for r in archived} == {"berlin", "munich", ""}  # the archive keeps each event's market
    assert report.predictions == served == 24 * 4
    for name in ONLINE_FEATURES:
        assert report.per_feature[name].compared == served, name
    assert report.mismatches == 0, report.render()
    # the markets on the same streets saw different city-wide values: per-market state was exercised
    assert city_wide["berlin"] != city_wide[""]
    assert len(city_wide["munich"]) > 1
