"""No nonsense ETAs (issue 15): the first model of a starved city — 50 restaurants and 60 drivers, whose
dispatch backlog grows all day — is registered but not promoted, the reason is stored with the run, and
the prediction service keeps answering with its heuristic instead of ETAs of many hours. Forcing still
works."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import grpc
import pytest

from devstack.infra import ChildProcess
from devstack.stack import LocalStack, ServicePorts
from eta.v1 import eta_pb2, eta_pb2_grpc, events_pb2
from eta_common.db.registry import load_promoted
from simulator.city import CityConfig, build_city
from simulator.seed import seed_history
from tests.integration.conftest import poll_until
from tests.integration.helpers import redis_and_postgres
from trainer.run import train_and_register

pytestmark = pytest.mark.integration

END_MS = 1_741_564_800_000  # 2025-03-10 00:00 UTC
DAYS = 3.0
STARVED = CityConfig(restaurants=50, drivers=60)


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, ChildProcess, ChildProcess]]:
    with redis_and_postgres(tmp_path_factory, "promotion-gate") as servers:
        yield servers


def _request() -> eta_pb2.PredictEtaRequest:
    city = build_city(STARVED)
    r, c = city.restaurants[0], city.customers[0]
    return eta_pb2.PredictEtaRequest(
        restaurant_id=r.id,
        restaurant_location=events_pb2.GeoPoint(lat=r.location.lat, lng=r.location.lng),
        customer_location=events_pb2.GeoPoint(lat=c.location.lat, lng=c.location.lng),
    )


async def test_a_starved_citys_first_model_is_not_promoted_and_the_heuristic_answers(
    servers: tuple[Path, ChildProcess, ChildProcess],
) -> None:
    workdir, redis, postgres = servers
    stats = await seed_history(postgres.url, STARVED, days=DAYS, end_ms=END_MS, progress=False)
    assert stats.orders_placed - stats.orders_delivered > 500  # orders pile up: the city is starved

    summary = await train_and_register(postgres.url, history_days=DAYS + 1, as_of_ms=END_MS, rounds=200)
    metrics = summary["metrics"]
    assert summary["promoted"] is False
    reason = summary["promotion_reason"]
    assert reason.startswith("no model promoted yet, and this one fails the promotion gate: ")
    assert metrics["gate"]["passed"] is False
    # Here the model even beats baselines that are lost by many hours, but its range is far off (measured:
    # MAE 127.6 min against 916 / 911, coverage 100 %): either test alone can refuse a model.
    assert "p10–p90 coverage" in reason
    assert metrics["model"]["mae"] > 60  # hours off: exactly what must not be served
    conn = await asyncpg.connect(postgres.url)
    try:
        assert await load_promoted(conn) is None
        run = await conn.fetchrow(
            "SELECT promoted, message FROM training_runs WHERE id = $1", summary["run_id"]
        )
        assert run["promoted"] is False
        assert run["message"] == reason
        assert await conn.fetchval("SELECT count(*) FROM models") == 1  # registered all the same
    finally:
        await conn.close()

    stack = LocalStack(workdir / "service", ports=ServicePorts.free(), use_env_endpoints=False)
    stack.redis_url, stack.database_url = redis.url, postgres.url
    await asyncio.to_thread(
        stack.start_service,
        "prediction",
        extra_env={"PREDICTION_MODEL_REFRESH_SECONDS": "0.3", "OTEL_TRACES_SAMPLER": "always_off"},
    )
    try:
        async with grpc.aio.insecure_channel(stack.target("prediction")) as channel:
            eta = eta_pb2_grpc.EtaServiceStub(channel)
            reply = await eta.PredictEta(_request(), timeout=5)
            assert reply.model_version == "heuristic-v0"
            assert 5 < reply.eta_minutes < 120

            forced = await train_and_register(
                postgres.url, history_days=DAYS + 1, as_of_ms=END_MS, rounds=20, force_promote=True
            )
            assert forced["promoted"] is True
            assert forced["promotion_reason"].startswith(
                "forced; no model promoted yet; fails the promotion gate"
            )
            await poll_until(
                lambda: eta.PredictEta(_request(), timeout=5),
                lambda r: r.model_version == forced["version"],
                timeout=20,
            )
    finally:
        await asyncio.to_thread(stack.stop)
