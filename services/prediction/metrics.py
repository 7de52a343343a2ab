"""Prometheus metrics of the prediction service."""

from prometheus_client import Counter, Histogram

LATENCY = Histogram(
    "eta_prediction_stage_seconds",
    "Time per stage of a prediction",
    ["stage"],
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1),
)
FEATURE_AGE = Histogram(
    "eta_prediction_feature_age_seconds",
    "Age of online features at read time",
    ["feature"],
    buckets=(0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600),
)
QUALITY = Counter("eta_prediction_feature_quality_total", "Predictions by feature quality", ["quality"])
FALLBACKS = Counter("eta_prediction_fallbacks_total", "Predictions that used a fallback", ["reason"])
