-- The customer a prediction was for (when the request named one), so the consistency check can compare
-- the served customer history features with their offline recomputation.
ALTER TABLE predictions ADD COLUMN IF NOT EXISTS customer_id text;
