"""Ingestion settings (environment variables, defaults in brackets).

``GRPC_PORT`` [50051], ``METRICS_PORT`` [9101], ``SHUTDOWN_GRACE_SECONDS`` [10],
``INGESTION_MAX_BATCH`` [500] events per PublishEvents call,
``INGESTION_MAX_FUTURE_SKEW_SECONDS`` [300] how far in the future an event_time may be,
``INGESTION_MAX_AGE_SECONDS`` [604800 = 7 days] how old an event_time may be,
``INGESTION_DEDUP_TTL_SECONDS`` [86400] how long an event_id is remembered for duplicate detection,
``INGESTION_PUBLISH_TIMEOUT_SECONDS`` [5] how long to wait for the broker's ack (capped by the client's
deadline) before answering UNAVAILABLE. Plus ``KAFKA_*``, ``REDIS_URL`` and ``OTEL_*``.
"""

from __future__ import annotations

from dataclasses import dataclass

from eta_common.config import KafkaSettings, RedisSettings, ServerSettings, env_float, env_int

DEFAULT_GRPC_PORT = 50051
DEFAULT_METRICS_PORT = 9101


@dataclass(frozen=True, kw_only=True)
class IngestionSettings:
    server: ServerSettings
    kafka: KafkaSettings
    redis: RedisSettings
    max_batch: int = 500
    max_future_skew_seconds: float = 300.0
    max_age_seconds: float = 7 * 24 * 3600.0
    dedup_ttl_seconds: int = 24 * 3600
    publish_timeout_seconds: float = 5.0

    @classmethod
    def from_env(cls) -> IngestionSettings:
        return cls(
            server=ServerSettings.from_env(
                default_grpc_port=DEFAULT_GRPC_PORT, default_metrics_port=DEFAULT_METRICS_PORT
            ),
            kafka=KafkaSettings.from_env(),
            redis=RedisSettings.from_env(),
            max_batch=env_int("INGESTION_MAX_BATCH", cls.max_batch, minimum=1),
            max_future_skew_seconds=env_float(
                "INGESTION_MAX_FUTURE_SKEW_SECONDS", cls.max_future_skew_seconds, minimum=0
            ),
            max_age_seconds=env_float("INGESTION_MAX_AGE_SECONDS", cls.max_age_seconds, minimum=1),
            dedup_ttl_seconds=env_int("INGESTION_DEDUP_TTL_SECONDS", cls.dedup_ttl_seconds, minimum=1),
            publish_timeout_seconds=env_float(
                "INGESTION_PUBLISH_TIMEOUT_SECONDS", cls.publish_timeout_seconds, minimum=0.1
            ),
        )
