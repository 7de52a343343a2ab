"""Holdout metrics for a model, the simple baselines it must beat, and the simulator's oracle.

Every predictor is scored on the same holdout rows with the same :class:`Scores`: MAE, the 90th percentile
of the absolute error, and the coverage of its range (share of actual times inside ``[low, high]``).

Baselines (fitted on the training period only):

* **restaurant mean** — the restaurant's mean delivery time in the training period (the global mean for a
  restaurant never seen); its range is the restaurant's own p10–p90 of delivery times;
* **distance/speed** — ``a + b × distance_km`` by least squares (a fixed overhead plus the distance at an
  average effective speed); its range adds the p10/p90 of the training residuals.

The **oracle** (``simulation_oracle``, from the simulator) is the expected delivery time given the true
hidden state at placement: its MAE on the holdout is the noise floor no model can beat.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from eta_common import features as F
from trainer.dataset import TrainingSet

__all__ = [
    "HourlyErrors",
    "Prediction",
    "Scores",
    "distance_baseline",
    "errors_by_hour",
    "quantile_calibration",
    "restaurant_mean_baseline",
    "score",
]

Array = npt.NDArray[np.float64]


@dataclass(frozen=True)
class Scores:
    mae: float
    p90_abs_error: float
    coverage: float | None  # share of actual times inside [low, high]
    bias: float = 0.0  # mean(prediction - actual)
    rows: int = 0

    def as_dict(self) -> dict[str, float | int | None]:
        return {
            "mae": self.mae,
            "p90_abs_error": self.p90_abs_error,
            "coverage": self.coverage,
            "bias": self.bias,
            "rows": self.rows,
        }


@dataclass(frozen=True)
class Prediction:
    """A predictor's answers on the holdout: a point and optionally a range."""

    point: Array
    low: Array | None = None
    high: Array | None = None

    def score(self, y: Array, mask: npt.NDArray[np.bool_] | None = None) -> Scores:
        if mask is None:
            return score(y, self.point, self.low, self.high)
        return score(
            y[mask],
            self.point[mask],
            None if self.low is None else self.low[mask],
            None if self.high is None else self.high[mask],
        )


def score(y: Array, point: Array, low: Array | None = None, high: Array | None = None) -> Scores:
    if len(y) == 0:
        return Scores(float("nan"), float("nan"), None, float("nan"), 0)
    err = np.abs(y - point)
    coverage = None if low is None or high is None else float(np.mean((y >= low) & (y <= high)))
    return Scores(
        float(np.mean(err)), float(np.quantile(err, 0.9)), coverage, float(np.mean(point - y)), len(y)
    )


def restaurant_mean_baseline(train: TrainingSet, holdout: TrainingSet) -> Prediction:
    """Each restaurant's mean delivery time in the training period (global mean for unseen ones), with
    its own p10–p90 of delivery times as the range."""
    by_restaurant: dict[str, list[float]] = defaultdict(list)
    for rid, minutes in zip(train.restaurant_ids, train.y, strict=True):
        by_restaurant[rid].append(float(minutes))
    overall = (float(np.mean(train.y)), *np.quantile(train.y, [0.1, 0.9]))
    stats = {rid: (float(np.mean(v)), *np.quantile(v, [0.1, 0.9])) for rid, v in by_restaurant.items() if v}
    rows = np.array([stats.get(rid, overall) for rid in holdout.restaurant_ids], dtype=np.float64)
    rows = rows.reshape(len(holdout), 3)
    return Prediction(rows[:, 0], rows[:, 1], rows[:, 2])


def distance_baseline(train: TrainingSet, holdout: TrainingSet) -> Prediction:
    """Least-squares ``minutes = a + b × distance_km`` on the training period; range from the p10/p90 of
    its training residuals."""
    d_train = train.column(F.DISTANCE_KM)
    a_matrix = np.vstack([np.ones(len(train)), d_train]).T
    coef, *_ = np.linalg.lstsq(a_matrix, train.y, rcond=None)
    residuals = train.y - (coef[0] + coef[1] * d_train)
    r10, r90 = np.quantile(residuals, [0.1, 0.9])
    point = np.asarray(coef[0] + coef[1] * holdout.column(F.DISTANCE_KM), dtype=np.float64)
    return Prediction(point, point + r10, point + r90)


@dataclass(frozen=True)
class HourlyErrors:
    """MAE per UTC hour of placement (NaN where the hour has no rows) for several predictors."""

    hours: list[int]
    rows: list[int]
    mae: dict[str, list[float]]
    coverage: dict[str, list[float]]


def errors_by_hour(
    y: Array, placed_ms: npt.NDArray[np.int64], predictions: dict[str, Prediction]
) -> HourlyErrors:
    hour = (placed_ms // 3_600_000) % 24
    hours = list(range(24))
    rows = [int(np.sum(hour == h)) for h in hours]
    mae: dict[str, list[float]] = {}
    coverage: dict[str, list[float]] = {}
    for name, pred in predictions.items():
        mae[name] = [
            float(np.mean(np.abs(y[hour == h] - pred.point[hour == h]))) if n else float("nan")
            for h, n in zip(hours, rows, strict=True)
        ]
        if pred.low is not None and pred.high is not None:
            inside = (y >= pred.low) & (y <= pred.high)
            coverage[name] = [
                float(np.mean(inside[hour == h])) if n else float("nan")
                for h, n in zip(hours, rows, strict=True)
            ]
    return HourlyErrors(hours, rows, mae, coverage)


def quantile_calibration(y: Array, low: Array, point: Array, high: Array) -> dict[str, float]:
    """Observed share of actual times below each predicted quantile (ideal: 0.10, 0.50, 0.90)."""
    return {
        "below_p10": float(np.mean(y < low)),
        "below_p50": float(np.mean(y < point)),
        "below_p90": float(np.mean(y < high)),
    }
