"""The online store's Lua scripts, read from ``lua/*.lua`` (package data) once per process."""

from __future__ import annotations

import functools
from importlib import resources

__all__ = ["SCRIPT_NAMES", "script_source"]

SCRIPT_NAMES = ("apply_restaurant", "apply_city", "claim_due", "publish_progress", "finish_rebuild")


@functools.cache
def script_source(name: str) -> str:
    if name not in SCRIPT_NAMES:
        raise KeyError(f"no online-store script {name!r}")
    return (resources.files("eta_common.online") / "lua" / f"{name}.lua").read_text(encoding="utf-8")
