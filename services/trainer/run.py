"""One training run: history → training set → calibrated quantile models → holdout evaluation → registry.

1. The training set is built from the PostgreSQL history of the last ``history_days`` before ``as_of``
   (default now), point-in-time correct (:mod:`trainer.dataset`).
2. Time-ordered split: the most recent ``holdout_fraction`` of orders is the holdout; everything before
   trains the p10/p50/p90 models and calibrates the range (:mod:`trainer.train`).
3. The holdout scores the model exactly as it will serve (the bundle is dumped and re-loaded), the two
   baselines and the simulator's oracle (:mod:`trainer.evaluate`); a report is written
   (:mod:`trainer.report`).
4. The run, its metrics, the report and the model bytes go to the registry. The new version is promoted
   only if it passes the promotion gate (:mod:`trainer.gate`: it beats both baselines on its holdout and
   its range coverage is not far off) and, when a model is promoted already, its holdout MAE beats that
   model's MAE on the same holdout rows — or when forced. A first model that fails the gate is not
   promoted either: the prediction service keeps answering with its heuristic. The prediction service
   polls the registry and hot-reloads it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import numpy as np

from eta_common.db.migrate import apply_migrations
from eta_common.db.registry import load_promoted, register_model
from eta_common.model_bundle import QUANTILES, dump_bundle, load_bundle
from eta_common.timeutil import now_ms
from trainer.dataset import TrainingSet, load_oracle, load_training_set
from trainer.evaluate import (
    Prediction,
    distance_baseline,
    errors_by_hour,
    quantile_calibration,
    restaurant_mean_baseline,
)
from trainer.gate import PromotionGate, check_gate
from trainer.train import ROUNDS, fit_calibrated_models

__all__ = ["MIN_ROWS", "PromotionGate", "TrainingOptions", "train_and_register"]

log = logging.getLogger("trainer")

MIN_ROWS = 200


@dataclass(frozen=True)
class TrainingOptions:
    history_days: float = 28.0
    holdout_fraction: float = 0.2
    force_promote: bool = False
    rounds: int = ROUNDS
    folds: int = 5  # time blocks for the conformal calibration of the range
    as_of_ms: int | None = None  # end of the history used (default: now)
    report_dir: Path | None = None
    version: str | None = None  # default: v<UTC timestamp>
    gate: PromotionGate = field(default_factory=PromotionGate)


async def train_and_register(
    database_url: str,
    *,
    history_days: float = 28.0,
    holdout_fraction: float = 0.2,
    force_promote: bool = False,
    rounds: int = ROUNDS,
    folds: int = 5,
    as_of_ms: int | None = None,
    report_dir: Path | None = None,
    version: str | None = None,
    gate: PromotionGate | None = None,
) -> dict[str, Any]:
    """The whole training run; returns its summary (also stored in ``training_runs``)."""
    options = TrainingOptions(
        history_days=history_days,
        holdout_fraction=holdout_fraction,
        force_promote=force_promote,
        rounds=rounds,
        folds=folds,
        as_of_ms=as_of_ms,
        report_dir=report_dir,
        version=version,
        gate=gate or PromotionGate(),
    )
    await apply_migrations(database_url)
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    try:
        run_id = await pool.fetchval("INSERT INTO training_runs (status) VALUES ('running') RETURNING id")
        try:
            summary, report = await _train(pool, options)
        except Exception as exc:
            await pool.execute(
                "UPDATE training_runs SET status='failed', finished_at=now(), message=$2 WHERE id=$1",
                run_id,
                str(exc),
            )
            raise
        summary["run_id"] = run_id
        await pool.execute(
            "UPDATE training_runs SET status='succeeded', finished_at=now(), rows_train=$2, rows_holdout=$3, "
            "model_version=$4, promoted=$5, metrics=$6::jsonb, report=$7, message=$8 WHERE id=$1",
            run_id,
            summary["rows_train"],
            summary["rows_holdout"],
            summary["version"],
            summary["promoted"],
            json.dumps(_finite(summary["metrics"])),
            report,
            summary["promotion_reason"],
        )
        return summary
    finally:
        await pool.close()


async def _train(pool: asyncpg.Pool, options: TrainingOptions) -> tuple[dict[str, Any], str]:
    timings: dict[str, float] = {}
    started = time.perf_counter()
    until = options.as_of_ms if options.as_of_ms is not None else now_ms()
    since = until - int(options.history_days * 86_400_000)
    data = await load_training_set(pool, since_ms=since, until_ms=until)
    timings["dataset_s"] = time.perf_counter() - started
    if len(data) < MIN_ROWS:
        raise RuntimeError(
            f"only {len(data)} delivered orders in the {options.history_days:g} days before "
            f"{_iso(until)}; need {MIN_ROWS}"
        )
    train, holdout = data.split(options.holdout_fraction)
    log.info(
        "training",
        extra={"rows_train": len(train), "rows_holdout": len(holdout), "rounds": options.rounds},
    )
    t0 = time.perf_counter()
    boosters, calibration = await asyncio.to_thread(
        fit_calibrated_models, train, rounds=options.rounds, folds=options.folds
    )
    timings["fit_s"] = time.perf_counter() - t0
    version = options.version or await _new_version(pool)
    blob = dump_bundle(train.feature_names, boosters)
    model = load_bundle(version, blob)  # score exactly what will serve
    point, low, high = model.predict(holdout.X)
    raw_low = low + calibration.low_offset
    raw_high = high - calibration.high_offset
    oracle = await load_oracle(pool, holdout.order_ids)
    has_oracle = ~np.isnan(oracle)

    predictions = {
        "model": Prediction(point, low, high),
        "baseline_restaurant_mean": restaurant_mean_baseline(train, holdout),
        "baseline_distance": distance_baseline(train, holdout),
    }
    metrics: dict[str, Any] = {name: pred.score(holdout.y).as_dict() for name, pred in predictions.items()}
    metrics["model_raw_range"] = Prediction(point, raw_low, raw_high).score(holdout.y).as_dict()
    if has_oracle.any():
        oracle_pred = Prediction(np.where(has_oracle, oracle, 0.0))
        metrics["oracle"] = oracle_pred.score(holdout.y, has_oracle).as_dict()
        metrics["model_on_oracle_rows"] = predictions["model"].score(holdout.y, has_oracle).as_dict()
        if has_oracle.all():  # the hourly plot compares on all rows
            predictions["oracle"] = oracle_pred
    model_mae = metrics["model"]["mae"]
    ratios = {"mae_vs_restaurant_mean": model_mae / metrics["baseline_restaurant_mean"]["mae"]}
    ratios["mae_vs_distance"] = model_mae / metrics["baseline_distance"]["mae"]
    if "oracle" in metrics:
        ratios["mae_vs_oracle"] = metrics["model_on_oracle_rows"]["mae"] / metrics["oracle"]["mae"]
    metrics["ratios"] = ratios
    metrics["calibration"] = {
        **calibration.as_dict(),
        "holdout": quantile_calibration(holdout.y, low, point, high),
        "holdout_raw": quantile_calibration(holdout.y, raw_low, point, raw_high),
    }
    metrics["rows_train"] = len(train)
    metrics["rows_holdout"] = len(holdout)
    metrics["rows_oracle"] = int(has_oracle.sum())
    metrics["period"] = {
        "since": _iso(since),
        "until": _iso(until),
        "holdout_from": _iso(int(holdout.placed_ms.min())),
    }
    metrics["quantiles"] = list(QUANTILES)
    metrics["feature_names"] = train.feature_names
    metrics["importance_gain"] = {
        name: float(gain)
        for name, gain in zip(
            train.feature_names,
            boosters[0.5].feature_importance(importance_type="gain"),
            strict=True,
        )
    }

    promote, reason = await _promotion(pool, options, train, holdout, model_mae, metrics)
    hourly = errors_by_hour(holdout.y, holdout.placed_ms, predictions)
    timings["total_s"] = time.perf_counter() - started
    metrics["timings"] = timings
    from trainer.report import write_report

    report = await asyncio.to_thread(
        write_report,
        options.report_dir,
        version=version,
        metrics=metrics,
        hourly=hourly,
        promoted=promote,
        promotion_reason=reason,
    )
    async with pool.acquire() as conn:
        await register_model(
            conn,
            version=version,
            feature_names=train.feature_names,
            metrics=_finite(metrics),
            blob=blob,
            promote_now=promote,
        )
    log.log(
        logging.INFO if promote else logging.WARNING,
        "model registered" if promote else "model registered, not promoted",
        extra={"model_version": version, "promoted": promote, "reason": reason, "ratios": ratios},
    )
    summary: dict[str, Any] = {
        "version": version,
        "promoted": promote,
        "promotion_reason": reason,
        "metrics": metrics,
        "rows_train": len(train),
        "rows_holdout": len(holdout),
        "report_dir": str(options.report_dir) if options.report_dir else None,
    }
    return summary, report


async def _promotion(
    pool: asyncpg.Pool,
    options: TrainingOptions,
    train: TrainingSet,
    holdout: TrainingSet,
    model_mae: float,
    metrics: dict[str, Any],
) -> tuple[bool, str]:
    """Promote when forced, or when the model passes the gate and either nothing is promoted yet or its
    MAE beats the incumbent's on the same holdout rows (an incumbent that cannot score these rows —
    unknown features, bad bundle — loses)."""
    verdict = check_gate(metrics, options.gate)
    metrics["gate"] = verdict.as_dict()
    gate = verdict.reason()
    current = await load_promoted(pool)
    if current is None:
        if options.force_promote:
            return True, f"forced; no model promoted yet; {gate}"
        if not verdict.passed:
            return False, f"no model promoted yet, and this one {gate}"
        return True, f"no model promoted yet; {gate}"
    try:
        incumbent = load_bundle(current.version, current.blob)
        columns = [train.feature_names.index(n) for n in incumbent.feature_names]
        inc_point, inc_low, inc_high = incumbent.predict(np.ascontiguousarray(holdout.X[:, columns]))
    except (ValueError, KeyError, RuntimeError) as exc:
        log.warning("promoted model unusable for comparison", extra={"error": str(exc)})
        metrics["incumbent"] = {"version": current.version, "error": str(exc)}
        unusable = f"promoted model {current.version} cannot score the holdout ({exc})"
        if options.force_promote or verdict.passed:
            return True, f"{'forced; ' if options.force_promote else ''}{unusable}; {gate}"
        return False, f"{unusable}, but this one {gate}"
    scores = Prediction(inc_point, inc_low, inc_high).score(holdout.y)
    metrics["incumbent"] = {"version": current.version, **scores.as_dict()}
    better = model_mae < scores.mae
    comparison = f"holdout MAE {model_mae:.3f} vs promoted {current.version} {scores.mae:.3f}"
    if options.force_promote:
        return True, f"forced ({comparison}); {gate}"
    if not better:
        return False, f"not better: {comparison}" + ("" if verdict.passed else f"; it also {gate}")
    if not verdict.passed:
        return False, f"better than {current.version} ({comparison}), but it {gate}"
    return True, f"better: {comparison}; {gate}"


async def _new_version(pool: asyncpg.Pool) -> str:
    base = "v" + datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    taken = {
        r["version"] for r in await pool.fetch("SELECT version FROM models WHERE version LIKE $1", base + "%")
    }
    if base not in taken:
        return base
    n = 2
    while f"{base}-{n}" in taken:
        n += 1
    return f"{base}-{n}"


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="seconds")


def _finite(value: Any) -> Any:
    """JSON for PostgreSQL jsonb: NaN / inf become null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value
