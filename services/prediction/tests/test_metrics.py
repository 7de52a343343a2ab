"""The batch-fed feature-age histogram exposes what a Prometheus histogram would."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest

from prediction.metrics import FeatureAgeHistogram


def test_feature_age_histogram_is_a_cumulative_labelled_histogram() -> None:
    registry = CollectorRegistry()
    histogram = FeatureAgeHistogram("ages_seconds", "ages", ["a", "b"], buckets=[1, 10], registry=registry)
    histogram.observe_rows([[0.5, None], [5.0, 20.0], [1.0, 10.0]])
    text = generate_latest(registry).decode()
    assert 'ages_seconds_bucket{feature="a",le="1.0"} 2.0' in text
    assert 'ages_seconds_bucket{feature="a",le="10.0"} 3.0' in text
    assert 'ages_seconds_bucket{feature="a",le="+Inf"} 3.0' in text
    assert 'ages_seconds_count{feature="a"} 3.0' in text
    assert 'ages_seconds_sum{feature="a"} 6.5' in text
    assert 'ages_seconds_bucket{feature="b",le="10.0"} 1.0' in text
    assert 'ages_seconds_count{feature="b"} 2.0' in text  # None = unknown age, not observed
