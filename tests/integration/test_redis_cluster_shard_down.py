"""One primary of a Redis Cluster killed under the prediction service (issue #14, item 3), on this
module's own 3-primary cluster and PostgreSQL, whatever ``--redis-mode`` says.

Predictions whose keys all live on the surviving shards are answered undegraded, with the same features
as before the kill; the rest are answered from the feature defaults, flagged ``ONLINE_STORE_UNAVAILABLE``
— never an error, never waiting on the dead shard — and the service's circuit breaker stays closed (a
shard down is not Redis down). Through the cluster's failure detection (node timeout 2 s) and after it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import pytest

from devstack.infra import ChildProcess, RedisCluster, start_postgres, start_redis_cluster
from devstack.stack import LocalStack, ServicePorts
from eta.v1 import eta_pb2, eta_pb2_grpc, events_pb2
from eta_common import features as F
from eta_common.db.migrate import apply_migrations
from eta_common.online_store import DriverUpdate, OnlineStore, RestaurantUpdate, driver_keys
from eta_common.timeutil import now_ms
from prediction.config import ONLINE_FEATURES
from prediction.tests.support import register, synthetic_bundle
from tests.integration.conftest import poll_until
from tests.integration.helpers import metric_total

pytestmark = pytest.mark.integration
Degradation = eta_pb2.Degradation
Quality = eta_pb2.PredictEtaResponse.FeatureQuality
WHERE = (52.52, 13.405)
RESTAURANTS = [f"shard-r{i}" for i in range(24)]


@dataclass
class ShardStack:
    cluster: RedisCluster
    postgres: ChildProcess
    stack: LocalStack
    channel: grpc.aio.Channel

    @property
    def eta(self) -> eta_pb2_grpc.EtaServiceStub:
        return eta_pb2_grpc.EtaServiceStub(self.channel)

    def metric(self, name: str, **labels: str) -> float:
        return metric_total(self.stack.ports.metrics["prediction"], name, **labels)


def request(restaurant_id: str) -> eta_pb2.PredictEtaRequest:
    return eta_pb2.PredictEtaRequest(
        restaurant_id=restaurant_id,
        restaurant_location=events_pb2.GeoPoint(lat=WHERE[0], lng=WHERE[1]),
        customer_location=events_pb2.GeoPoint(lat=WHERE[0] + 0.02, lng=WHERE[1] + 0.02),
    )


async def write_features(url: str) -> None:
    store = OnlineStore.from_url(url)
    now = now_ms()
    updates: list[RestaurantUpdate | DriverUpdate] = []
    for k, rid in enumerate(RESTAURANTS):
        updates += [
            RestaurantUpdate(rid, "OPENED", "", now - 3600_000, *WHERE),
            *[RestaurantUpdate(rid, "PLACED", f"{rid}-o{j}", now - 60_000, *WHERE) for j in range(k % 4 + 1)],
            RestaurantUpdate(rid, "ORDER_ACCEPTED", f"{rid}-o0", now - 50_000),
        ]
    updates.append(DriverUpdate("shard-drv", "ONLINE", now - 1_000, *WHERE))
    try:
        await store.apply(updates, now_ms=now)
    finally:
        await store.close()


@pytest.fixture(scope="module")
async def shards(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[ShardStack]:
    workdir = tmp_path_factory.mktemp("redis-shard-down")
    cluster = await asyncio.to_thread(start_redis_cluster, workdir / "redis", workdir / "logs")
    postgres = await asyncio.to_thread(start_postgres, workdir / "pgdata", workdir / "logs")
    stack = LocalStack(workdir, ports=ServicePorts.free(), use_env_endpoints=False)
    stack.redis_url, stack.database_url = cluster.url, postgres.url
    channel: grpc.aio.Channel | None = None
    try:
        await apply_migrations(postgres.url)
        await register(postgres.url, "v1", await asyncio.to_thread(synthetic_bundle, rows=1500, rounds=20))
        await write_features(cluster.url)
        await asyncio.to_thread(
            stack.start_service,
            "prediction",
            extra_env={
                "OTEL_TRACES_SAMPLER": "always_off",
                "PREDICTION_MODEL_REFRESH_SECONDS": "0.3",
                "PREDICTION_REDIS_FAILURES_TO_OPEN": "3",
                "PREDICTION_REDIS_BACKOFF_SECONDS": "1",
                "SHUTDOWN_GRACE_SECONDS": "1",
            },
        )
        channel = grpc.aio.insecure_channel(stack.target("prediction"))
        yield ShardStack(cluster, postgres, stack, channel)
    finally:
        if channel is not None:
            await channel.close()
        stack.stop()
        postgres.stop()
        cluster.stop()


def victim_and_keys(cluster: RedisCluster) -> tuple[ChildProcess, list[str], list[str]]:
    """A primary that serves none of the city's keys (which every prediction reads), and the restaurants
    whose keys it serves and those it does not."""
    city_nodes = {cluster.node_of(key).port for key in driver_keys().values()}
    candidates = [node for node in cluster.nodes if node.port not in city_nodes]
    assert candidates, "every primary holds a city key"
    owner = {rid: cluster.node_of(f"rst:{{{rid}}}:row").port for rid in RESTAURANTS}
    victim = max(candidates, key=lambda node: sum(port == node.port for port in owner.values()))
    on_victim = [rid for rid in RESTAURANTS if owner[rid] == victim.port]
    elsewhere = [rid for rid in RESTAURANTS if owner[rid] != victim.port]
    return victim, on_victim, elsewhere


def values(reply: eta_pb2.PredictEtaResponse) -> list[tuple[str, str, bool]]:
    return [(f.name, repr(f.value), f.present) for f in reply.features]  # repr: NaN equals NaN


async def test_one_primary_killed_degrades_only_the_predictions_on_its_shard(shards: ShardStack) -> None:
    victim, on_victim, elsewhere = victim_and_keys(shards.cluster)
    assert on_victim, "no restaurant on the victim shard"
    assert elsewhere, "no restaurant elsewhere"
    before = {}
    for rid in RESTAURANTS:
        reply = await poll_until(
            lambda rid=rid: shards.eta.PredictEta(request(rid), timeout=5),  # type: ignore[misc]
            lambda r: r.model_version == "v1",
            timeout=15,
        )
        assert list(reply.degradations) == []
        assert F.NUM_ORDERS_10.name not in reply.missing_features  # read from the store
        before[rid] = reply

    victim.kill()
    # through the cluster's failure detection (node timeout 2 s: the others mark it FAIL) and after it
    deadline = time.monotonic() + 5
    rounds = 0
    while time.monotonic() < deadline or rounds < 2:
        rounds += 1
        for rid in RESTAURANTS:
            started = time.perf_counter()
            reply = await shards.eta.PredictEta(request(rid), timeout=5)  # never an error
            assert time.perf_counter() - started < 1.0
            assert reply.model_version == "v1"
            if rid in on_victim:
                assert list(reply.degradations) == [Degradation.ONLINE_STORE_UNAVAILABLE], rid
                assert set(reply.missing_features) == set(ONLINE_FEATURES)
            else:
                assert list(reply.degradations) == [], rid
                assert reply.feature_quality == before[rid].feature_quality
                assert values(reply) == values(before[rid])
        # a batch on the surviving shards is answered undegraded; one that needs the dead shard degrades
        batch = await shards.eta.PredictEtaBatch(
            eta_pb2.PredictEtaBatchRequest(
                customer_location=events_pb2.GeoPoint(lat=WHERE[0] + 0.02, lng=WHERE[1] + 0.02),
                restaurants=[
                    eta_pb2.RestaurantLocation(
                        restaurant_id=rid, location=events_pb2.GeoPoint(lat=WHERE[0], lng=WHERE[1])
                    )
                    for rid in elsewhere
                ],
            ),
            timeout=5,
        )
        assert list(batch.degradations) == []
        assert len(batch.etas) == len(elsewhere)
    assert shards.metric("eta_prediction_fallbacks_total", reason="redis_shard_unavailable") >= len(on_victim)
    assert shards.metric("eta_prediction_redis_circuit_open") == 0  # a shard down is not Redis down
