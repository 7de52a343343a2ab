"""Feature aggregation service: Kafka → online features in Redis + event history in PostgreSQL."""
