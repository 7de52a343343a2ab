"""Run the ETA prediction service: ``eta-prediction`` (configuration: see :mod:`prediction.config`)."""

from __future__ import annotations

import gc
import logging
from typing import cast

import asyncpg
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from eta.v1 import eta_pb2, eta_pb2_grpc
from eta_common.grpc_server import GrpcService, run_grpc_service, service_parser
from eta_common.online_store import OnlineStore
from eta_common.redis_client import redis_from_url
from prediction import config
from prediction.admission import Admission
from prediction.client_cache import ClientCache
from prediction.models import ModelHolder
from prediction.prediction_log import PredictionLog, copy_sink
from prediction.reader import CircuitBreaker, FeatureReader
from prediction.redis_client import LeanRedis, LeanRedisCluster, lean_from_url
from prediction.server import EtaServicer

log = logging.getLogger(__name__)
SERVICE = eta_pb2.DESCRIPTOR.services_by_name["EtaService"].full_name


def _online_store(
    settings: config.PredictionSettings,
) -> tuple[OnlineStore, LeanRedis | LeanRedisCluster | None]:
    connect_timeout = max(settings.redis_timeout_ms / 1000.0, 0.5)
    if settings.redis_client == "lean":
        # a node of a Redis Cluster gives the cluster client (one connection per primary)
        lean = lean_from_url(settings.redis.url, connect_timeout=connect_timeout)
        if settings.client_cache and isinstance(lean, LeanRedis):
            silence = settings.client_cache_silence_ms / 1000.0
            cache = ClientCache(
                lean,
                max_entries=settings.client_cache_entries,
                silence_seconds=silence,
                heartbeat_seconds=silence / 5,
                refresh_ahead=settings.client_cache_refresh,
            )
            return OnlineStore(cast(aioredis.Redis, cache)), lean
        # both implement the part of redis.asyncio.Redis that OnlineStore's reads use
        return OnlineStore(cast(aioredis.Redis, lean)), lean
    client = redis_from_url(
        settings.redis.url,
        decode_responses=False,
        socket_connect_timeout=connect_timeout,
        retry=Retry(NoBackoff(), 0),  # no hidden retries: the reader owns time budgets and fallbacks
    )
    return OnlineStore(client), None


def build(settings: config.PredictionSettings) -> GrpcService:
    store, lean = _online_store(settings)
    models = ModelHolder(
        heuristic_fallback=settings.heuristic_fallback,
        compile_trees=settings.model_compile,
        cache_dir=settings.model_cache_dir,
    )
    reader = FeatureReader(
        store,
        timeout_seconds=settings.redis_timeout_ms / 1000.0,
        breaker=CircuitBreaker(
            failures_to_open=settings.redis_failures_to_open, backoff_seconds=settings.redis_backoff_seconds
        ),
        on_timeout=lean.reset_if_stalled if lean is not None else None,
    )
    state: dict[str, asyncpg.Pool] = {}

    async def sink(records: list[bytes]) -> None:
        await copy_sink(state["pool"])(records)

    prediction_log = (
        PredictionLog(
            sink,
            capacity=settings.log_buffer,
            batch_size=settings.log_batch,
            flush_seconds=settings.log_flush_ms / 1000.0,
        )
        if settings.log_enabled
        else None
    )
    servicer = EtaServicer(
        reader,
        models,
        budgets={name: settings.budget_of(name) for name in config.ONLINE_FEATURES},
        max_batch=settings.max_batch,
        deadline_reserve_seconds=settings.deadline_reserve_ms / 1000.0,
        prediction_log=prediction_log,
        feed_log_sample=settings.log_feed_sample,
    )
    admission = Admission(
        service=SERVICE,
        max_units=settings.max_in_flight,
        costs={"PredictEtaBatch": lambda request: 1 + len(request.restaurants) // 10},
        ready=servicer.can_answer,
    )

    async def start() -> None:
        # min_size=0: no connection is needed to start, so a PostgreSQL outage does not stop serving
        state["pool"] = await asyncpg.create_pool(settings.database.url, min_size=0, max_size=3)
        try:
            await models.refresh(state["pool"])
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as exc:
            log.warning(
                "registry unreachable at start; retrying every refresh period",
                extra={"error": str(exc), "serving": models.current.version if models.current else None},
            )
        if isinstance(store.client, ClientCache):
            await store.client.start()
        # Long-lived objects (modules, the model) leave the GC's generations: fewer, shorter pauses.
        gc.collect()
        gc.freeze()

    async def refresh() -> None:
        await models.refresh_forever(state["pool"], settings.model_refresh_seconds)

    async def write_log() -> None:
        assert prediction_log is not None
        await prediction_log.run()

    async def stop() -> None:
        if prediction_log is not None:
            await prediction_log.close(timeout_seconds=max(settings.server.shutdown_grace_seconds, 1.0))
        await state["pool"].close()
        await store.close()

    return GrpcService(
        name="eta-prediction",
        settings=settings.server,
        register=[lambda server: eta_pb2_grpc.add_EtaServiceServicer_to_server(servicer, server)],
        service_names=[SERVICE],
        on_start=[start],
        # a background task that returns stops the service: the log writer runs only when enabled
        background=[refresh, write_log] if prediction_log is not None else [refresh],
        on_stop=[stop],
        wrappers=[admission],
    )


def main(argv: list[str] | None = None) -> None:
    service_parser("eta-prediction", config.__doc__).parse_args(argv)
    run_grpc_service("eta-prediction", lambda: build(config.PredictionSettings.from_env()))


if __name__ == "__main__":
    main()
