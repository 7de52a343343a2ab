"""Prometheus metrics of the ingestion service."""

from prometheus_client import Counter, Gauge, Histogram

EVENTS = Counter("eta_ingestion_events_total", "Events by kind and status", ["kind", "status"])
PUBLISH_LATENCY = Histogram(
    "eta_ingestion_publish_seconds",
    "Time from send to broker ack per batch",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
IN_FLIGHT = Gauge("eta_ingestion_in_flight_events", "Events handed to the producer and not yet acknowledged")
BROKER_ERRORS = Counter("eta_ingestion_broker_errors_total", "Events that could not be published", ["reason"])
