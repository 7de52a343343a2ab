-- Per-customer history features (eta_common/customer_features.py): the hourly batch refresh reads the
-- last 28 days of order placements by event time and joins their deliveries by order id. Partial indexes:
-- only order PLACED / DELIVERED rows pay for them (not driver pings, kitchen or other order events), and
-- they carry the columns the refresh reads, so it can answer from the indexes.
-- (Plain CREATE INDEX: migrations run in a transaction. It blocks archive inserts while it builds, once.)
CREATE INDEX IF NOT EXISTS events_order_placed_idx ON events (event_time)
    INCLUDE (order_id, customer_id, ingest_time)
    WHERE kind = 'order' AND type = 'PLACED';
CREATE INDEX IF NOT EXISTS events_order_delivered_idx ON events (order_id)
    INCLUDE (event_time, ingest_time)
    WHERE kind = 'order' AND type = 'DELIVERED';
