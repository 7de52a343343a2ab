"""Ingestion settings (environment variables, defaults in brackets).

Serving: ``GRPC_PORT`` [50051], ``METRICS_PORT`` [9101], ``SHUTDOWN_GRACE_SECONDS`` [10].

Events:
``INGESTION_MAX_BATCH`` [500] events per PublishEvents call or StreamEvents chunk,
``INGESTION_MAX_FUTURE_SKEW_SECONDS`` [300] how far in the future an event_time may be,
``INGESTION_MAX_AGE_SECONDS`` [604800 = 7 days] how old an event_time may be,
``INGESTION_DEDUP_TTL_SECONDS`` [86400] how long an accepted event_id is remembered (answered DUPLICATE),
``INGESTION_PUBLISH_TIMEOUT_SECONDS`` [5] how long to wait for the broker's ack (capped by the client's
deadline) before answering UNAVAILABLE.

Backpressure:
``INGESTION_MAX_IN_FLIGHT_EVENTS`` [10000] events admitted and not yet answered, over all calls; a call
or stream chunk that does not fit is refused with RESOURCE_EXHAUSTED (must be >= INGESTION_MAX_BATCH),
``INGESTION_STREAM_WINDOW`` [8] chunks of one StreamEvents stream worked on ahead of its answers; beyond
that the server stops reading the stream (HTTP/2 flow control pushes back on the client).

Security (off by default; the Helm chart's production values turn both on):
``INGESTION_AUTH_REQUIRED`` [false] refuse calls without a valid bearer token (UNAUTHENTICATED),
``INGESTION_AUTH_TOKENS_FILE`` [unset] client tokens, one ``<client> <token> [methods]`` per line, re-read
when it changes (see :mod:`eta_common.auth`), ``INGESTION_AUTH_TOKENS`` [unset] the same lines inline
(``;``-separated). With tokens but not required, calls without a token pass as "anonymous" and a wrong
token is still refused.
``GRPC_TLS_CERT_FILE`` / ``GRPC_TLS_KEY_FILE`` [unset] serve the gRPC port with TLS (PEM; re-read on
change), ``GRPC_TLS_CLIENT_CA_FILE`` [unset] also require client certificates signed by this CA,
``GRPC_HEALTH_PORT`` [0 = off] serve grpc.health.v1 alone in plaintext on this port, for Kubernetes gRPC
probes (they cannot speak TLS).

Plus ``KAFKA_*``, ``REDIS_URL`` and ``OTEL_*`` (see :mod:`eta_common.config`, :mod:`eta_common.telemetry`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from eta_common.auth import TlsFiles
from eta_common.config import (
    ConfigError,
    KafkaSettings,
    RedisSettings,
    ServerSettings,
    env_bool,
    env_float,
    env_int,
    env_str,
)

DEFAULT_GRPC_PORT = 50051
DEFAULT_METRICS_PORT = 9101


@dataclass(frozen=True, kw_only=True)
class SecuritySettings:
    auth_required: bool = False
    auth_tokens_file: str = ""
    auth_tokens: str = field(default="", repr=False)
    tls: TlsFiles | None = None
    health_port: int = 0

    @classmethod
    def from_env(cls) -> SecuritySettings:
        cert, key = env_str("GRPC_TLS_CERT_FILE", ""), env_str("GRPC_TLS_KEY_FILE", "")
        client_ca = env_str("GRPC_TLS_CLIENT_CA_FILE", "")
        if bool(cert) != bool(key):
            raise ConfigError("GRPC_TLS_CERT_FILE and GRPC_TLS_KEY_FILE must be set together")
        if client_ca and not cert:
            raise ConfigError("GRPC_TLS_CLIENT_CA_FILE needs GRPC_TLS_CERT_FILE and GRPC_TLS_KEY_FILE")
        return cls(
            auth_required=env_bool("INGESTION_AUTH_REQUIRED", cls.auth_required),
            auth_tokens_file=env_str("INGESTION_AUTH_TOKENS_FILE", ""),
            auth_tokens=env_str("INGESTION_AUTH_TOKENS", ""),
            tls=TlsFiles(cert, key, client_ca) if cert else None,
            health_port=env_int("GRPC_HEALTH_PORT", cls.health_port, minimum=0),
        )


@dataclass(frozen=True, kw_only=True)
class IngestionSettings:
    server: ServerSettings
    kafka: KafkaSettings
    redis: RedisSettings
    security: SecuritySettings = field(default_factory=SecuritySettings)
    max_batch: int = 500
    max_future_skew_seconds: float = 300.0
    max_age_seconds: float = 7 * 24 * 3600.0
    dedup_ttl_seconds: int = 24 * 3600
    publish_timeout_seconds: float = 5.0
    max_in_flight_events: int = 10_000
    stream_window: int = 8

    def __post_init__(self) -> None:
        if self.max_in_flight_events < self.max_batch:
            raise ConfigError(
                f"INGESTION_MAX_IN_FLIGHT_EVENTS={self.max_in_flight_events} must be >= "
                f"INGESTION_MAX_BATCH={self.max_batch} (a full batch could never be admitted)"
            )

    @classmethod
    def from_env(cls) -> IngestionSettings:
        return cls(
            server=ServerSettings.from_env(
                default_grpc_port=DEFAULT_GRPC_PORT, default_metrics_port=DEFAULT_METRICS_PORT
            ),
            kafka=KafkaSettings.from_env(),
            redis=RedisSettings.from_env(),
            security=SecuritySettings.from_env(),
            max_batch=env_int("INGESTION_MAX_BATCH", cls.max_batch, minimum=1),
            max_future_skew_seconds=env_float(
                "INGESTION_MAX_FUTURE_SKEW_SECONDS", cls.max_future_skew_seconds, minimum=0
            ),
            max_age_seconds=env_float("INGESTION_MAX_AGE_SECONDS", cls.max_age_seconds, minimum=1),
            dedup_ttl_seconds=env_int("INGESTION_DEDUP_TTL_SECONDS", cls.dedup_ttl_seconds, minimum=1),
            publish_timeout_seconds=env_float(
                "INGESTION_PUBLISH_TIMEOUT_SECONDS", cls.publish_timeout_seconds, minimum=0.1
            ),
            max_in_flight_events=env_int(
                "INGESTION_MAX_IN_FLIGHT_EVENTS", cls.max_in_flight_events, minimum=1
            ),
            stream_window=env_int("INGESTION_STREAM_WINDOW", cls.stream_window, minimum=1),
        )
