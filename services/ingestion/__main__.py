"""Run the ingestion gRPC service: ``eta-ingestion`` (configuration: see :mod:`ingestion.config`)."""

from __future__ import annotations

import socket

import grpc

from eta_common.auth import BearerAuthInterceptor, TokenStore
from eta_common.grpc_server import GrpcService, run_grpc_service, service_parser
from eta_common.kafka import Topics, ensure_topics, make_producer
from eta_common.redis_client import redis_from_url
from ingestion import config, metrics
from ingestion.budget import InFlightBudget
from ingestion.dedup import DedupStore
from ingestion.pipeline import Ingestor
from ingestion.probes import health_server
from ingestion.publisher import Publisher
from ingestion.server import SERVICE_NAME, IngestionServicer
from ingestion.validation import ValidationLimits

# Redis is on the hot path (dedup): a slow Redis must not stall ingestion, dedup fails open instead.
REDIS_TIMEOUT_SECONDS = 1.0


def build(settings: config.IngestionSettings) -> GrpcService:
    producer = make_producer(settings.kafka, client_id="eta-ingestion")
    redis_client = redis_from_url(settings.redis.url, socket_connect_timeout=REDIS_TIMEOUT_SECONDS)
    ingestor = Ingestor(
        publisher=Publisher(producer, Topics.from_settings(settings.kafka), replica=socket.gethostname()),
        dedup=DedupStore(
            redis_client,
            ttl_seconds=settings.dedup_ttl_seconds,
            # a claim outlives its request's longest possible publish; a crashed replica's claims expire soon
            pending_ttl_seconds=2 * settings.publish_timeout_seconds + 5,
            timeout_seconds=REDIS_TIMEOUT_SECONDS,
        ),
        limits=ValidationLimits(
            max_future_skew_ms=int(settings.max_future_skew_seconds * 1000),
            max_age_ms=int(settings.max_age_seconds * 1000),
        ),
    )
    servicer = IngestionServicer(
        ingestor=ingestor,
        budget=InFlightBudget(settings.max_in_flight_events),
        max_batch=settings.max_batch,
        publish_timeout_seconds=settings.publish_timeout_seconds,
        stream_window=settings.stream_window,
    )
    security = settings.security
    tokens = TokenStore(tokens_file=security.auth_tokens_file, inline=security.auth_tokens)
    interceptors = []
    if security.auth_required or tokens.configured:
        interceptors.append(
            BearerAuthInterceptor(
                tokens,
                required=security.auth_required,
                on_denied=lambda code, _method: metrics.CALLS_REFUSED.labels(code.name.lower()).inc(),
            )
        )
    background = []
    if security.health_port:
        background.append(health_server(security.health_port, [SERVICE_NAME]))

    async def start() -> None:
        await ensure_topics(settings.kafka)
        await producer.start()

    async def stop_producer() -> None:
        await producer.stop()  # flushes what is still buffered

    credentials: grpc.ServerCredentials | None = (
        security.tls.server_credentials() if security.tls is not None else None
    )
    return GrpcService(
        name="eta-ingestion",
        settings=settings.server,
        register=[servicer.register],
        service_names=[SERVICE_NAME],
        on_start=[start],
        background=background,
        on_stop=[stop_producer, redis_client.aclose],
        interceptors=interceptors,
        server_credentials=credentials,
    )


def main(argv: list[str] | None = None) -> None:
    service_parser("eta-ingestion", config.__doc__).parse_args(argv)
    run_grpc_service("eta-ingestion", lambda: build(config.IngestionSettings.from_env()))


if __name__ == "__main__":
    main()
