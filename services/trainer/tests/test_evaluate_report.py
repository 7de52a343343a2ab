from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from trainer.evaluate import (
    Prediction,
    distance_baseline,
    errors_by_hour,
    quantile_calibration,
    restaurant_mean_baseline,
    score,
)
from trainer.report import render_markdown, write_report
from trainer.tests.support import synthetic


def test_score() -> None:
    y = np.array([10.0, 20.0, 30.0, 40.0])
    s = score(y, np.array([12.0, 20.0, 25.0, 40.0]), np.array([9.0, 21.0, 20.0, 35.0]), np.full(4, 35.0))
    assert s.mae == pytest.approx(7 / 4)
    assert s.bias == pytest.approx((2 + 0 - 5 + 0) / 4)
    assert s.coverage == pytest.approx(2 / 4)  # 10 in [9, 35], 30 in [20, 35]; 20 < 21; 40 > 35
    assert s.p90_abs_error == pytest.approx(np.quantile([2, 0, 5, 0], 0.9))
    assert score(y, y).coverage is None
    assert score(np.array([]), np.array([])).rows == 0


def test_baselines_use_the_training_period_only() -> None:
    data = synthetic(2000)
    train, holdout = data.split(0.25)
    assert train.placed_ms.max() <= holdout.placed_ms.min()
    rm = restaurant_mean_baseline(train, holdout)
    r0 = [y for rid, y in zip(train.restaurant_ids, train.y, strict=True) if rid == "r0"]
    i = holdout.restaurant_ids.index("r0")
    assert rm.point[i] == pytest.approx(np.mean(r0))
    assert rm.low is not None
    assert rm.high is not None
    assert rm.low[i] == pytest.approx(np.quantile(r0, 0.1))
    assert rm.high[i] == pytest.approx(np.quantile(r0, 0.9))
    dist = distance_baseline(train, holdout)
    d = holdout.column("distance_km")
    slope = (dist.point[1] - dist.point[0]) / (d[1] - d[0])
    assert slope == pytest.approx(3.0, abs=0.3)  # the synthetic city's 3 min per km
    assert dist.score(holdout.y).mae < rm.score(holdout.y).mae  # distance explains more here
    assert dist.score(holdout.y).coverage == pytest.approx(0.8, abs=0.06)


def test_errors_by_hour_and_calibration() -> None:
    hours = np.array([0, 1, 1, 5], dtype=np.int64) * 3_600_000 + 1_740_787_200_000
    y = np.array([10.0, 20.0, 30.0, 40.0])
    pred = Prediction(np.array([11.0, 22.0, 30.0, 30.0]), y - 1, y + 1)
    hourly = errors_by_hour(y, hours, {"model": pred})
    assert hourly.rows[:6] == [1, 2, 0, 0, 0, 1]
    assert hourly.mae["model"][0] == 1.0
    assert hourly.mae["model"][1] == 1.0
    assert hourly.mae["model"][5] == 10.0
    assert np.isnan(hourly.mae["model"][2])
    assert hourly.coverage["model"][1] == 1.0
    cal = quantile_calibration(y, y - 1, y + np.array([1.0, -1.0, 1.0, 1.0]), y + 1)
    assert cal == {"below_p10": 0.0, "below_p50": 0.75, "below_p90": 1.0}


METRICS = {
    "rows_train": 800,
    "rows_holdout": 200,
    "rows_oracle": 200,
    "period": {"since": "2025-03-01", "until": "2025-03-31", "holdout_from": "2025-03-25"},
    "model": {"mae": 6.6, "p90_abs_error": 14.0, "coverage": 0.815, "bias": -0.1, "rows": 200},
    "model_raw_range": {"mae": 6.6, "p90_abs_error": 14.0, "coverage": 0.75, "bias": -0.1, "rows": 200},
    "baseline_restaurant_mean": {
        "mae": 9.0,
        "p90_abs_error": 17.5,
        "coverage": 0.83,
        "bias": 0.8,
        "rows": 200,
    },
    "baseline_distance": {"mae": 9.0, "p90_abs_error": 17.0, "coverage": 0.82, "bias": 0.8, "rows": 200},
    "oracle": {"mae": 5.4, "p90_abs_error": 11.6, "coverage": None, "bias": -0.2, "rows": 200},
    "ratios": {"mae_vs_restaurant_mean": 0.73, "mae_vs_oracle": 1.22},
    "calibration": {
        "method": "cross-conformal CQR, 5 time blocks",
        "rows": 800,
        "low_offset_minutes": 0.9,
        "high_offset_minutes": 1.9,
        "raw_coverage_out_of_fold": 0.74,
        "coverage_out_of_fold": 0.8,
        "holdout": {"below_p10": 0.107, "below_p50": 0.536, "below_p90": 0.922},
        "holdout_raw": {"below_p10": 0.138, "below_p50": 0.536, "below_p90": 0.892},
    },
    "importance_gain": {"distance_km": 3.0, "hour_of_week": 1.0},
    "timings": {"dataset_s": 5.0, "fit_s": 8.0},
}


def test_report_markdown_and_plots(tmp_path: Path) -> None:
    text = render_markdown(
        version="v1", metrics=METRICS, promoted=False, promotion_reason="not better", plots=False
    )
    assert "| model (LightGBM p50, range p10–p90) | 6.60 | 14.00 | 81.5 % |" in text
    assert "| oracle (true hidden state) | 5.40 | 11.60 | – |" in text
    assert "**Promoted: no** — not better." in text
    assert "oracle 1.220" in text
    assert "`distance_km`: 75.0 %" in text
    assert "png" not in text
    y = np.linspace(20, 60, 48)
    placed = (np.arange(48) % 24).astype(np.int64) * 3_600_000 + 1_740_787_200_000
    hourly = errors_by_hour(
        y, placed, {"model": Prediction(y + 1, y - 5, y + 5), "oracle": Prediction(y - 1)}
    )
    written = write_report(
        tmp_path / "r", version="v1", metrics=METRICS, hourly=hourly, promoted=True, promotion_reason="better"
    )
    assert (tmp_path / "r" / "report.md").read_text() == written
    assert "![Calibration of the range](calibration.png)" in written
    for name in ("error_by_hour.png", "calibration.png"):
        assert (tmp_path / "r" / name).read_bytes()[:4] == b"\x89PNG"
