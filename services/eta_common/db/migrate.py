"""Apply the SQL migrations in ``eta_common/db/migrations`` in order, once each.

Safe to run from several processes at once (a PostgreSQL advisory lock serialises them). Usage::

    eta-migrate                 # DATABASE_URL from the environment
    eta-migrate --database-url postgresql://…
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from importlib import resources

import asyncpg

from eta_common.config import DatabaseSettings
from eta_common.logs import configure_logging

__all__ = ["apply_migrations", "main"]

log = logging.getLogger(__name__)
_LOCK_ID = 0x45_54_41_4D  # "ETAM"


def _migration_files() -> list[tuple[str, str]]:
    folder = resources.files("eta_common.db") / "migrations"
    return sorted(
        (entry.name, entry.read_text()) for entry in folder.iterdir() if entry.name.endswith(".sql")
    )


async def apply_migrations(database_url: str) -> list[str]:
    """Apply pending migrations; returns the names applied now."""
    conn = await asyncpg.connect(database_url)
    applied_now: list[str] = []
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_ID)
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {row["name"] for row in await conn.fetch("SELECT name FROM schema_migrations")}
        for name, sql in _migration_files():
            if name in done:
                continue
            async with conn.transaction():
                await conn.execute(sql)
                await conn.execute("INSERT INTO schema_migrations (name) VALUES ($1)", name)
            applied_now.append(name)
            log.info("applied migration", extra={"migration": name})
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_ID)
        await conn.close()
    return applied_now


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="eta-migrate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--database-url", default=None, help=f"default: $DATABASE_URL or {DatabaseSettings.url}"
    )
    args = parser.parse_args(argv)
    configure_logging("eta-migrate")
    url = args.database_url or DatabaseSettings.from_env().url
    applied = asyncio.run(apply_migrations(url))
    log.info("migrations up to date", extra={"applied": applied})


if __name__ == "__main__":
    main()
