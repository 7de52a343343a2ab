"""Keeps the ready rows exact and their supply counts fresh (see :mod:`eta_common.online.rows`).

Two loops, both safe to run in every aggregator replica at once:

* **row timer** — every ``AGGREGATOR_ROW_TICK_MS`` it claims the rows whose ``valid_until`` is within
  ``AGGREGATOR_ROW_LOOKAHEAD_MS`` (a leased claim per due bucket, so replicas split the work and a dead
  replica's claims come back) and computes each one's next row as of that edge, ahead of time: a quiet
  restaurant's windows drain by themselves, and readers find the drained row valid from the edge's
  millisecond on. A timer that lags more than the lookahead costs speed (reads fall back to the exact
  read, counted by the prediction service), never correctness.
* **progress** — once a second it says when this aggregator last had every event it fetched visible
  (:class:`aggregator.consumer.Progress`); the store keeps the oldest such instant among live
  aggregators, which reads take as "current as of" for the features fed by the event stream.
* **supply refresher** — every ``AGGREGATOR_SUPPLY_REFRESH_SECONDS`` it counts the free drivers near the
  restaurants of the buckets it holds (one GEOSEARCH around them, counted with Redis' own arithmetic) into
  their rows; the count's age is its as-of time, held to the feature's staleness budget (60 s). A count
  equal to the row's is written again only once it is ``AGGREGATOR_SUPPLY_RESTAMP_SECONDS`` old (each
  write invalidates the row in every serving replica's client-side cache).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time

from redis.exceptions import RedisError

from aggregator import metrics
from aggregator.consumer import Progress
from eta_common.online_store import OnlineStore
from eta_common.timeutil import now_ms

__all__ = ["RowMaintenance"]

log = logging.getLogger(__name__)

CLAIM_LIMIT = 500  # rows claimed per bucket per claim
MAX_CLAIMS_PER_TICK = 8  # then the tick yields (more due rows wait for the next tick)


class RowMaintenance:
    def __init__(
        self,
        store: OnlineStore,
        *,
        tick_ms: int,
        supply_refresh_seconds: float,
        supply_restamp_seconds: float = 0.0,
        lookahead_ms: int = 2000,
        progress: Progress | None = None,
    ) -> None:
        self._store = store
        self._progress = progress
        self._published_at = 0.0
        self._tick = tick_ms / 1000.0
        self._lookahead_ms = lookahead_ms
        self._lease_ms = max(1000, 10 * tick_ms)
        self._supply_every = supply_refresh_seconds
        self._restamp_ms = int(supply_restamp_seconds * 1000)
        self._owner = f"{socket.gethostname()}-{os.getpid()}"

    async def tick(self) -> int:
        """Compute the next row of every row due within the lookahead, in every market; returns how many."""
        done = 0
        for market in await self._store.markets():
            for _ in range(MAX_CLAIMS_PER_TICK):
                horizon = now_ms() + self._lookahead_ms
                due = await self._store.claim_due(
                    now_ms=horizon, lease_ms=self._lease_ms, limit=CLAIM_LIMIT, market=market
                )
                if not due:
                    break
                started = time.perf_counter()
                await self._store.materialize(
                    due, now_ms=now_ms(), lookahead_ms=self._lookahead_ms, market=market
                )
                metrics.ROWS_MATERIALIZED.labels("timer").inc(len(due))
                metrics.ROW_TIMER_SECONDS.observe(time.perf_counter() - started)
                done += len(due)
        return done

    async def publish_progress(self) -> None:
        """Once a second: when this aggregator was last current (see aggregator.consumer.Progress)."""
        progress = self._progress
        if progress is None or progress.caught_up_ms is None or time.monotonic() - self._published_at < 1.0:
            return
        self._published_at = time.monotonic()
        current = await self._store.publish_progress(self._owner, progress.caught_up_ms, now_ms=now_ms())
        if current is not None:
            metrics.STORE_CURRENT_AGE.set(max(0.0, (now_ms() - current) / 1000.0))

    async def run_timer(self) -> None:
        while True:
            try:
                await self.publish_progress()
                await self.tick()
            except (RedisError, OSError) as exc:  # Redis outage: the consumer loop waits it out too
                log.warning("row timer: Redis unavailable, retrying", extra={"error": str(exc)})
                await asyncio.sleep(1.0)
            await asyncio.sleep(self._tick)

    async def refresh_supply(self) -> int:
        """Recount the supply of every market's restaurants this replica holds the buckets of."""
        hold_ms = int(self._supply_every * 1000 * 0.9)
        written = 0
        for market in await self._store.markets():
            started = time.perf_counter()
            count = await self._store.refresh_supply(
                now_ms=now_ms(),
                owner=self._owner,
                hold_ms=hold_ms,
                market=market,
                restamp_ms=self._restamp_ms,
            )
            if count:
                metrics.SUPPLY_REFRESH_SECONDS.observe(time.perf_counter() - started)
                metrics.ROWS_MATERIALIZED.labels("supply").inc(count)
            written += count
        return written

    async def run_supply(self) -> None:
        while True:
            try:
                await self.refresh_supply()
            except (RedisError, OSError) as exc:
                log.warning("supply refresh: Redis unavailable, retrying", extra={"error": str(exc)})
            await asyncio.sleep(self._supply_every)
