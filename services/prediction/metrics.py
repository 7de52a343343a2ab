"""Prometheus metrics of the prediction service.

All names start with ``eta_prediction_``:

* ``rpc_seconds{method,code}``: server-side latency per RPC (histogram), shed calls included;
* ``stage_seconds{stage}``: ``redis_read`` and ``inference`` (histogram);
* ``feature_age_seconds{feature}``: age of each online feature read (histogram, every row of a batch);
* ``feature_quality_total{quality}``: predictions by quality COMPLETE / STALE / MISSING;
* ``stale_features_total{feature}`` / ``missing_features_total{feature}``: a feature over its staleness
  budget / replaced by its default;
* ``fallbacks_total{reason}``: predictions answered with a fallback (``redis_unavailable``,
  ``redis_shard_unavailable`` (one Redis Cluster shard), ``redis_timeout``, ``redis_circuit_open``,
  ``store_error``, ``heuristic_model``, ``model_error``);
* ``rejected_total{method,reason}``: ``overloaded`` (RESOURCE_EXHAUSTED), ``deadline``, ``no_model``;
* ``in_flight_units``, ``redis_circuit_open`` (1 while Redis is considered down),
  ``batch_size`` (restaurants per PredictEtaBatch);
* ``model_info{version,kind}``, ``model_loaded_timestamp_seconds``, ``model_loads_total{result}``;
* ``log_rows_total{result}`` (prediction log: ``written``, ``dropped_full``, ``dropped_error``) and
  ``log_buffered_rows``.
"""

from __future__ import annotations

import threading
from bisect import bisect_left
from collections.abc import Iterator, Sequence

import numpy as np
from prometheus_client import REGISTRY, Counter, Gauge, Histogram, Info
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

from prediction.config import ONLINE_FEATURES

__all__ = ["FeatureAgeHistogram"]

RPC_LATENCY = Histogram(
    "eta_prediction_rpc_seconds",
    "Server-side latency per RPC, from admission to reply",
    ["method", "code"],
    buckets=(0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
)
STAGE = Histogram(
    "eta_prediction_stage_seconds",
    "Time per stage of a prediction",
    ["stage"],
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1),
)
STAGE_REDIS = STAGE.labels("redis_read")
STAGE_INFERENCE = STAGE.labels("inference")


