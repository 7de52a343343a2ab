"""Online = offline on a simulated day: a day of the city simulator flows through Kafka and the aggregator
hour by hour; at each hour the online features of several restaurants are read and logged as served
(table ``predictions``); the consistency check then recomputes every logged value from the PostgreSQL
history with the shared feature definitions and must find zero mismatches."""

from __future__ import annotations

import asyncio
import random
import subprocess
import sys
from collections.abc import Iterator

import asyncpg
import pytest

from aggregator.consistency import ONLINE_FEATURES
from devstack.stack import LocalStack
from devstack.synthetic import Sent, produce, unique_count
from eta_common import features as F
from eta_common.config import KafkaSettings
from eta_common.online_store import OnlineStore
from eta_common.timeutil import ms_from_timestamp, now_ms
from simulator import CityConfig, CitySimulation
from tests.integration.conftest import own_stack
from tests.integration.helpers import check_day, log_served
from tests.integration.test_feature_guarantees import AGGREGATOR_ENV, wait_archived

pytestmark = pytest.mark.integration
HOUR = 3_600_000


@pytest.fixture(scope="module")
def day_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    with own_stack(tmp_path_factory, "day", services=("aggregator",), extra_env=AGGREGATOR_ENV) as stack:
        yield stack


def _simulated_day(end_ms: int) -> tuple[list[Sent], dict[str, tuple[float, float]]]:
    config = CityConfig(seed=5, restaurants=10, drivers=30)
    sim = CitySimulation(config, start_ms=end_ms - 24 * HOUR)
    events = list(sim.run_until(end_ms))
    rng = random.Random(5)
    sent = []
    for event in events:
        kind = event.WhichOneof("payload")
        assert kind is not None
        event_ms = ms_from_timestamp(getattr(event, kind).event_time)
        # prompt arrival for most, some out of order, a few beyond the allowed lateness
        delay = rng.choice([rng.randrange(20, 2_000)] * 30 + [rng.randrange(5_000, 120_000), 6 * 60_000])
        sent.append(Sent(event, event_ms + delay))
    sent.sort(key=lambda s: s.ingest_ms)
    locations = {r.id: (r.location.lat, r.location.lng) for r in sim.city.restaurants}
    return sent, locations


async def test_zero_mismatches_on_a_simulated_day(day_stack: LocalStack) -> None:
    end = now_ms() - 10 * 60_000
    stream, locations = _simulated_day(end)
    assert len(stream) > 5_000
    settings = KafkaSettings(bootstrap_servers=day_stack.kafka)
    store = OnlineStore.from_url(day_stack.redis_url)
    conn = await asyncpg.connect(day_stack.database_url)
    rng = random.Random(11)
    served = 0
    try:
        produced = 0
        for checkpoint in range(end - 23 * HOUR, end + 1, HOUR):
            chunk = []
            while produced < len(stream) and stream[produced].ingest_ms <= checkpoint:
                chunk.append(stream[produced])
                produced += 1
            await produce(settings, chunk)
            await wait_archived(day_stack, "", unique_count(stream[:produced]))  # quiescent: all applied
            for rid in rng.sample(sorted(locations), 4):
                reading = await store.read_restaurant(rid, now_ms=checkpoint, location=locations[rid])
                values = {name: reading.readings[name].value for name in ONLINE_FEATURES}
                await log_served(conn, checkpoint, f"day-{checkpoint}-{rid}", rid, values)
                served += 1
        report = await check_day(conn, end)
    finally:
        await conn.close()
        await store.close()
    assert report.predictions == served == 96
    for name in ONLINE_FEATURES:
        assert report.per_feature[name].compared == served, name
    assert report.mismatches == 0, report.render()
    busy = [s for s in report.per_feature.values() if s.compared]
    assert len(busy) == len(F.DEFAULTS)

    # the same check as a user runs it against a live system
    result = await asyncio.to_thread(
        subprocess.run,
        [
            sys.executable,
            "-m",
            "aggregator",
            "check-consistency",
            "--since-minutes",
            "1600",
            "--visibility",
            "ingest",
            "--strict",
        ],
        env=day_stack.env(),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "predictions checked: 96" in result.stdout
