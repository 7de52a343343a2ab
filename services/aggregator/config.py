"""Aggregator settings (environment variables, defaults in brackets).

``GRPC_PORT`` [50052] (FeatureService), ``METRICS_PORT`` [9102], ``SHUTDOWN_GRACE_SECONDS`` [10],
``AGGREGATOR_GROUP_ID`` [eta-aggregator] Kafka consumer group (run more replicas to scale out, up to the
partition count), ``AGGREGATOR_ALLOWED_LATENESS_SECONDS`` [300] events that reach the aggregator's
input later than this after their event_time do not change online features (still archived),
``AGGREGATOR_MAX_BATCH`` [500] records per processing batch, ``AGGREGATOR_REBUILD_HOURS`` [168] how much
archived history an automatic or ``eta-aggregator rebuild`` replays into an empty online store,
``AGGREGATOR_SESSION_TIMEOUT_MS`` [10000] consumer-group session timeout: how soon the partitions of a
crashed replica move to the others, ``AGGREGATOR_FETCH_MAX_WAIT_MS`` [20] longest a fetch may wait for
data: lower = fresher features, more idle fetch requests, ``AGGREGATOR_ACCURACY_SECONDS`` [30] /
``AGGREGATOR_ACCURACY_WINDOW_MINUTES`` [60] how often and over which window the live accuracy gauges
(``eta_live_mae_minutes``, ``eta_live_interval_coverage_ratio`` …) are recomputed,
``AGGREGATOR_CUSTOMER_REFRESH`` [true] refresh the per-customer history features
(``eta_common.customer_features``) from PostgreSQL into Redis at start-up when out of date and after every
hourly boundary (the period is part of the feature definition, so it is not a setting; ``false`` leaves
it to ``eta-aggregator refresh-customer-features``), ``AGGREGATOR_CUSTOMER_REFRESH_DELAY_SECONDS`` [60]
how long after a boundary the refresh runs (longer than the archive lags ingestion, so every event
ingested by the boundary is in PostgreSQL), ``AGGREGATOR_CUSTOMER_REFRESH_RETRY_SECONDS`` [60] how soon a
failed refresh, or one another replica holds the lock for, is checked again,
``AGGREGATOR_CUSTOMER_REFRESH_LOCK_SECONDS`` [900] the lock's expiry (one replica refreshes; a crashed
one's lock frees itself), ``AGGREGATOR_ROW_TICK_MS`` [100] how often the row timer looks for ready rows
whose ``valid_until`` is within ``AGGREGATOR_ROW_LOOKAHEAD_MS`` [2000] and computes their next row ahead
of time (a timer lagging more than the lookahead makes reads fall back to the exact read),
``AGGREGATOR_SUPPLY_REFRESH_SECONDS`` [5] how often the free-driver counts near restaurants are
recounted into the ready rows (their age; the feature's staleness budget is 60 s),
``AGGREGATOR_SUPPLY_RESTAMP_SECONDS`` [30] how old an unchanged count may get before it is written again
with a new as-of instant (a changed count is written at once; 0 = rewrite every count every refresh).
Each write invalidates the row in the serving replicas' client-side caches; restamp + refresh must stay
under the feature's 60 s budget.
Plus ``KAFKA_*``, ``REDIS_URL``, ``DATABASE_URL`` and ``OTEL_*``.
"""

from __future__ import annotations

from dataclasses import dataclass

from eta_common.config import (
    ConfigError,
    DatabaseSettings,
    KafkaSettings,
    RedisSettings,
    ServerSettings,
    env_bool,
    env_float,
    env_int,
    env_str,
)

# The free-driver count's staleness budget (the prediction service's default): a count's age must stay
# under it, restamping included.
SUPPLY_BUDGET_SECONDS = 60.0
DEFAULT_GRPC_PORT = 50052
DEFAULT_METRICS_PORT = 9102


