"""Run the ingestion gRPC service: ``eta-ingestion`` (configuration: see :mod:`ingestion.config`)."""

from __future__ import annotations

import argparse
import asyncio

import redis.asyncio as aioredis

from eta.v1 import ingestion_pb2, ingestion_pb2_grpc
from eta_common.grpc_server import GrpcService, serve
from eta_common.kafka import Topics, ensure_topics, make_producer
from eta_common.logs import configure_logging
from eta_common.telemetry import setup_tracing
from ingestion import config
from ingestion.dedup import DedupStore
from ingestion.server import IngestionServicer
from ingestion.validation import ValidationLimits


def build(settings: config.IngestionSettings) -> GrpcService:
    producer = make_producer(settings.kafka, client_id="eta-ingestion")
    redis_client = aioredis.Redis.from_url(settings.redis.url)
    servicer = IngestionServicer(
        producer=producer,
        dedup=DedupStore(redis_client, ttl_seconds=settings.dedup_ttl_seconds),
        topics=Topics.from_settings(settings.kafka),
        limits=ValidationLimits(
            max_future_skew_ms=int(settings.max_future_skew_seconds * 1000),
            max_age_ms=int(settings.max_age_seconds * 1000),
        ),
        max_batch=settings.max_batch,
        publish_timeout_seconds=settings.publish_timeout_seconds,
    )

    async def start() -> None:
        await ensure_topics(settings.kafka)
        await producer.start()

    async def stop_producer() -> None:
        await producer.stop()  # flushes what is still buffered

    return GrpcService(
        name="eta-ingestion",
        settings=settings.server,
        register=[lambda server: ingestion_pb2_grpc.add_IngestionServiceServicer_to_server(servicer, server)],
        service_names=[ingestion_pb2.DESCRIPTOR.services_by_name["IngestionService"].full_name],
        on_start=[start],
        on_stop=[stop_producer, redis_client.aclose],
    )


async def run(settings: config.IngestionSettings) -> None:
    """Build inside the event loop (aiokafka clients need a running loop) and serve until SIGTERM."""
    await serve(build(settings))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="eta-ingestion", description=config.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.parse_args(argv)
    configure_logging("eta-ingestion")
    provider = setup_tracing("eta-ingestion")
    try:
        asyncio.run(run(config.IngestionSettings.from_env()))
    finally:
        provider.shutdown()


if __name__ == "__main__":
    main()
