"""Synthetic training sets for the trainer's unit tests."""

from __future__ import annotations

import numpy as np

from eta_common import features as F
from trainer.dataset import TrainingSet

T0 = 1_740_787_200_000  # 2025-03-01 00:00 UTC


def synthetic(n: int, *, seed: int = 0, start_ms: int = T0) -> TrainingSet:
    """Delivery minutes = 12 + 3 × distance + 2 × kitchen load + noise that grows with distance."""
    rng = np.random.default_rng(seed)
    names = list(F.FEATURE_NAMES)
    X = np.zeros((n, len(names)))
    distance = rng.uniform(0.5, 7.0, n)
    kitchen = rng.integers(0, 8, n).astype(float)
    placed = np.sort(start_ms + rng.integers(0, 14 * 86_400_000, n)).astype(np.int64)
    X[:, names.index(F.DISTANCE_KM)] = distance
    X[:, names.index(F.ORDERS_IN_KITCHEN)] = kitchen
    X[:, names.index(F.HOUR_OF_WEEK)] = [F.hour_of_week(int(p)) for p in placed]
    X[:, names.index(F.NUM_ORDERS_30.name)] = rng.poisson(2.0, n)
    y = 12.0 + 3.0 * distance + 2.0 * kitchen + rng.normal(0.0, 1.0 + 0.8 * distance)
    restaurants = [f"r{int(i)}" for i in rng.integers(0, 5, n)]
    return TrainingSet(names, X, y, placed, restaurants, [f"o{i}" for i in range(n)])
