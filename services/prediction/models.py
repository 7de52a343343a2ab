"""The model currently serving, hot-reloaded from the registry.

``ModelHolder.current`` is replaced by one reference assignment once a new model is fully loaded and
checked, so a request that took the reference keeps scoring with that model (its version in the reply
always matches the numbers) and no request ever sees a half-loaded model. Until a model is promoted the
service answers with the documented heuristic (``heuristic-v0``, see :class:`HeuristicModel`), flagged
``HEURISTIC_MODEL``; with ``PREDICTION_HEURISTIC_FALLBACK=false`` ``current`` stays ``None`` and the
service is NOT_SERVING until a model loads. A promoted model that cannot serve (unknown features, a
corrupt bundle) is refused once and the current model keeps serving.
"""

from __future__ import annotations

import asyncio
import logging
import time

import asyncpg

from eta_common.db.registry import load_promoted, promoted_version
from eta_common.model_bundle import load_bundle
from prediction import metrics
from prediction.inference import HeuristicModel, QuantileModel, ServingModel

__all__ = ["HeuristicModel", "ModelHolder", "QuantileModel", "ServingModel", "load_model"]

log = logging.getLogger(__name__)


def load_model(version: str, blob: bytes) -> QuantileModel:
    """Parse and check a registry bundle (CPU-bound: call it in a thread)."""
    return QuantileModel(load_bundle(version, blob))


class ModelHolder:
    def __init__(self, *, heuristic_fallback: bool = True) -> None:
        self.heuristic: HeuristicModel | None = HeuristicModel() if heuristic_fallback else None
        self.current: ServingModel | None = self.heuristic
        self._refused: str | None = None
        self._publish(self.current)

    def install(self, model: ServingModel) -> None:
        """Make ``model`` the serving model (atomic for every request that starts afterwards)."""
        self.current = model
        self._publish(model)

    def _publish(self, model: ServingModel | None) -> None:
        metrics.MODEL.info(
            {
                "version": model.version if model else "",
                "kind": "none" if model is None else ("heuristic" if model.is_heuristic else "lightgbm"),
            }
        )
        if model is not None and not model.is_heuristic:
            metrics.MODEL_LOADED_AT.set(time.time())

    async def refresh(self, pool: asyncpg.Pool) -> bool:
        """Load the promoted model if it changed. Returns True when a new model was installed."""
        version = await promoted_version(pool)
        current = self.current
        if version is None or version == self._refused:
            return False
        if current is not None and version == current.version:
            return False
        registered = await load_promoted(pool)
        if registered is None:
            return False
        try:
            model = await asyncio.to_thread(load_model, registered.version, registered.blob)
        except (ValueError, KeyError, RuntimeError) as exc:  # bad bundle / unknown features / LightGBM error
            self._refused = registered.version
            metrics.MODEL_LOADS.labels("refused").inc()
            log.error(
                "promoted model refused; keeping the current one",
                extra={"model_version": registered.version, "error": str(exc)},
            )
            return False
        self.install(model)
        metrics.MODEL_LOADS.labels("loaded").inc()
        log.info("model loaded", extra={"model_version": model.version, "fast_path": model.fast_path})
        return True

    async def refresh_forever(self, pool: asyncpg.Pool, every_seconds: float) -> None:
        while True:
            await asyncio.sleep(every_seconds)
            try:
                await self.refresh(pool)
            except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as exc:
                metrics.MODEL_LOADS.labels("registry_error").inc()
                log.warning("model refresh failed; keeping the current model", extra={"error": str(exc)})
