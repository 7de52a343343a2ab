"""Model registry in PostgreSQL: model bytes + metrics per version, exactly one promoted version."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg

__all__ = ["RegisteredModel", "load_promoted", "promote", "promoted_version", "register_model"]


@dataclass(frozen=True)
class RegisteredModel:
    version: str
    feature_names: list[str]
    metrics: dict[str, Any]
    blob: bytes


async def register_model(
    conn: asyncpg.Connection,
    *,
    version: str,
    feature_names: Sequence[str],
    metrics: Mapping[str, Any],
    blob: bytes,
    promote_now: bool,
) -> None:
    async with conn.transaction():
        await conn.execute(
            "INSERT INTO models (version, feature_names, metrics, model_blob) "
            "VALUES ($1, $2::jsonb, $3::jsonb, $4)",
            version,
            json.dumps(list(feature_names)),
            json.dumps(metrics),
            blob,
        )
        if promote_now:
            await _promote(conn, version)


async def _promote(conn: asyncpg.Connection, version: str) -> None:
    await conn.execute("UPDATE models SET is_promoted = false WHERE is_promoted")
    await conn.execute(
        "UPDATE models SET is_promoted = true, promoted_at = now() WHERE version = $1", version
    )


async def promote(conn: asyncpg.Connection, version: str) -> None:
    async with conn.transaction():
        exists = await conn.fetchval("SELECT 1 FROM models WHERE version = $1", version)
        if not exists:
            raise LookupError(f"no model version {version!r}")
        await _promote(conn, version)


async def promoted_version(conn: asyncpg.Connection | asyncpg.Pool) -> str | None:
    value = await conn.fetchval("SELECT version FROM models WHERE is_promoted")
    return None if value is None else str(value)


async def load_promoted(conn: asyncpg.Connection | asyncpg.Pool) -> RegisteredModel | None:
    row = await conn.fetchrow(
        "SELECT version, feature_names, metrics, model_blob FROM models WHERE is_promoted"
    )
    if row is None:
        return None
    return RegisteredModel(
        str(row["version"]),
        list(json.loads(row["feature_names"])),
        dict(json.loads(row["metrics"])),
        bytes(row["model_blob"]),
    )
