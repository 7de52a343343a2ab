"""Prediction settings (environment variables, defaults in brackets).

``GRPC_PORT`` [50053], ``METRICS_PORT`` [9103], ``SHUTDOWN_GRACE_SECONDS`` [10],
``PREDICTION_MODEL_REFRESH_SECONDS`` [30] how often the registry is polled for a newly promoted model
(hot reload, no restart), ``PREDICTION_STALENESS_BUDGET_SECONDS`` [300] a feature older than this makes
the answer's feature_quality STALE. Plus ``REDIS_URL``, ``DATABASE_URL`` and ``OTEL_*``.
"""

from __future__ import annotations

from dataclasses import dataclass

from eta_common.config import DatabaseSettings, RedisSettings, ServerSettings, env_float

DEFAULT_GRPC_PORT = 50053
DEFAULT_METRICS_PORT = 9103


@dataclass(frozen=True, kw_only=True)
class PredictionSettings:
    server: ServerSettings
    redis: RedisSettings
    database: DatabaseSettings
    model_refresh_seconds: float = 30.0
    staleness_budget_seconds: float = 300.0

    @classmethod
    def from_env(cls) -> PredictionSettings:
        return cls(
            server=ServerSettings.from_env(
                default_grpc_port=DEFAULT_GRPC_PORT, default_metrics_port=DEFAULT_METRICS_PORT
            ),
            redis=RedisSettings.from_env(),
            database=DatabaseSettings.from_env(),
            model_refresh_seconds=env_float(
                "PREDICTION_MODEL_REFRESH_SECONDS", cls.model_refresh_seconds, minimum=0.1
            ),
            staleness_budget_seconds=env_float(
                "PREDICTION_STALENESS_BUDGET_SECONDS", cls.staleness_budget_seconds, minimum=0
            ),
        )
