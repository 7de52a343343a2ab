"""Run the feature aggregator: ``eta-aggregator`` (configuration: see :mod:`aggregator.config`).

One process consumes the event topics as part of the consumer group, keeps the online features in
Redis, archives every event to PostgreSQL and serves the FeatureService gRPC API.
"""

from __future__ import annotations

import argparse
import asyncio
import socket

import asyncpg

from aggregator import config
from aggregator.consumer import consume_forever
from aggregator.feature_service import FeatureServicer
from aggregator.processor import BatchProcessor
from eta.v1 import features_pb2, features_pb2_grpc
from eta_common.db.migrate import apply_migrations
from eta_common.grpc_server import GrpcService, serve
from eta_common.kafka import Topics, ensure_topics, make_consumer
from eta_common.logs import configure_logging
from eta_common.online_store import OnlineStore
from eta_common.telemetry import setup_tracing


def build(settings: config.AggregatorSettings) -> GrpcService:
    lateness_ms = int(settings.allowed_lateness_seconds * 1000)
    store = OnlineStore.from_url(settings.redis.url, allowed_lateness_ms=lateness_ms)
    consumer = make_consumer(
        settings.kafka,
        group_id=settings.group_id,
        client_id=f"eta-aggregator-{socket.gethostname()}",
        topics=Topics.from_settings(settings.kafka),
    )
    state: dict[str, asyncpg.Pool] = {}

    async def start() -> None:
        await apply_migrations(settings.database.url)
        state["pool"] = await asyncpg.create_pool(settings.database.url, min_size=1, max_size=4)
        await ensure_topics(settings.kafka)
        await consumer.start()

    async def run_consumer() -> None:
        processor = BatchProcessor(store, state["pool"], allowed_lateness_ms=lateness_ms)
        await consume_forever(consumer, processor, max_batch=settings.max_batch)

    async def stop() -> None:
        await consumer.stop()
        await state["pool"].close()
        await store.close()

    return GrpcService(
        name="eta-aggregator",
        settings=settings.server,
        register=[
            lambda server: features_pb2_grpc.add_FeatureServiceServicer_to_server(
                FeatureServicer(store), server
            )
        ],
        service_names=[features_pb2.DESCRIPTOR.services_by_name["FeatureService"].full_name],
        on_start=[start],
        background=[run_consumer],
        on_stop=[stop],
    )


async def run(settings: config.AggregatorSettings) -> None:
    """Build inside the event loop (aiokafka clients need a running loop) and serve until SIGTERM."""
    await serve(build(settings))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="eta-aggregator",
        description=config.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.parse_args(argv)
    configure_logging("eta-aggregator")
    provider = setup_tracing("eta-aggregator")
    try:
        asyncio.run(run(config.AggregatorSettings.from_env()))
    finally:
        provider.shutdown()


if __name__ == "__main__":
    main()