class FeatureAgeHistogram(Collector):
    """A labelled histogram fed a whole batch of ages at once.

    ``prometheus_client.Histogram.observe`` costs ~2 µs (a lock and a linear bucket scan per value);
    a batch of 100 restaurants × 6 features would spend over a millisecond there. This keeps plain
    counters updated with one bisect per value under one lock per call.
    """

    def __init__(
        self,
        name: str,
        documentation: str,
        features: Sequence[str],
        buckets: Sequence[float],
        registry: CollectorRegistry | None = REGISTRY,
    ) -> None:
        self._name = name
        self._documentation = documentation
        self._features = list(features)
        self._bounds = [float(b) for b in buckets]
        self._bound_array = np.array(self._bounds)
        self._counts = [[0] * (len(self._bounds) + 1) for _ in self._features]
        self._sums = [0.0] * len(self._features)
        self._lock = threading.Lock()  # the metrics HTTP thread reads while the event loop writes
        if registry is not None:
            registry.register(self)

    def observe_rows(self, rows: Sequence[Sequence[float | None]]) -> None:
        """``rows[i][j]`` is the age of feature j (constructor order) in row i, or None when unknown."""
        bounds, counts, sums = self._bounds, self._counts, self._sums
        with self._lock:
            for row in rows:
                for j, age in enumerate(row):
                    if age is not None:
                        counts[j][bisect_left(bounds, age)] += 1
                        sums[j] += age

    def observe_array(self, ages: np.ndarray, observed: np.ndarray) -> None:
        """``ages[i, j]`` as in :meth:`observe_rows`, counted where ``observed[i, j]`` and not NaN: one
        ``searchsorted`` (the buckets ``bisect_left`` gives) and one ``bincount`` for the whole block."""
        slots = len(self._bounds) + 1
        features = ages.shape[1]
        mask = observed & ~np.isnan(ages)
        buckets = np.searchsorted(self._bound_array, ages[mask], side="left")
        buckets += (np.nonzero(mask)[1] * slots).astype(buckets.dtype)
        counted = np.bincount(buckets, minlength=features * slots)
        filled = np.flatnonzero(counted)  # the (feature, bucket) cells this block adds to: ~one per feature
        totals = np.where(mask, ages, 0.0).sum(axis=0).tolist()
        counts, sums = self._counts, self._sums
        with self._lock:
            for cell, count in zip(filled.tolist(), counted[filled].tolist(), strict=True):
                counts[cell // slots][cell % slots] += count
            for j, total in enumerate(totals):
                sums[j] += total  # 0.0 where nothing was observed

    def collect(self) -> Iterator[HistogramMetricFamily]:
        family = HistogramMetricFamily(self._name, self._documentation, labels=["feature"])
        with self._lock:
            snapshot = [(list(c), s) for c, s in zip(self._counts, self._sums, strict=True)]
        for feature, (counts, total) in zip(self._features, snapshot, strict=True):
            cumulative, buckets = 0, []
            for bound, count in zip([*self._bounds, float("inf")], counts, strict=True):
                cumulative += count
                buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
            family.add_metric([feature], buckets, total)
        yield family

    def describe(self) -> Iterator[HistogramMetricFamily]:
        yield HistogramMetricFamily(self._name, self._documentation, labels=["feature"])


FEATURE_AGE = FeatureAgeHistogram(
    "eta_prediction_feature_age_seconds",
    "Age of online features at read time (seconds since the online store last changed them)",
    ONLINE_FEATURES,
    buckets=(0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600),
)
QUALITY = Counter("eta_prediction_feature_quality_total", "Predictions by feature quality", ["quality"])
STALE_FEATURES = Counter(
    "eta_prediction_stale_features_total",
    "Predictions where a feature was over its staleness budget",
    ["feature"],
)
MISSING_FEATURES = Counter(
    "eta_prediction_missing_features_total", "Predictions where a feature's default was used", ["feature"]
)
FALLBACKS = Counter("eta_prediction_fallbacks_total", "Predictions that used a fallback", ["reason"])
REJECTED = Counter("eta_prediction_rejected_total", "Calls refused before scoring", ["method", "reason"])
IN_FLIGHT = Gauge("eta_prediction_in_flight_units", "Admission units of the calls in flight")
REDIS_CIRCUIT_OPEN = Gauge("eta_prediction_redis_circuit_open", "1 while Redis is considered down")
BATCH_SIZE = Histogram(
    "eta_prediction_batch_size", "Restaurants per PredictEtaBatch", buckets=(1, 5, 10, 25, 50, 75, 100, 250)
)
MODEL = Info("eta_prediction_model", "The serving model")
MODEL_LOADED_AT = Gauge("eta_prediction_model_loaded_timestamp_seconds", "When the serving model was loaded")
MODEL_LOADS = Counter("eta_prediction_model_loads_total", "Model reload attempts by result", ["result"])
LOG_ROWS = Counter("eta_prediction_log_rows_total", "Prediction log rows by result", ["result"])
LOG_BUFFERED = Gauge("eta_prediction_log_buffered_rows", "Prediction log rows waiting to be written")
FEATURE_READS = Counter(
    "eta_prediction_feature_reads_total",
    "Restaurants read by path: a ready row valid at the request time (one command), or the exact read "
    "from the sorted sets (the row was past its valid_until or missing)",
    ["path"],
)
READS_FROM_ROWS = FEATURE_READS.labels("row")
READS_FROM_FALLBACK = FEATURE_READS.labels("fallback")
CLIENT_CACHE_HITS = Counter(
    "eta_prediction_client_cache_hits_total",
    "Serving reads (ready rows, city state) answered from the client-side cache, without Redis",
)
CLIENT_CACHE_MISSES = Counter(
    "eta_prediction_client_cache_misses_total",
    "Cacheable serving reads fetched from Redis (and tracked for invalidation)",
)
CLIENT_CACHE_REFRESHES = Counter(
    "eta_prediction_client_cache_refreshes_total",
    "Hot keys fetched again right after Redis invalidated them (refresh-ahead), before a read wanted them",
)
CLIENT_CACHE_INVALIDATIONS = Counter(
    "eta_prediction_client_cache_invalidation_messages_total",
    "Invalidation messages Redis sent for keys the client-side cache tracks",
)
CLIENT_CACHE_ACTIVE = Gauge(
    "eta_prediction_client_cache_active",
    "1 while the client-side cache is on (invalidation connection up, tracking on); 0 otherwise",
)