@dataclass(frozen=True, kw_only=True)
class AggregatorSettings:
    server: ServerSettings
    kafka: KafkaSettings
    redis: RedisSettings
    database: DatabaseSettings
    group_id: str = "eta-aggregator"
    allowed_lateness_seconds: float = 300.0
    max_batch: int = 500
    rebuild_hours: float = 168.0
    session_timeout_ms: int = 10_000
    fetch_max_wait_ms: int = 20
    accuracy_seconds: float = 30.0
    accuracy_window_minutes: float = 60.0
    customer_refresh: bool = True
    customer_refresh_delay_seconds: float = 60.0
    customer_refresh_retry_seconds: float = 60.0
    customer_refresh_lock_seconds: int = 900
    row_tick_ms: int = 100
    row_lookahead_ms: int = 2000
    supply_refresh_seconds: float = 5.0
    supply_restamp_seconds: float = 30.0

    def __post_init__(self) -> None:
        if self.supply_restamp_seconds + self.supply_refresh_seconds >= SUPPLY_BUDGET_SECONDS:
            raise ConfigError(
                f"AGGREGATOR_SUPPLY_RESTAMP_SECONDS={self.supply_restamp_seconds:g} + "
                f"AGGREGATOR_SUPPLY_REFRESH_SECONDS={self.supply_refresh_seconds:g} must stay under the "
                f"free-driver count's {SUPPLY_BUDGET_SECONDS:g} s staleness budget (counts would age past it)"
            )

    @classmethod
    def from_env(cls) -> AggregatorSettings:
        return cls(
            server=ServerSettings.from_env(
                default_grpc_port=DEFAULT_GRPC_PORT, default_metrics_port=DEFAULT_METRICS_PORT
            ),
            kafka=KafkaSettings.from_env(),
            redis=RedisSettings.from_env(),
            database=DatabaseSettings.from_env(),
            group_id=env_str("AGGREGATOR_GROUP_ID", cls.group_id),
            allowed_lateness_seconds=env_float(
                "AGGREGATOR_ALLOWED_LATENESS_SECONDS", cls.allowed_lateness_seconds, minimum=0
            ),
            max_batch=env_int("AGGREGATOR_MAX_BATCH", cls.max_batch, minimum=1),
            rebuild_hours=env_float("AGGREGATOR_REBUILD_HOURS", cls.rebuild_hours, minimum=0.01),
            session_timeout_ms=env_int("AGGREGATOR_SESSION_TIMEOUT_MS", cls.session_timeout_ms, minimum=1000),
            fetch_max_wait_ms=env_int("AGGREGATOR_FETCH_MAX_WAIT_MS", cls.fetch_max_wait_ms, minimum=1),
            accuracy_seconds=env_float("AGGREGATOR_ACCURACY_SECONDS", cls.accuracy_seconds, minimum=1),
            accuracy_window_minutes=env_float(
                "AGGREGATOR_ACCURACY_WINDOW_MINUTES", cls.accuracy_window_minutes, minimum=1
            ),
            customer_refresh=env_bool("AGGREGATOR_CUSTOMER_REFRESH", cls.customer_refresh),
            customer_refresh_delay_seconds=env_float(
                "AGGREGATOR_CUSTOMER_REFRESH_DELAY_SECONDS", cls.customer_refresh_delay_seconds, minimum=0
            ),
            customer_refresh_retry_seconds=env_float(
                "AGGREGATOR_CUSTOMER_REFRESH_RETRY_SECONDS", cls.customer_refresh_retry_seconds, minimum=1
            ),
            customer_refresh_lock_seconds=env_int(
                "AGGREGATOR_CUSTOMER_REFRESH_LOCK_SECONDS", cls.customer_refresh_lock_seconds, minimum=10
            ),
            row_tick_ms=env_int("AGGREGATOR_ROW_TICK_MS", cls.row_tick_ms, minimum=10),
            row_lookahead_ms=env_int("AGGREGATOR_ROW_LOOKAHEAD_MS", cls.row_lookahead_ms, minimum=0),
            supply_refresh_seconds=env_float(
                "AGGREGATOR_SUPPLY_REFRESH_SECONDS", cls.supply_refresh_seconds, minimum=0.1
            ),
            supply_restamp_seconds=env_float(
                "AGGREGATOR_SUPPLY_RESTAMP_SECONDS", cls.supply_restamp_seconds, minimum=0
            ),
        )
