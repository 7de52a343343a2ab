-- When the aggregator's Redis update for the event became visible (NULL: no online effect, e.g. late).
-- The online/offline consistency check uses it to know what the online store could have seen.
ALTER TABLE events ADD COLUMN IF NOT EXISTS applied_at timestamptz;
CREATE INDEX IF NOT EXISTS events_ingest_time_idx ON events (ingest_time);
