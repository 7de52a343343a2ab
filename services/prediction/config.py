"""Prediction settings (environment variables, defaults in brackets).

Server: ``GRPC_PORT`` [50053], ``METRICS_PORT`` [9103], ``SHUTDOWN_GRACE_SECONDS`` [10]; plus
``REDIS_URL``, ``DATABASE_URL`` and the standard ``OTEL_*`` variables.

Model
  ``PREDICTION_MODEL_REFRESH_SECONDS`` [30] how often the registry is polled for a newly promoted model
  (hot reload, no restart). ``PREDICTION_HEURISTIC_FALLBACK`` [true] answer with the documented heuristic
  (``heuristic-v0``) while no registry model is loaded; with ``false`` the service reports NOT_SERVING
  and answers UNAVAILABLE until a model is loaded. ``PREDICTION_MODEL_COMPILE`` [true] compile each
  loaded model's trees to machine code (lleaves/LLVM: seconds per model, in a worker thread while the
  model already serves on LightGBM's fast path) and then score through it; with ``false``, or when
  compiling fails or disagrees with LightGBM, the model stays on the fast path.
  ``PREDICTION_MODEL_CACHE_DIR`` [empty: no cache] a directory for the compiled object files (named by
  model version, quantile and a hash of the model text, the compiler versions and the host CPU), so a
  restart loads a known model in milliseconds instead of compiling it again.

Freshness
  ``PREDICTION_STALENESS_BUDGET_SECONDS`` [300] the staleness budget of every online feature that has no
  budget of its own. ``PREDICTION_STALENESS_BUDGETS`` per-feature budgets as ``name=seconds`` pairs,
  comma-separated; they are merged over the built-in ones: ``num_orders_last_10_min=600,
  num_orders_last_30_min=1800, mean_prep_minutes_last_60_min=3600,
  mean_prep_minutes_last_24_hours=86400, kitchen_busy=3600, free_drivers_within_3km=60``
  (``orders_in_kitchen`` uses the default budget). A feature whose age
  (seconds since the online store last changed it) exceeds its budget is listed in ``stale_features``
  and makes the answer STALE.

Time and load
  ``PREDICTION_REDIS_TIMEOUT_MS`` [50] the longest a prediction waits for Redis before answering from
  the feature defaults (``ONLINE_STORE_TIMEOUT``); the client's deadline shortens it.
  ``PREDICTION_DEADLINE_RESERVE_MS`` [2] time kept for scoring and replying: the Redis read gets at most
  the client's remaining time minus this, and a call arriving with less than this left is answered
  DEADLINE_EXCEEDED at once. ``PREDICTION_REDIS_FAILURES_TO_OPEN`` [3] consecutive Redis failures that
  open the circuit; ``PREDICTION_REDIS_BACKOFF_SECONDS`` [1] how long an open circuit answers from the
  defaults without trying Redis (then one call probes it). ``PREDICTION_MAX_IN_FLIGHT`` [64] admission
  units in flight before calls are shed with RESOURCE_EXHAUSTED (PredictEta = 1 unit, PredictEtaBatch =
  1 + restaurants // 10). ``PREDICTION_MAX_BATCH`` [100] restaurants per PredictEtaBatch.
  ``PREDICTION_REDIS_CLIENT`` [lean] ``lean`` is the service's pipelined RESP client
  (:mod:`prediction.redis_client`), ``redis-py`` the standard asyncio client (slower, same results).
  ``PREDICTION_CLIENT_CACHE`` [true] keep the ready rows and the city state read by predictions in the
  process, invalidated by Redis (``CLIENT TRACKING``): a hot read needs no round trip
  (:mod:`prediction.client_cache`; single Redis with the ``lean`` client only, off on a Redis Cluster).
  ``PREDICTION_CLIENT_CACHE_ENTRIES`` [50000] keys kept at most (~1 KB each; then the cache starts over).
  ``PREDICTION_CLIENT_CACHE_SILENCE_MS`` [500] the cache stops serving when its invalidation connection
  has been silent this long (pinged 5 times as often): a hung Redis or network is noticed within it.
  ``PREDICTION_CLIENT_CACHE_REFRESH`` [true] fetch a key read from the cache again as soon as Redis
  invalidates it (refresh-ahead), so the next read finds it in memory; a key not read since its last
  fetch is only dropped.

Prediction log (PostgreSQL table ``predictions``)
  ``PREDICTION_LOG_ENABLED`` [true]; ``PREDICTION_LOG_BUFFER`` [20000] rows held in memory at most
  (beyond that new rows are dropped and counted); ``PREDICTION_LOG_BATCH`` [500] rows per write;
  ``PREDICTION_LOG_FLUSH_MS`` [250] longest a row waits before it is written;
  ``PREDICTION_LOG_FEED_SAMPLE`` [0.02] share of PredictEtaBatch calls (home feeds) whose rows are logged,
  drawn per call (every PredictEta — a checkout — is logged). A feed logs a row per restaurant: at
  platform scale (50k feed loads/s × 50 restaurants) logging every one would be 2.5M rows/s, and in this
  service it was a quarter of a batch's CPU; live accuracy joins checkouts, and the consistency check
  works on any sample.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from eta_common import customer_features as CF
from eta_common import features as F
from eta_common.config import (
    ConfigError,
    DatabaseSettings,
    RedisSettings,
    ServerSettings,
    env_bool,
    env_float,
    env_int,
    env_str,
)

__all__ = ["DEFAULT_STALENESS_BUDGETS", "ONLINE_FEATURES", "PredictionSettings", "parse_budgets"]

DEFAULT_GRPC_PORT = 50053
DEFAULT_METRICS_PORT = 9103

# Features read from the online store (the others are computed from the request and are never stale).
ONLINE_FEATURES: tuple[str, ...] = tuple(name for name in F.FEATURE_NAMES if name in F.DEFAULTS)

# Why these budgets: a windowed feature whose inputs have not changed for longer than the window itself
# is computed from nothing but silence (so a window's budget is its length); a kitchen status (BUSY is a
# transient overload signal) older than an hour says little about now; drivers move ~500 m a minute, so a
# supply picture older than a minute is already wrong near the 3 km edge; city-wide dispatch events come
# every ~40 s (p99 ~10 min in a simulated week), so 15 min without one is a real stall; the pickup wait,
# like the other windowed means, gets its window's length; the customer history is refreshed hourly (its
# age is measured from the refresh boundary), so two periods means a refresh was missed. Everything else
# (orders in the kitchen) uses PREDICTION_STALENESS_BUDGET_SECONDS.
DEFAULT_STALENESS_BUDGETS: Mapping[str, float] = MappingProxyType(
    {
        F.NUM_ORDERS_10.name: 600.0,
        F.NUM_ORDERS_30.name: 1800.0,
        F.MEAN_PREP_MINUTES_60.name: 3600.0,
        F.MEAN_PREP_MINUTES_24H.name: 86400.0,
        F.KITCHEN_BUSY: 3600.0,
        F.FREE_DRIVERS_NEARBY: 60.0,
        F.ORDERS_WAITING_FOR_DRIVER: 900.0,
        F.MEAN_PICKUP_WAIT_30.name: 1800.0,
        CF.CUSTOMER_ORDERS_28D: 2 * CF.CUSTOMER_REFRESH_MS / 1000,
        CF.CUSTOMER_MEAN_DELIVERY_28D: 2 * CF.CUSTOMER_REFRESH_MS / 1000,
    }
)
REDIS_CLIENTS = ("lean", "redis-py")


def parse_budgets(raw: str, *, variable: str = "PREDICTION_STALENESS_BUDGETS") -> dict[str, float]:
    """``"name=seconds,name=seconds"`` → {name: seconds}; unknown names and bad numbers fail fast."""
    budgets: dict[str, float] = {}
    for item in (part.strip() for part in raw.split(",")):
        if not item:
            continue
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep:
            raise ConfigError(f"{variable}: {item!r} is not name=seconds")
        if name not in ONLINE_FEATURES:
            known = ", ".join(ONLINE_FEATURES)
            raise ConfigError(f"{variable}: unknown online feature {name!r} (known: {known})")
        try:
            seconds = float(value)
        except ValueError as exc:
            raise ConfigError(f"{variable}: {value.strip()!r} for {name} is not a number") from exc
        if not seconds >= 0:
            raise ConfigError(f"{variable}: budget of {name} must be >= 0")
        budgets[name] = seconds
    return budgets


@dataclass(frozen=True, kw_only=True)
class PredictionSettings:
    server: ServerSettings
    redis: RedisSettings
    database: DatabaseSettings
    model_refresh_seconds: float = 30.0
    heuristic_fallback: bool = True
    model_compile: bool = True
    model_cache_dir: str = ""
    staleness_budget_seconds: float = 300.0
    staleness_budgets: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_STALENESS_BUDGETS))
    redis_timeout_ms: float = 50.0
    deadline_reserve_ms: float = 2.0
    redis_failures_to_open: int = 3
    redis_backoff_seconds: float = 1.0
    max_in_flight: int = 64
    max_batch: int = 100
    redis_client: str = "lean"
    client_cache: bool = True
    client_cache_entries: int = 50_000
    client_cache_silence_ms: int = 500
    client_cache_refresh: bool = True
    log_enabled: bool = True
    log_buffer: int = 20_000
    log_batch: int = 500
    log_flush_ms: float = 250.0
    log_feed_sample: float = 0.02

    def budget_of(self, feature: str) -> float:
        """The staleness budget (seconds) of an online feature."""
        return self.staleness_budgets.get(feature, self.staleness_budget_seconds)

    @classmethod
    def from_env(cls) -> PredictionSettings:
        budgets = dict(DEFAULT_STALENESS_BUDGETS)
        budgets.update(parse_budgets(env_str("PREDICTION_STALENESS_BUDGETS", "")))
        redis_client = env_str("PREDICTION_REDIS_CLIENT", cls.redis_client)
        if redis_client not in REDIS_CLIENTS:
            raise ConfigError(f"PREDICTION_REDIS_CLIENT={redis_client!r} must be one of {REDIS_CLIENTS}")
        return cls(
            server=ServerSettings.from_env(
                default_grpc_port=DEFAULT_GRPC_PORT, default_metrics_port=DEFAULT_METRICS_PORT
            ),
            redis=RedisSettings.from_env(),
            database=DatabaseSettings.from_env(),
            model_refresh_seconds=env_float(
                "PREDICTION_MODEL_REFRESH_SECONDS", cls.model_refresh_seconds, minimum=0.1
            ),
            heuristic_fallback=env_bool("PREDICTION_HEURISTIC_FALLBACK", cls.heuristic_fallback),
            model_compile=env_bool("PREDICTION_MODEL_COMPILE", cls.model_compile),
            model_cache_dir=env_str("PREDICTION_MODEL_CACHE_DIR", cls.model_cache_dir),
            staleness_budget_seconds=env_float(
                "PREDICTION_STALENESS_BUDGET_SECONDS", cls.staleness_budget_seconds, minimum=0
            ),
            staleness_budgets=budgets,
            redis_timeout_ms=env_float("PREDICTION_REDIS_TIMEOUT_MS", cls.redis_timeout_ms, minimum=0.1),
            deadline_reserve_ms=env_float(
                "PREDICTION_DEADLINE_RESERVE_MS", cls.deadline_reserve_ms, minimum=0
            ),
            redis_failures_to_open=env_int(
                "PREDICTION_REDIS_FAILURES_TO_OPEN", cls.redis_failures_to_open, minimum=1
            ),
            redis_backoff_seconds=env_float(
                "PREDICTION_REDIS_BACKOFF_SECONDS", cls.redis_backoff_seconds, minimum=0
            ),
            max_in_flight=env_int("PREDICTION_MAX_IN_FLIGHT", cls.max_in_flight, minimum=1),
            max_batch=env_int("PREDICTION_MAX_BATCH", cls.max_batch, minimum=1),
            redis_client=redis_client,
            client_cache=env_bool("PREDICTION_CLIENT_CACHE", cls.client_cache),
            client_cache_entries=env_int(
                "PREDICTION_CLIENT_CACHE_ENTRIES", cls.client_cache_entries, minimum=1
            ),
            client_cache_refresh=env_bool("PREDICTION_CLIENT_CACHE_REFRESH", cls.client_cache_refresh),
            client_cache_silence_ms=env_int(
                "PREDICTION_CLIENT_CACHE_SILENCE_MS", cls.client_cache_silence_ms, minimum=10
            ),
            log_enabled=env_bool("PREDICTION_LOG_ENABLED", cls.log_enabled),
            log_buffer=env_int("PREDICTION_LOG_BUFFER", cls.log_buffer, minimum=1),
            log_batch=env_int("PREDICTION_LOG_BATCH", cls.log_batch, minimum=1),
            log_flush_ms=env_float("PREDICTION_LOG_FLUSH_MS", cls.log_flush_ms, minimum=1),
            log_feed_sample=env_float("PREDICTION_LOG_FEED_SAMPLE", cls.log_feed_sample, minimum=0),
        )
