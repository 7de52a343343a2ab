"""Settings from environment variables.

Every variable has a documented default so that ``make run`` works on a fresh machine; the Helm chart
sets the same names. Unknown or malformed values fail fast at start-up with a message naming the variable.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

__all__ = [
    "ConfigError",
    "DatabaseSettings",
    "KafkaSettings",
    "RedisSettings",
    "ServerSettings",
    "env_bool",
    "env_float",
    "env_int",
    "env_str",
]


class ConfigError(ValueError):
    """A configuration variable is malformed."""


def env_str(name: str, default: str) -> str:
    value = os.environ.get(name)
    return default if value is None or value == "" else value


def env_int(name: str, default: int, *, minimum: int | None = None) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError as exc:
        raise ConfigError(f"{name}={raw!r} is not an integer") from exc
    if minimum is not None and value < minimum:
        raise ConfigError(f"{name}={value} must be >= {minimum}")
    return value


def env_float(name: str, default: float, *, minimum: float | None = None) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError as exc:
        raise ConfigError(f"{name}={raw!r} is not a number") from exc
    if minimum is not None and value < minimum:
        raise ConfigError(f"{name}={value} must be >= {minimum}")
    return value


def env_bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    lowered = raw.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise ConfigError(f"{name}={raw!r} is not a boolean (true/false)")


@dataclass(frozen=True, kw_only=True)
class KafkaSettings:
    """``KAFKA_BOOTSTRAP_SERVERS`` (localhost:9092), ``KAFKA_TOPIC_PREFIX`` (``eta.``),
    ``KAFKA_TOPIC_PARTITIONS`` (3, used when topics are created)."""

    bootstrap_servers: str = "localhost:9092"
    topic_prefix: str = "eta."
    partitions: int = 3

    @classmethod
    def from_env(cls) -> KafkaSettings:
        return cls(
            bootstrap_servers=env_str("KAFKA_BOOTSTRAP_SERVERS", cls.bootstrap_servers),
            topic_prefix=env_str("KAFKA_TOPIC_PREFIX", cls.topic_prefix),
            partitions=env_int("KAFKA_TOPIC_PARTITIONS", cls.partitions, minimum=1),
        )


@dataclass(frozen=True, kw_only=True)
class RedisSettings:
    """``REDIS_URL`` (redis://localhost:6379/0)."""

    url: str = "redis://localhost:6379/0"

    @classmethod
    def from_env(cls) -> RedisSettings:
        return cls(url=env_str("REDIS_URL", cls.url))


@dataclass(frozen=True, kw_only=True)
class DatabaseSettings:
    """``DATABASE_URL`` (postgresql://postgres@localhost:5432/eta)."""

    url: str = "postgresql://postgres@localhost:5432/eta"

    @classmethod
    def from_env(cls) -> DatabaseSettings:
        return cls(url=env_str("DATABASE_URL", cls.url))


@dataclass(frozen=True, kw_only=True)
class ServerSettings:
    """Common to every gRPC service: ``GRPC_PORT`` (per service), ``METRICS_PORT`` (per service, 0 = off),
    ``SHUTDOWN_GRACE_SECONDS`` (10): how long in-flight RPCs may finish after SIGTERM. (The event loop,
    ``ETA_EVENT_LOOP`` [uvloop] or asyncio, is chosen before the settings are read: see
    ``eta_common.grpc_server.event_loop_factory``.)"""

    grpc_port: int
    metrics_port: int
    shutdown_grace_seconds: float = 10.0

    @classmethod
    def from_env(cls, *, default_grpc_port: int, default_metrics_port: int) -> ServerSettings:
        return cls(
            grpc_port=env_int("GRPC_PORT", default_grpc_port, minimum=0),
            metrics_port=env_int("METRICS_PORT", default_metrics_port, minimum=0),
            shutdown_grace_seconds=env_float("SHUTDOWN_GRACE_SECONDS", 10.0, minimum=0.0),
        )
