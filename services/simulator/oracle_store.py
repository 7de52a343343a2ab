"""The oracle in PostgreSQL: one ``simulation_oracle`` row per delivered order (migration 0003).

The trainer joins it to its holdout to report the oracle's MAE (the noise floor). Writing is idempotent
(``ON CONFLICT (order_id) DO NOTHING``): re-seeding the same history writes nothing new.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence

import asyncpg

from eta_common.db.migrate import apply_migrations
from eta_common.timeutil import datetime_from_ms
from simulator.engine import OrderOutcome

__all__ = ["OracleWriter", "store_oracle"]

log = logging.getLogger(__name__)

_COLUMNS = ("order_id", "restaurant_id", "placed_at", "oracle_minutes", "source")


async def store_oracle(
    conn: asyncpg.Connection | asyncpg.Pool, outcomes: Sequence[OrderOutcome], *, source: str = "seed"
) -> int:
    """Insert the oracle of ``outcomes``; returns the number of new rows."""
    if not outcomes:
        return 0
    rows = [
        (o.order_id, o.restaurant_id, datetime_from_ms(o.placed_ms), float(o.oracle_minutes), source)
        for o in outcomes
    ]
    acquire = conn.acquire() if isinstance(conn, asyncpg.Pool) else contextlib.nullcontext(conn)
    async with acquire as c, c.transaction():
        await c.execute(
            "CREATE TEMP TABLE IF NOT EXISTS simulation_oracle_incoming "
            "(LIKE simulation_oracle INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
        )
        await c.copy_records_to_table("simulation_oracle_incoming", records=rows, columns=list(_COLUMNS))
        status = await c.execute(
            "INSERT INTO simulation_oracle (order_id, restaurant_id, placed_at, oracle_minutes, source) "
            "SELECT DISTINCT ON (order_id) order_id, restaurant_id, placed_at, oracle_minutes, source "
            "FROM simulation_oracle_incoming ORDER BY order_id ON CONFLICT (order_id) DO NOTHING"
        )
    return int(status.rsplit(" ", 1)[-1])


class OracleWriter:
    """Live mode's oracle sink: outcomes are buffered and written every ``flush_interval_s`` in the
    background. The database is optional for a live city: a failure is logged and the rows are kept for
    the next attempt (at most ``max_buffer``; beyond that the oldest are dropped and counted)."""

    def __init__(self, database_url: str, *, flush_interval_s: float = 2.0, max_buffer: int = 50_000) -> None:
        self._url = database_url
        self._interval = flush_interval_s
        self._max_buffer = max_buffer
        self._buffer: list[OrderOutcome] = []
        self._pool: asyncpg.Pool | None = None
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self.written = 0
        self.dropped = 0
        self.errors = 0

    def add(self, outcome: OrderOutcome) -> None:
        self._buffer.append(outcome)
        if len(self._buffer) > self._max_buffer:
            excess = len(self._buffer) - self._max_buffer
            del self._buffer[:excess]
            self.dropped += excess

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="oracle-writer")

    async def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self._interval)
            await self.flush()

    async def flush(self) -> None:
        if not self._buffer:
            return
        batch, self._buffer = self._buffer, []
        try:
            if self._pool is None:
                await apply_migrations(self._url)
                self._pool = await asyncpg.create_pool(self._url, min_size=1, max_size=1)
            self.written += await store_oracle(self._pool, batch, source="live")
        except (TimeoutError, OSError, asyncpg.PostgresError) as exc:
            self.errors += 1
            self._buffer[:0] = batch
            log.warning("oracle not stored; will retry", extra={"error": str(exc), "rows": len(batch)})

    async def close(self) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task
        await self.flush()
        if self._pool is not None:
            await self._pool.close()
