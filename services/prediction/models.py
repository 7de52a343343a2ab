"""The model currently serving, hot-reloaded from the registry.

``ModelHolder.current`` is replaced by one reference assignment once a new model is fully loaded and
checked, so a request that took the reference keeps scoring with that model (its version in the reply
always matches the numbers) and no request ever sees a half-loaded model. Until a model is promoted the
service answers with the documented heuristic (``heuristic-v0``, see :class:`HeuristicModel`), flagged
``HEURISTIC_MODEL``; with ``PREDICTION_HEURISTIC_FALLBACK=false`` ``current`` stays ``None`` and the
service is NOT_SERVING until a model loads. A promoted model that cannot serve (unknown features, a
corrupt bundle) is refused once and the current model keeps serving.

A new model goes live as soon as it is parsed and checked, on LightGBM's fast path (well under a second);
its trees are then compiled (``PREDICTION_MODEL_COMPILE``, seconds per model unless
``PREDICTION_MODEL_CACHE_DIR`` has it) in a worker thread while it serves, and it switches to the compiled
scorer on the event-loop thread, between two requests. So compiling never delays a promotion or the
start, and a compile that fails only leaves the model on the fast path.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import asyncpg

from eta_common.db.registry import load_promoted, promoted_version
from eta_common.model_bundle import load_bundle
from prediction import metrics
from prediction.inference import HeuristicModel, QuantileModel, ServingModel

__all__ = ["HeuristicModel", "ModelHolder", "QuantileModel", "ServingModel", "load_model"]

log = logging.getLogger(__name__)


def load_model(
    version: str, blob: bytes, *, compile_trees: bool = True, cache_dir: str | Path | None = None
) -> QuantileModel:
    """Parse, compile (``compile_trees``, object files cached in ``cache_dir`` when set) and check a
    registry bundle. CPU-bound, seconds when compiling: call it in a thread."""
    return QuantileModel(load_bundle(version, blob), compile_trees=compile_trees, cache_dir=cache_dir or None)


class ModelHolder:
    def __init__(
        self, *, heuristic_fallback: bool = True, compile_trees: bool = True, cache_dir: str = ""
    ) -> None:
        """``compile_trees`` / ``cache_dir``: ``PREDICTION_MODEL_COMPILE`` / ``PREDICTION_MODEL_CACHE_DIR``
        (see :mod:`prediction.config`): whether :meth:`compile_current` compiles, and where to cache."""
        self._compile_trees = compile_trees
        self._cache_dir = cache_dir
        self._compile_tried: QuantileModel | None = None
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
                # compiled | fast | booster (see prediction.inference); "" for the heuristic
                "scorer": model.scorer if isinstance(model, QuantileModel) else "",
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
            # off the event loop; not compiled yet (that takes seconds): see compile_current
            model = await asyncio.to_thread(
                load_model, registered.version, registered.blob, compile_trees=False
            )
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
        log.info(
            "model loaded",
            extra={
                "model_version": model.version,
                "scorer": model.scorer,
                "fast_path": model.fast_path,
                "compile_pending": self._compile_trees,
            },
        )
        return True

    async def compile_current(self) -> None:
        """Compile the serving model's trees in a worker thread (it keeps serving meanwhile) and switch it
        to the compiled scorer here, on the event-loop thread that scores. Once per model; a failure is
        logged and the model stays on its current scorer."""
        model = self.current
        if not self._compile_trees or not isinstance(model, QuantileModel) or model is self._compile_tried:
            return
        self._compile_tried = model
        if model.scorer == "compiled":
            return
        try:
            compiled = await asyncio.to_thread(model.compile, self._cache_dir or None)
        except RuntimeError as exc:  # no thread to run it in (shutting down)
            log.warning("model not compiled", extra={"model_version": model.version, "error": str(exc)})
            return
        if compiled is None:
            return  # compile() logged why
        model.use(compiled)
        if self.current is model:
            self._publish(model)
        log.info(
            "model compiled",
            extra={
                "model_version": model.version,
                "scorer": model.scorer,
                "compile_seconds": round(model.compile_seconds, 3),
                "compiled_from_cache": model.compiled_from_cache,
                "serving": self.current is model,
            },
        )

    async def refresh_forever(self, pool: asyncpg.Pool, every_seconds: float) -> None:
        while True:
            await self.compile_current()  # the model loaded at start or by the last refresh
            await asyncio.sleep(every_seconds)
            try:
                await self.refresh(pool)
            except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as exc:
                metrics.MODEL_LOADS.labels("registry_error").inc()
                log.warning("model refresh failed; keeping the current model", extra={"error": str(exc)})
