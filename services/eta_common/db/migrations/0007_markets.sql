-- Markets (cities): the market each archived event was sent with (the event's market_id; NULL when it
-- named none, i.e. the default market, ETA_DEFAULT_MARKET) and the market each served prediction was for.
-- The offline builder, the trainer and the consistency check keep city-wide state per market from it.
-- Nullable and without default: adding it is a catalogue change only (no table rewrite).
ALTER TABLE events ADD COLUMN IF NOT EXISTS market_id text;
ALTER TABLE predictions ADD COLUMN IF NOT EXISTS market_id text;
