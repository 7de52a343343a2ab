"""One Redis client, the online store's scripts loaded on it, and pipelines of one round trip."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError

from eta_common.online.scripts import SCRIPT_NAMES, script_source

__all__ = ["Pipelines"]


class Pipelines:
    """Scripts are loaded once (``SCRIPT LOAD``) and called by SHA inside plain pipelines, so an update
    batch or a feature read is exactly one round trip; if Redis lost its script cache (restart,
    ``SCRIPT FLUSH``) the scripts are reloaded and the pipeline retried once."""

    def __init__(self, client: aioredis.Redis) -> None:
        self.client = client
        self._sha: dict[str, str] = {}

    async def close(self) -> None:
        await self.client.aclose()

    async def _load_scripts(self) -> None:
        # Publish the whole table at once: a concurrent _run() must never see it half loaded.
        self._sha = {name: str(await self.client.script_load(script_source(name))) for name in SCRIPT_NAMES}

    async def _run(self, build: Callable[[Any], None], *, scripts: bool = True) -> list[Any]:
        """Build a pipeline with ``build(pipe)`` and execute it (one round trip). ``scripts=False``: the
        pipeline calls no script (reads), so none are loaded first."""
        if scripts and not self._sha:
            await self._load_scripts()
        for attempt in (1, 2):
            pipe = self.client.pipeline(transaction=False)
            build(pipe)
            try:
                return list(await pipe.execute())
            except NoScriptError:
                if attempt == 2 or not scripts:
                    raise
                await self._load_scripts()
        raise AssertionError("unreachable")
