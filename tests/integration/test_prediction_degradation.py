"""Degradation, not failure (issue #6), on this module's own Redis and PostgreSQL so the shared stack is
never disturbed: Redis killed and restarted, Redis hung (black-holed), overload, PostgreSQL unreachable,
and no model at all. The service keeps answering (flagged) whenever an answer is possible, never with an
internal error, sheds load with RESOURCE_EXHAUSTED, and is NOT_SERVING only when it cannot answer.

With ``--redis-mode=cluster`` the Redis is a Redis Cluster of 3 primaries, killed or frozen as a whole
(one shard down: ``test_redis_cluster_shard_down.py``)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from devstack.infra import ChildProcess, RedisServer, free_port, start_postgres
from devstack.stack import LocalStack, ServicePorts
from eta.v1 import eta_pb2, eta_pb2_grpc, events_pb2
from eta_common.db.migrate import apply_migrations
from eta_common.online_store import DriverUpdate, OnlineStore, RestaurantUpdate
from eta_common.timeutil import now_ms
from prediction.config import ONLINE_FEATURES
from prediction.tests.support import RedisProxy, register, seed_customer, synthetic_bundle
from tests.integration.conftest import poll_until
from tests.integration.helpers import FrozenRedis, metric_total, redis_cluster_mode, start_test_redis

pytestmark = pytest.mark.integration
Quality = eta_pb2.PredictEtaResponse.FeatureQuality
Degradation = eta_pb2.Degradation
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
WHERE = (52.52, 13.405)
REQUEST = eta_pb2.PredictEtaRequest(
    restaurant_id="deg-1",
    restaurant_location=events_pb2.GeoPoint(lat=WHERE[0], lng=WHERE[1]),
    customer_location=events_pb2.GeoPoint(lat=WHERE[0] + 0.02, lng=WHERE[1] + 0.02),
    customer_id="deg-customer",
)


@dataclass
class Infra:
    workdir: Path
    redis: RedisServer
    postgres: ChildProcess
    proxy: RedisProxy | FrozenRedis
    blob: bytes

    async def write_features(self) -> None:
        store = OnlineStore.from_url(self.redis.url)
        now = now_ms()
        try:
            await store.apply(
                [
                    RestaurantUpdate("deg-1", "PLACED", "o1", now - 60_000, *WHERE),
                    RestaurantUpdate("deg-1", "ORDER_ACCEPTED", "o1", now - 50_000),
                    RestaurantUpdate("deg-1", "PLACED", "o0", now - 30 * 60_000 + 5_000, *WHERE),
                    RestaurantUpdate("deg-1", "ORDER_ACCEPTED", "o0", now - 29 * 60_000),
                    RestaurantUpdate("deg-1", "ORDER_READY", "o0", now - 15 * 60_000),
                    RestaurantUpdate("deg-1", "PICKED_UP", "o0", now - 10 * 60_000),
                    RestaurantUpdate("deg-1", "OPENED", "", now - 3600_000),
                    DriverUpdate("deg-drv", "ONLINE", now - 1_000, *WHERE),
                ],
                now_ms=now,
            )
        finally:
            await store.close()
        await seed_customer(self.postgres.url, self.redis.url, REQUEST.customer_id, now)


@dataclass
class Service:
    stack: LocalStack
    channel: grpc.aio.Channel

    @property
    def eta(self) -> eta_pb2_grpc.EtaServiceStub:
        return eta_pb2_grpc.EtaServiceStub(self.channel)

    async def health(self, service: str = "") -> int:
        reply = await health_pb2_grpc.HealthStub(self.channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=5
        )
        return int(reply.status)

    def metric(self, name: str, **labels: str) -> float:
        return metric_total(self.stack.ports.metrics["prediction"], name, **labels)


@pytest.fixture(scope="module")
def infra(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Infra]:
    workdir = tmp_path_factory.mktemp("prediction-degradation")
    redis = start_test_redis(workdir / "redis", workdir / "logs")
    postgres = start_postgres(workdir / "pgdata", workdir / "logs")
    # a hung Redis: a black-holing proxy; a hung cluster: every node stopped (a proxy cannot front a cluster)
    state = Infra(workdir, redis, postgres, RedisProxy(redis.port), synthetic_bundle(rows=1500, rounds=20))
    if redis_cluster_mode():
        state.proxy = FrozenRedis(lambda: state.redis)  # the current one: a test restarts it
    try:
        yield state
    finally:
        state.postgres.stop()
        state.redis.stop()


@pytest.fixture(scope="module")
async def ready(infra: Infra) -> AsyncIterator[Infra]:
    await apply_migrations(infra.postgres.url)
    await register(infra.postgres.url, "v1", infra.blob)
    await infra.write_features()
    await infra.proxy.start()
    try:
        yield infra
    finally:
        await infra.proxy.close()


async def start(
    infra: Infra, name: str, *, redis_url: str, database_url: str, env: dict[str, str]
) -> Service:
    stack = LocalStack(infra.workdir / name, ports=ServicePorts.free(), use_env_endpoints=False)
    stack.redis_url, stack.database_url = redis_url, database_url
    await asyncio.to_thread(
        stack.start_service,
        "prediction",
        extra_env={
            "OTEL_TRACES_SAMPLER": "always_off",
            "PREDICTION_MODEL_REFRESH_SECONDS": "0.3",
            "PREDICTION_LOG_FLUSH_MS": "100",
            "SHUTDOWN_GRACE_SECONDS": "1",
            **env,
        },
    )
    return Service(stack, grpc.aio.insecure_channel(stack.target("prediction")))


async def stop(service: Service) -> None:
    await service.channel.close()
    await asyncio.to_thread(service.stack.stop)


def assert_answered_from_defaults(reply: eta_pb2.PredictEtaResponse, reason: int) -> None:
    assert list(reply.degradations) == [reason]
    assert reply.feature_quality == Quality.MISSING
    assert set(reply.missing_features) == set(ONLINE_FEATURES)
    assert reply.model_version == "v1"  # the registry model still answers, on the defaults
    assert 0 < reply.eta_low_minutes <= reply.eta_minutes <= reply.eta_high_minutes


async def test_redis_killed_answers_from_defaults_stays_serving_and_recovers(ready: Infra) -> None:
    service = await start(
        ready,
        "killed",
        redis_url=ready.redis.url,
        database_url=ready.postgres.url,
        env={"PREDICTION_REDIS_FAILURES_TO_OPEN": "3", "PREDICTION_REDIS_BACKOFF_SECONDS": "0.5"},
    )
    try:
        before = await service.eta.PredictEta(REQUEST, timeout=5)
        assert before.feature_quality == Quality.COMPLETE

        ready.redis.kill()
        for _ in range(8):
            reply = await service.eta.PredictEta(REQUEST, timeout=2)  # never an error
            assert_answered_from_defaults(reply, Degradation.ONLINE_STORE_UNAVAILABLE)
        assert await service.health() == SERVING
        assert await service.health("eta.v1.EtaService") == SERVING
        assert service.metric("eta_prediction_fallbacks_total", reason="redis_unavailable") >= 3
        assert service.metric("eta_prediction_fallbacks_total", reason="redis_circuit_open") >= 1
        assert service.metric("eta_prediction_redis_circuit_open") == 1

        # Redis comes back empty (no scripts, no data); features are rebuilt by replay (here: rewritten)
        ready.redis = start_test_redis(ready.workdir / "redis-2", ready.workdir / "logs", like=ready.redis)
        await ready.write_features()
        after = await poll_until(
            lambda: service.eta.PredictEta(REQUEST, timeout=2),
            lambda r: r.feature_quality == Quality.COMPLETE,
            timeout=10,
        )
        assert list(after.degradations) == []
        assert service.metric("eta_prediction_redis_circuit_open") == 0
    finally:
        await stop(service)


async def test_a_hung_redis_is_abandoned_within_the_deadline_then_circuit_broken(ready: Infra) -> None:
    service = await start(
        ready,
        "hung",
        redis_url=ready.proxy.url,
        database_url=ready.postgres.url,
        env={
            "PREDICTION_REDIS_TIMEOUT_MS": "400",
            "PREDICTION_REDIS_FAILURES_TO_OPEN": "2",
            "PREDICTION_REDIS_BACKOFF_SECONDS": "0.5",
            # time kept back from the client's deadline to score and reply: the 2 ms default is tight
            # for a test machine that runs other suites at once (an answer 3 ms late fails the call)
            "PREDICTION_DEADLINE_RESERVE_MS": "50",
            "PREDICTION_CLIENT_CACHE_SILENCE_MS": "300",
        },
    )
    try:
        assert (await service.eta.PredictEta(REQUEST, timeout=5)).feature_quality == Quality.COMPLETE
        cached = not redis_cluster_mode()  # the client-side cache is for a single Redis
        if cached:
            await poll_until(  # the same read answered from the cache, without Redis
                lambda: service.eta.PredictEta(REQUEST, timeout=5),
                lambda r: service.metric("eta_prediction_client_cache_hits_total") > 0,
                timeout=10,
            )
        ready.proxy.blackhole = True
        if cached:
            # A hung Redis closes no connection: the cache stops trusting its entries once its
            # invalidation channel was silent for PREDICTION_CLIENT_CACHE_SILENCE_MS (300 ms here); from
            # then on reads go to Redis, and time out.
            await asyncio.sleep(0.5)
        # a deadline (0.25 s) shorter than the Redis timeout: the service answers before it, from defaults
        for _ in range(3):
            reply = await service.eta.PredictEta(REQUEST, timeout=0.25)
            assert_answered_from_defaults(reply, Degradation.ONLINE_STORE_TIMEOUT)
        # ... which says nothing about Redis; two full Redis timeouts do, and open the circuit
        for _ in range(2):
            reply = await service.eta.PredictEta(REQUEST, timeout=5)
            assert_answered_from_defaults(reply, Degradation.ONLINE_STORE_TIMEOUT)
        reply = await service.eta.PredictEta(REQUEST, timeout=5)  # not even tried
        assert_answered_from_defaults(reply, Degradation.ONLINE_STORE_UNAVAILABLE)
        assert service.metric("eta_prediction_fallbacks_total", reason="redis_circuit_open") >= 1
        assert await service.health() == SERVING

        ready.proxy.blackhole = False
        await poll_until(
            lambda: service.eta.PredictEta(REQUEST, timeout=5),
            lambda r: r.feature_quality == Quality.COMPLETE,
            timeout=10,
        )
        assert service.metric("eta_prediction_fallbacks_total", reason="redis_timeout") >= 5
    finally:
        ready.proxy.blackhole = False
        await stop(service)


async def test_overload_is_shed_and_postgres_down_does_not_stop_serving(ready: Infra) -> None:
    service = await start(
        ready,
        "small",
        redis_url=ready.proxy.url,
        database_url=f"postgresql://postgres@127.0.0.1:{free_port()}/eta",  # nothing listens there
        env={
            "PREDICTION_MAX_IN_FLIGHT": "1",
            "PREDICTION_REDIS_TIMEOUT_MS": "1500",
            "PREDICTION_REDIS_FAILURES_TO_OPEN": "100",
        },
    )
    try:
        # no registry reachable: the heuristic answers, flagged, and the service is ready
        reply = await service.eta.PredictEta(REQUEST, timeout=5)
        assert reply.model_version == "heuristic-v0"
        assert list(reply.degradations) == [Degradation.HEURISTIC_MODEL]
        assert await service.health() == SERVING

        ready.proxy.blackhole = True  # the next call holds its admission unit ~1.5 s
        slow = asyncio.ensure_future(service.eta.PredictEta(REQUEST, timeout=5))
        await asyncio.sleep(0.3)
        codes = []
        for _ in range(5):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await service.eta.PredictEta(REQUEST, timeout=5)
            codes.append(info.value.code())
        assert codes == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 5
        held = await slow
        assert list(held.degradations) == [Degradation.ONLINE_STORE_TIMEOUT, Degradation.HEURISTIC_MODEL]
        ready.proxy.blackhole = False
        assert service.metric("eta_prediction_rejected_total", method="PredictEta", reason="overloaded") == 5
        # the predictions could not be logged: dropped and counted, never in the way
        await poll_until(
            lambda: service.metric("eta_prediction_log_rows_total", result="dropped_error"),
            lambda dropped: dropped >= 1,
            timeout=10,
        )
    finally:
        ready.proxy.blackhole = False
        await stop(service)


async def test_without_any_model_it_is_not_serving_until_one_is_promoted(ready: Infra) -> None:
    conn = await asyncpg.connect(ready.postgres.url)
    try:
        await conn.execute("CREATE DATABASE eta_empty")
    finally:
        await conn.close()
    empty = ready.postgres.url.rsplit("/", 1)[0] + "/eta_empty"
    await apply_migrations(empty)
    service = await start(
        ready,
        "strict",
        redis_url=ready.redis.url,
        database_url=empty,
        env={"PREDICTION_HEURISTIC_FALLBACK": "false"},
    )
    try:
        assert await service.health() == NOT_SERVING
        assert await service.health("eta.v1.EtaService") == NOT_SERVING
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await service.eta.PredictEta(REQUEST, timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "no model loaded" in (info.value.details() or "")

        await register(empty, "v1", ready.blob)
        await poll_until(service.health, lambda status: status == SERVING, timeout=10)
        reply = await service.eta.PredictEta(REQUEST, timeout=5)
        assert reply.model_version == "v1"
        assert list(reply.degradations) == []
    finally:
        await stop(service)


async def test_with_the_prediction_log_off_it_serves_and_logs_nothing(ready: Infra) -> None:
    service = await start(
        ready,
        "nolog",
        redis_url=ready.redis.url,
        database_url=ready.postgres.url,
        env={"PREDICTION_LOG_ENABLED": "false"},
    )
    try:
        await poll_until(
            lambda: service.eta.PredictEta(REQUEST, timeout=5),
            lambda reply: reply.model_version == "v1",
            timeout=10,
        )
        await asyncio.sleep(0.5)  # several refresh periods: the service must still be up
        reply = await service.eta.PredictEta(REQUEST, timeout=5)
        assert reply.feature_quality == Quality.COMPLETE
        assert await service.health() == SERVING
        assert service.metric("eta_prediction_log_rows_total", result="written") == 0
    finally:
        await stop(service)
