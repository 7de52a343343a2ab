-- Raw event history (the offline store). One row per event_id: re-delivery is a no-op.
CREATE TABLE IF NOT EXISTS events (
    event_id         text PRIMARY KEY,
    kind             text NOT NULL CHECK (kind IN ('driver', 'kitchen', 'order')),
    type             text NOT NULL,
    event_time       timestamptz NOT NULL,
    ingest_time      timestamptz NOT NULL,
    restaurant_id    text,
    driver_id        text,
    order_id         text,
    customer_id      text,
    lat              double precision,
    lng              double precision,
    customer_lat     double precision,
    customer_lng     double precision,
    payload          bytea NOT NULL,
    kafka_topic      text,
    kafka_partition  integer,
    kafka_offset     bigint,
    archived_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS events_event_time_idx ON events (event_time);
CREATE INDEX IF NOT EXISTS events_restaurant_time_idx ON events (restaurant_id, event_time);
CREATE INDEX IF NOT EXISTS events_order_idx ON events (order_id);

-- Model registry: versions, their metrics and bytes, and which one serves.
CREATE TABLE IF NOT EXISTS models (
    version        text PRIMARY KEY,
    created_at     timestamptz NOT NULL DEFAULT now(),
    feature_names  jsonb NOT NULL,
    metrics        jsonb NOT NULL,
    model_blob     bytea NOT NULL,
    is_promoted    boolean NOT NULL DEFAULT false,
    promoted_at    timestamptz
);
CREATE UNIQUE INDEX IF NOT EXISTS models_one_promoted_idx ON models (is_promoted) WHERE is_promoted;

-- Training runs (also the failed ones).
CREATE TABLE IF NOT EXISTS training_runs (
    id             bigserial PRIMARY KEY,
    started_at     timestamptz NOT NULL DEFAULT now(),
    finished_at    timestamptz,
    status         text NOT NULL,
    rows_train     integer,
    rows_holdout   integer,
    model_version  text REFERENCES models (version),
    promoted       boolean NOT NULL DEFAULT false,
    metrics        jsonb,
    message        text
);

-- Served predictions with the features they used (for live accuracy and online/offline checks).
CREATE TABLE IF NOT EXISTS predictions (
    id               bigserial PRIMARY KEY,
    served_at        timestamptz NOT NULL,
    request_id       text,
    restaurant_id    text NOT NULL,
    model_version    text NOT NULL,
    eta_minutes      double precision NOT NULL,
    eta_low_minutes  double precision NOT NULL,
    eta_high_minutes double precision NOT NULL,
    feature_quality  text NOT NULL,
    features         jsonb NOT NULL
);
CREATE INDEX IF NOT EXISTS predictions_request_idx ON predictions (request_id);
