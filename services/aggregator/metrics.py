"""Prometheus metrics of the aggregator."""

from prometheus_client import Counter, Gauge, Histogram

from eta_common.bulk_histogram import BulkHistogram

_LAG_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)

RECORDS = Counter(
    "eta_aggregator_records_total", "Consumed records by topic and outcome", ["topic", "outcome"]
)
LATE_EVENTS = Counter(
    "eta_aggregator_late_events_total", "Events past the allowed lateness (archived, not applied)", ["kind"]
)
# Observed per record, a whole batch per call (see eta_common.bulk_histogram).
INGEST_TO_VISIBLE = BulkHistogram(
    "eta_aggregator_ingest_to_visible_seconds",
    "From ingestion ack time to the feature update being visible in Redis",
    buckets=_LAG_BUCKETS,
)
BATCH_SECONDS = Histogram(
    "eta_aggregator_batch_seconds", "Processing time of one consumed batch", ["stage"], buckets=_LAG_BUCKETS
)
REDIS_RETRIES = Counter(
    "eta_aggregator_redis_retries_total", "Online-store batch applications that failed and were retried"
)
ARCHIVE_RETRIES = Counter("eta_aggregator_archive_retries_total", "PostgreSQL archive attempts that failed")
ARCHIVED = Counter("eta_aggregator_archived_events_total", "Events newly written to the PostgreSQL archive")
ARCHIVE_PENDING = Gauge("eta_aggregator_archive_pending_batches", "Processed batches waiting to be archived")
REBUILDS = Counter("eta_aggregator_rebuilds_total", "Online-store rebuilds from the archive", ["trigger"])
ROWS_MATERIALIZED = Counter(
    "eta_aggregator_rows_materialized_total",
    "Ready rows written outside the update path: by the row timer (a window edge passed) or the supply "
    "refresher (free-driver counts)",
    ["by"],
)
ROW_TIMER_SECONDS = Histogram(
    "eta_aggregator_row_timer_seconds", "Re-materialising one claim of due rows", buckets=_LAG_BUCKETS
)
SUPPLY_REFRESH_SECONDS = Histogram(
    "eta_aggregator_supply_refresh_seconds", "One supply refresh (count + write)", buckets=_LAG_BUCKETS
)
STORE_CURRENT_AGE = Gauge(
    "eta_aggregator_store_current_age_seconds",
    "Seconds since every live aggregator was last caught up with the event stream (what serving adds to "
    "an unchanged feature's age)",
)
