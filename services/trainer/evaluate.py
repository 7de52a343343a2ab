"""Holdout metrics for a model and for the simple baselines it must beat."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from eta_common import features as F
from trainer.dataset import TrainingSet

Array = npt.NDArray[np.float64]


@dataclass(frozen=True)
class Scores:
    mae: float
    p90_abs_error: float
    coverage: float | None  # share of actual times inside [low, high]

    def as_dict(self) -> dict[str, float | None]:
        return {"mae": self.mae, "p90_abs_error": self.p90_abs_error, "coverage": self.coverage}


def score(y: Array, point: Array, low: Array | None = None, high: Array | None = None) -> Scores:
    err = np.abs(y - point)
    coverage = None if low is None or high is None else float(np.mean((y >= low) & (y <= high)))
    return Scores(float(np.mean(err)), float(np.quantile(err, 0.9)), coverage)


def restaurant_mean_baseline(train: TrainingSet, holdout: TrainingSet) -> Array:
    """Each restaurant's mean delivery time in the training period (global mean for unseen ones)."""
    sums: dict[str, list[float]] = defaultdict(list)
    for rid, minutes in zip(train.restaurant_ids, train.y, strict=True):
        sums[rid].append(float(minutes))
    overall = float(np.mean(train.y))
    return np.array([np.mean(sums[rid]) if rid in sums else overall for rid in holdout.restaurant_ids])


def distance_baseline(train: TrainingSet, holdout: TrainingSet) -> Array:
    """Least-squares fit of minutes = a + b * distance_km on the training period."""
    col = train.feature_names.index(F.DISTANCE_KM)
    a_matrix = np.vstack([np.ones(len(train)), train.X[:, col]]).T
    coef, *_ = np.linalg.lstsq(a_matrix, train.y, rcond=None)
    return np.asarray(coef[0] + coef[1] * holdout.X[:, holdout.feature_names.index(F.DISTANCE_KM)])
