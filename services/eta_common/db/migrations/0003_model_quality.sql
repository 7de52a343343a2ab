-- Model quality (issue #5).
-- The simulator's oracle per order: the expected delivery time given the city's true hidden state at
-- placement (simulator/oracle.py), written by `eta-simulator seed` (and live mode when given a database).
-- The trainer reports the oracle's MAE on the same holdout orders: the irreducible noise floor.
CREATE TABLE IF NOT EXISTS simulation_oracle (
    order_id        text PRIMARY KEY,
    restaurant_id   text NOT NULL,
    placed_at       timestamptz NOT NULL,
    oracle_minutes  double precision NOT NULL,
    source          text NOT NULL DEFAULT 'seed' CHECK (source IN ('seed', 'live')),
    recorded_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS simulation_oracle_placed_idx ON simulation_oracle (placed_at);

-- The training report (markdown) next to the run's metrics.
ALTER TABLE training_runs ADD COLUMN IF NOT EXISTS report text;

-- Live accuracy reads the prediction log by time.
CREATE INDEX IF NOT EXISTS predictions_served_at_idx ON predictions (served_at);
