"""The model currently serving, hot-reloaded from the registry.

Until a model is promoted the service answers with a documented heuristic (``heuristic-v0``:
10 min + 2.5 min per km + 2 min per order in the kitchen, range ±35 %), flagged by its version.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

import asyncpg
import numpy as np
import numpy.typing as npt

from eta_common import features as F
from eta_common.db.registry import load_promoted, promoted_version
from eta_common.model_bundle import load_bundle

log = logging.getLogger(__name__)
Array = npt.NDArray[np.float64]


class Model(Protocol):
    version: str
    feature_names: list[str]

    def predict(self, rows: Array) -> tuple[Array, Array, Array]: ...


class HeuristicModel:
    version = "heuristic-v0"
    feature_names = list(F.FEATURE_NAMES)

    def predict(self, rows: Array) -> tuple[Array, Array, Array]:
        distance = rows[:, self.feature_names.index(F.DISTANCE_KM)]
        kitchen = np.nan_to_num(rows[:, self.feature_names.index(F.ORDERS_IN_KITCHEN)])
        point = 10.0 + 2.5 * distance + 2.0 * kitchen
        return point, point * 0.65, point * 1.35


class ModelHolder:
    """Holds the serving model; ``current`` is swapped atomically (one reference assignment)."""

    def __init__(self) -> None:
        self.current: Model = HeuristicModel()

    async def refresh(self, pool: asyncpg.Pool) -> bool:
        """Load the promoted model if it changed. Returns True when a new model was installed."""
        version = await promoted_version(pool)
        if version is None or version == self.current.version:
            return False
        registered = await load_promoted(pool)
        if registered is None:
            return False
        model = await asyncio.to_thread(load_bundle, registered.version, registered.blob)
        self.current = model
        log.info("model loaded", extra={"model_version": model.version})
        return True

    async def refresh_forever(self, pool: asyncpg.Pool, every_seconds: float) -> None:
        while True:
            await asyncio.sleep(every_seconds)
            try:
                await self.refresh(pool)
            except (asyncpg.PostgresError, OSError, ValueError) as exc:
                log.warning("model refresh failed; keeping the current model", extra={"error": str(exc)})
