"""Seed mode: simulate the history that ends at ``end_ms`` as fast as possible and archive it in
PostgreSQL's ``events`` table (the offline store the trainer reads), exactly as the aggregator would
have archived it: one row per event, ``ingest_time`` = event time + 50–500 ms. Every delivered order's
oracle goes into ``simulation_oracle`` (see :mod:`simulator.oracle_store`).

Generation runs in a worker thread while the previous batch is written, so the CPU-bound simulation and
PostgreSQL's COPY overlap. Re-running with the same seed and end time writes nothing new (the event ids
are the same and the archive ignores known ids).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import time
from collections.abc import Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import asyncpg

from eta.v1 import events_pb2
from eta_common.db.archive import ArchivedEvent, archive_events
from eta_common.db.migrate import apply_migrations
from simulator.city import DAY_MS, CityConfig
from simulator.engine import OrderOutcome
from simulator.markets import Platform
from simulator.messages import event_ms
from simulator.oracle_store import store_oracle
from simulator.progress import ProgressLine

__all__ = ["SeedStats", "seed_history", "write_history"]

log = logging.getLogger(__name__)

Sink = Callable[[Sequence[ArchivedEvent]], Coroutine[Any, Any, int]]
OracleSink = Callable[[Sequence[OrderOutcome]], Coroutine[Any, Any, int]]
INGEST_DELAY_MS = (50, 500)


@dataclass(frozen=True)
class SeedStats:
    start_ms: int
    end_ms: int
    events_generated: int
    events_written: int  # new rows (0 for events already archived)
    orders_placed: int
    orders_delivered: int
    orders_cancelled: int
    seconds: float
    outcomes: list[OrderOutcome] = field(default_factory=list, repr=False)
    oracle_written: int = 0  # new simulation_oracle rows

    @property
    def events_per_second(self) -> float:
        return self.events_generated / self.seconds if self.seconds > 0 else 0.0


async def seed_history(
    database_url: str,
    config: CityConfig | Sequence[CityConfig],
    *,
    days: float,
    end_ms: int,
    progress: bool = True,
    batch_size: int = 5000,
    on_outcome: Callable[[OrderOutcome], None] | None = None,
) -> SeedStats:
    """Apply the migrations, then simulate ``days`` of history ending at ``end_ms`` into ``events`` (and
    each delivered order's oracle into ``simulation_oracle``)."""
    applied = await apply_migrations(database_url)
    if applied:
        log.info("migrations applied", extra={"applied": applied})
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    try:

        async def sink(items: Sequence[ArchivedEvent]) -> int:
            return await archive_events(pool, items)

        async def oracle_sink(outcomes: Sequence[OrderOutcome]) -> int:
            return await store_oracle(pool, outcomes, source="seed")

        return await write_history(
            sink,
            config,
            days=days,
            end_ms=end_ms,
            progress=progress,
            batch_size=batch_size,
            on_outcome=on_outcome,
            oracle_sink=oracle_sink,
        )
    finally:
        await pool.close()


async def write_history(
    sink: Sink,
    config: CityConfig | Sequence[CityConfig],
    *,
    days: float,
    end_ms: int,
    progress: bool = True,
    batch_size: int = 5000,
    on_outcome: Callable[[OrderOutcome], None] | None = None,
    oracle_sink: OracleSink | None = None,
) -> SeedStats:
    """The storage-independent part of :func:`seed_history`: batches of archived events go to ``sink``,
    the outcomes (with their oracle) of the orders delivered meanwhile to ``oracle_sink``. Several
    configurations are several markets at once (:mod:`simulator.markets`), merged in event-time order."""
    if days <= 0:
        raise ValueError("days must be > 0")
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    start_ms = end_ms - round(days * DAY_MS)
    configs = [config] if isinstance(config, CityConfig) else list(config)
    sim = Platform(configs, start_ms=start_ms)
    stream = sim.run_until(end_ms)
    delay_rng = random.Random(f"eta-ingest-delay:{configs[0].seed}")
    display = ProgressLine(enabled=progress)
    started = time.perf_counter()
    generated = written = oracle_written = 0
    outcomes_seen = 0
    last_ms = sim.start_ms

    def next_batch() -> list[ArchivedEvent]:
        nonlocal last_ms
        batch: list[ArchivedEvent] = []
        for event in _take(stream, batch_size):
            ms = event_ms(event)
            batch.append(ArchivedEvent(event, ms + delay_rng.randint(*INGEST_DELAY_MS)))
            last_ms = ms
        return batch

    def line() -> str:
        elapsed = max(time.perf_counter() - started, 1e-9)
        day = (last_ms - sim.start_ms) / DAY_MS
        when = datetime.fromtimestamp(last_ms / 1000, UTC).strftime("%Y-%m-%d %H:%M")
        return (
            f"seed: day {day:4.2f}/{days:g} ({when} UTC)  events {generated:,} generated, {written:,} written"
            f"  {generated / elapsed:,.0f} events/s"
        )

    log.info(
        "seeding history",
        extra={
            "start": datetime.fromtimestamp(sim.start_ms / 1000, UTC).isoformat(),
            "end": datetime.fromtimestamp(end_ms / 1000, UTC).isoformat(),
            "markets": [c.market or "(default)" for c in configs],
            "restaurants": sim.restaurants,
            "drivers": sim.fleet_size,
            "seed": configs[0].seed,
        },
    )
    writing: asyncio.Task[int] | None = None
    try:
        while True:
            batch = await asyncio.to_thread(next_batch)  # overlaps with the write in flight
            if writing is not None:
                written += await writing
                writing = None
            fresh = sim.outcomes[outcomes_seen:]
            outcomes_seen = len(sim.outcomes)
            if on_outcome is not None:
                for outcome in fresh:
                    on_outcome(outcome)
            if oracle_sink is not None and fresh:
                oracle_written += await oracle_sink(fresh)
            if not batch:
                break
            generated += len(batch)
            writing = asyncio.create_task(sink(batch))
            display.update(line())
    finally:
        if writing is not None and not writing.done():
            writing.cancel()
    seconds = time.perf_counter() - started
    display.finish(line())
    c = sim.counters
    stats = SeedStats(
        start_ms=sim.start_ms,
        end_ms=end_ms,
        events_generated=generated,
        events_written=written,
        orders_placed=c.orders_placed,
        orders_delivered=c.orders_delivered,
        orders_cancelled=c.orders_cancelled,
        seconds=seconds,
        outcomes=list(sim.outcomes),
        oracle_written=oracle_written,
    )
    log.info(
        "history seeded",
        extra={
            "events": generated,
            "written": written,
            "seconds": round(seconds, 2),
            "events_per_second": round(stats.events_per_second),
            "orders_delivered": c.orders_delivered,
        },
    )
    return stats


def _take(stream: Iterator[events_pb2.Event], n: int) -> Iterator[events_pb2.Event]:
    return itertools.islice(stream, n)
