"""Prometheus metrics of the ingestion service (served on ``METRICS_PORT``)."""

from prometheus_client import Counter, Gauge, Histogram

EVENTS = Counter(
    "eta_ingestion_events_total",
    "Events answered, by kind (driver/kitchen/order/none), event type (PLACED, LOCATION, …; 'invalid' "
    "when unknown) and status (accepted/duplicate/rejected/unavailable)",
    ["kind", "type", "status"],
)
PUBLISH_LATENCY = Histogram(
    "eta_ingestion_publish_seconds",
    "Time from handing a batch (call or stream chunk) to the producer until its last broker ack or the "
    "deadline",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
IN_FLIGHT = Gauge(
    "eta_ingestion_in_flight_events", "Events admitted and not yet answered (the in-flight budget in use)"
)
IN_FLIGHT_LIMIT = Gauge(
    "eta_ingestion_in_flight_limit", "The in-flight budget (INGESTION_MAX_IN_FLIGHT_EVENTS)"
)
BROKER_ERRORS = Counter(
    "eta_ingestion_broker_errors_total",
    "Events the broker did not acknowledge in time, by reason (timeout or the producer's error type)",
    ["reason"],
)
CALLS_REFUSED = Counter(
    "eta_ingestion_calls_refused_total",
    "Calls or stream chunks refused as a whole, by gRPC status code",
    ["code"],
)
STREAMS = Gauge("eta_ingestion_open_streams", "Open StreamEvents streams")
DEDUP_ERRORS = Counter(
    "eta_ingestion_dedup_errors_total",
    "Redis failures of the dedup store (dedup failed open: events treated as new)",
    ["operation"],
)
