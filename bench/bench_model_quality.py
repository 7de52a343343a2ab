"""ETA model quality on a simulated month: the model against the restaurant-mean baseline, the
distance/speed baseline and the simulator's oracle (the noise floor), on the most recent 20 % of orders.

Setup (all real, on this machine): an embedded PostgreSQL; ``eta-simulator seed`` writes 30 days of the
default city (20 restaurants, 60 drivers, seed 42) ending 2025-03-31 00:00 UTC, with each delivered
order's oracle; ``eta-trainer`` builds the point-in-time training set, fits the p10/p50/p90 LightGBM
models with the conformally calibrated range and scores the holdout. ``--quick``: 14 days (two of
each weekday, so the holdout's hours of the week have been seen in training).

Targets (issue #5): model MAE ≤ 1.1 × oracle MAE and ≤ 0.7 × restaurant-mean MAE; p10–p90 coverage
80 % ± 3.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.result import BenchResult
from devstack.infra import start_postgres
from simulator.city import CityConfig
from simulator.seed import seed_history
from trainer.run import train_and_register

NAME = "model_quality"
END_MS = 1_743_379_200_000  # 2025-03-31 00:00 UTC (a Monday)


def _row(what: str, scores: dict[str, Any]) -> dict[str, Any]:
    return {
        "predictor": what,
        "MAE min": scores["mae"],
        "p90 |err| min": scores["p90_abs_error"],
        "p10-p90 coverage": "-" if scores.get("coverage") is None else f"{100 * scores['coverage']:.1f}%",
        "rows": scores["rows"],
    }


async def _run(quick: bool) -> BenchResult:
    days = 14.0 if quick else 30.0
    workdir = Path(tempfile.mkdtemp(prefix="bench-model-"))
    server = await asyncio.to_thread(start_postgres, workdir / "pgdata", workdir / "logs")
    try:
        started = time.perf_counter()
        stats = await seed_history(server.url, CityConfig(), days=days, end_ms=END_MS, progress=False)
        seed_s = time.perf_counter() - started
        started = time.perf_counter()
        summary = await train_and_register(
            server.url, history_days=days, as_of_ms=END_MS, report_dir=workdir / "report", version="v-bench"
        )
        train_s = time.perf_counter() - started
        report = (workdir / "report" / "report.md").read_text()
    finally:
        await asyncio.to_thread(server.stop)
        shutil.rmtree(workdir, ignore_errors=True)
    m = summary["metrics"]
    model, oracle = m["model"], m["oracle"]
    restaurant, distance = m["baseline_restaurant_mean"], m["baseline_distance"]
    ratio = model["mae"] / restaurant["mae"]
    vs_oracle = m["ratios"]["mae_vs_oracle"]
    return BenchResult(
        name=NAME if not quick else f"{NAME}_quick",
        baseline="restaurant's mean delivery time over the training period (same holdout)",
        rows=[
            _row("model (LightGBM p50, calibrated p10-p90)", model),
            _row("baseline: restaurant mean", restaurant),
            _row("baseline: distance/speed", distance),
            _row("oracle (true hidden state)", oracle),
            _row("model, raw p10-p90 (no calibration)", m["model_raw_range"]),
        ],
        figures={
            "days": days,
            "rows_train": float(summary["rows_train"]),
            "rows_holdout": float(summary["rows_holdout"]),
            "model_mae": model["mae"],
            "baseline_mae": restaurant["mae"],
            "ratio": ratio,
            "distance_baseline_mae": distance["mae"],
            "oracle_mae": oracle["mae"],
            "mae_vs_oracle": vs_oracle,
            "model_p90_abs_error": model["p90_abs_error"],
            "coverage": model["coverage"],
            "raw_coverage": m["model_raw_range"]["coverage"],
            "seed_s": seed_s,
            "dataset_s": m["timings"]["dataset_s"],
            "fit_s": m["timings"]["fit_s"],
            "train_total_s": train_s,
            "events": float(stats.events_generated),
        },
        notes=[
            "targets: ratio (model/restaurant-mean MAE) <= 0.7, mae_vs_oracle <= 1.1, coverage 0.80 +- 0.03",
            f"targets met: ratio {'yes' if ratio <= 0.7 else 'NO'}, "
            f"oracle {'yes' if vs_oracle <= 1.1 else 'NO'}, "
            f"coverage {'yes' if abs(model['coverage'] - 0.8) <= 0.03 else 'NO'}",
            "feature importance (p50, gain): "
            + ", ".join(
                f"{k} {v / max(sum(m['importance_gain'].values()), 1e-9):.0%}"
                for k, v in sorted(m["importance_gain"].items(), key=lambda kv: -kv[1])
            ),
            f"report: {len(report.splitlines())} lines of markdown "
            "(eta-trainer --report-dir writes it with the plots)",
        ],
    )


def run(quick: bool = False) -> BenchResult:
    return asyncio.run(_run(quick))
