-- The prediction log stores the model's inputs as two arrays (names, values; NaN = the model saw the
-- feature as missing) and the supply's as-of instant, written with a binary COPY: the serving process
-- packs numbers instead of formatting a JSON document per prediction (~10 µs of its CPU a row less), and
-- PostgreSQL parses no JSON on the way in. Rows logged before keep their `features` document.
-- prediction_features(p) is every row's document, `{name: value or null, "@free_drivers_within_3km": ms}`
-- (the key is eta_common.features.SUPPLY_AS_OF_LOG_KEY): the contract the consistency check reads.
-- Catalogue changes only (nullable columns without default, a NOT NULL dropped): no table rewrite.
ALTER TABLE predictions ALTER COLUMN features DROP NOT NULL;
ALTER TABLE predictions ADD COLUMN IF NOT EXISTS feature_names text[];
ALTER TABLE predictions ADD COLUMN IF NOT EXISTS feature_values double precision[];
ALTER TABLE predictions ADD COLUMN IF NOT EXISTS supply_as_of_ms bigint;

CREATE OR REPLACE FUNCTION prediction_features(p predictions) RETURNS jsonb
LANGUAGE sql STABLE PARALLEL SAFE AS $$
  SELECT CASE
    WHEN p.features IS NOT NULL THEN p.features
    ELSE coalesce(
           (SELECT jsonb_object_agg(u.name, CASE WHEN u.value = 'NaN'::float8 THEN NULL ELSE to_jsonb(u.value) END)
            FROM unnest(p.feature_names, p.feature_values) AS u(name, value)),
           '{}'::jsonb)
         || CASE WHEN p.supply_as_of_ms IS NULL THEN '{}'::jsonb
                 ELSE jsonb_build_object('@free_drivers_within_3km', p.supply_as_of_ms) END
  END
$$;
