"""Train ETA models from the PostgreSQL history and register them.

Builds a point-in-time-correct training set (features as of each order's placement, via the shared
feature definitions), trains LightGBM quantile models (p10/p50/p90) on the older orders, evaluates on
the most recent ones against two baselines (restaurant mean, distance fit), stores the run, metrics and
model bytes in the registry, and promotes the new version if it beats the promoted one on the same
holdout (or with --force-promote). Exit code 0 also when the model was registered but not promoted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from datetime import UTC, datetime

import asyncpg

from eta_common.config import DatabaseSettings, env_float
from eta_common.db.migrate import apply_migrations
from eta_common.db.registry import load_promoted, register_model
from eta_common.logs import configure_logging
from eta_common.model_bundle import dump_bundle, load_bundle
from eta_common.timeutil import now_ms
from trainer.dataset import load_training_set
from trainer.evaluate import distance_baseline, restaurant_mean_baseline, score
from trainer.train import fit_quantile_models

log = logging.getLogger("trainer")

MIN_ROWS = 200


async def train_and_register(
    database_url: str,
    *,
    history_days: float,
    holdout_fraction: float = 0.2,
    force_promote: bool = False,
    rounds: int = 300,
) -> dict[str, object]:
    """The whole training run; returns its summary (also stored in ``training_runs``)."""
    await apply_migrations(database_url)
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    try:
        run_id = await pool.fetchval("INSERT INTO training_runs (status) VALUES ('running') RETURNING id")
        try:
            summary = await _train(
                pool,
                history_days=history_days,
                holdout_fraction=holdout_fraction,
                force_promote=force_promote,
                rounds=rounds,
            )
        except Exception as exc:
            await pool.execute(
                "UPDATE training_runs SET status='failed', finished_at=now(), message=$2 WHERE id=$1",
                run_id,
                str(exc),
            )
            raise
        await pool.execute(
            "UPDATE training_runs SET status='succeeded', finished_at=now(), rows_train=$2, rows_holdout=$3, "
            "model_version=$4, promoted=$5, metrics=$6::jsonb WHERE id=$1",
            run_id,
            summary["rows_train"],
            summary["rows_holdout"],
            summary["version"],
            summary["promoted"],
            json.dumps(summary["metrics"]),
        )
        return summary
    finally:
        await pool.close()


async def _train(
    pool: asyncpg.Pool, *, history_days: float, holdout_fraction: float, force_promote: bool, rounds: int
) -> dict[str, object]:
    data = await load_training_set(pool, since_ms=now_ms() - int(history_days * 86_400_000))
    if len(data) < MIN_ROWS:
        raise RuntimeError(
            f"only {len(data)} delivered orders in the last {history_days} days; need {MIN_ROWS}"
        )
    train, holdout = data.split(holdout_fraction)
    log.info("training", extra={"rows_train": len(train), "rows_holdout": len(holdout), "rounds": rounds})
    boosters = await asyncio.to_thread(fit_quantile_models, train, rounds=rounds)
    version = "v" + datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    blob = dump_bundle(train.feature_names, boosters)
    model = load_bundle(version, blob)
    point, low, high = model.predict(holdout.X)
    metrics: dict[str, object] = {
        "model": score(holdout.y, point, low, high).as_dict(),
        "baseline_restaurant_mean": score(holdout.y, restaurant_mean_baseline(train, holdout)).as_dict(),
        "baseline_distance": score(holdout.y, distance_baseline(train, holdout)).as_dict(),
        "rows_train": len(train),
        "rows_holdout": len(holdout),
    }
    promote = force_promote
    current = await load_promoted(pool)
    if current is None:
        promote = True
    else:
        try:
            incumbent = load_bundle(current.version, current.blob)
            columns = [train.feature_names.index(n) for n in incumbent.feature_names]
            inc_point, inc_low, inc_high = incumbent.predict(holdout.X[:, columns])
            incumbent_scores = score(holdout.y, inc_point, inc_low, inc_high)
            metrics["incumbent"] = {"version": current.version, **incumbent_scores.as_dict()}
            promote = promote or score(holdout.y, point).mae < incumbent_scores.mae
        except (ValueError, KeyError) as exc:
            log.warning(
                "promoted model unusable for comparison; promoting the new one", extra={"error": str(exc)}
            )
            promote = True
    async with pool.acquire() as conn:
        await register_model(
            conn,
            version=version,
            feature_names=train.feature_names,
            metrics=metrics,
            blob=blob,
            promote_now=promote,
        )
    log.info("model registered", extra={"model_version": version, "promoted": promote, "metrics": metrics})
    return {
        "version": version,
        "promoted": promote,
        "metrics": metrics,
        "rows_train": len(train),
        "rows_holdout": len(holdout),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="eta-trainer", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--database-url",
        default=None,
        help=f"PostgreSQL URL (default: $DATABASE_URL or {DatabaseSettings.url})",
    )
    parser.add_argument(
        "--history-days",
        type=float,
        default=env_float("TRAINER_HISTORY_DAYS", 28.0),
        help="how much history to train on (default: $TRAINER_HISTORY_DAYS or 28)",
    )
    parser.add_argument(
        "--holdout-fraction",
        type=float,
        default=0.2,
        help="most recent share of orders held out for evaluation (default: 0.2)",
    )
    parser.add_argument(
        "--rounds", type=int, default=300, help="boosting rounds per quantile model (default: 300)"
    )
    parser.add_argument(
        "--force-promote", action="store_true", help="promote even if not better than the current"
    )
    args = parser.parse_args(argv)
    configure_logging("eta-trainer")
    url = args.database_url or DatabaseSettings.from_env().url
    try:
        summary = asyncio.run(
            train_and_register(
                url,
                history_days=args.history_days,
                holdout_fraction=args.holdout_fraction,
                force_promote=args.force_promote,
                rounds=args.rounds,
            )
        )
    except RuntimeError as exc:
        log.error("training failed", extra={"error": str(exc)})
        sys.exit(1)
    sys.stdout.write(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
