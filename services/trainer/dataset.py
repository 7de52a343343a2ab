"""Training set from the event archive, point-in-time correct via the shared offline feature builder.

One row per order PLACED in ``[since, until)`` and DELIVERED later (cancelled orders have no label).
Its features are the values the online store would have served at the order's placement time ``t``:
the archive is replayed in the order the online path saw it (ingest time) through
:class:`eta_common.offline_features.OfflineFeatureBuilder` — the same definitions as the aggregator — and
each row is read just before the first event ingested after ``t``. So a row never sees an event ingested
after ``t`` (an event that happened before ``t`` but arrived later included), nor one that arrived later
than the allowed lateness (ignored online too); windows count event times in ``(t − W, t]``.

State features need the events before the first row (a driver who went ONLINE in the morning is still
free at noon): the replay starts ``warmup`` before ``since``; rows are made only from ``since`` on.
The customer's batch history features are those of the hourly refresh at or before ``t``
(:class:`eta_common.customer_features.CustomerHistory`: events archived by that boundary only).
The label is DELIVERED − PLACED in minutes, by event time (a label is from the future by design).
Markets: each row is in its order's market (``events.market_id`` of the PLACED event; empty = default), and
its city-wide features (free drivers, dispatch backlog) are that market's only, as online.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import asyncpg
import numpy as np
import numpy.typing as npt

from eta_common import customer_features as CF
from eta_common import features as F
from eta_common.customer_features import load_customer_history
from eta_common.offline_features import FeatureQuery, HistoryEvent, OfflineFeatureBuilder
from eta_common.timeutil import datetime_from_ms

__all__ = ["DEFAULT_WARMUP_MS", "TrainingSet", "load_oracle", "load_training_set"]

log = logging.getLogger(__name__)

# Replay this much history before the first row: longer than every window, the kitchen TTL (3 h) and a
# driver's shift, so the state at the first row is what the online store had.
DEFAULT_WARMUP_MS = 24 * 3_600_000

_EVENTS_SQL = """
SELECT kind, type, (extract(epoch FROM event_time) * 1000)::bigint AS event_ms,
       (extract(epoch FROM ingest_time) * 1000)::bigint AS ingest_ms,
       restaurant_id, driver_id, order_id, lat, lng, customer_lat, customer_lng, customer_id,
       coalesce(market_id, '') AS market_id
FROM events
WHERE event_time >= $1 AND event_time < $2
ORDER BY ingest_time, event_id
"""

_ORACLE_SQL = "SELECT order_id, oracle_minutes FROM simulation_oracle WHERE order_id = ANY($1::text[])"


@dataclass
class TrainingSet:
    feature_names: list[str]
    X: npt.NDArray[np.float64]
    y: npt.NDArray[np.float64]  # delivery minutes (DELIVERED - PLACED)
    placed_ms: npt.NDArray[np.int64]
    restaurant_ids: list[str]
    order_ids: list[str] = field(default_factory=list)
    markets: list[str] = field(default_factory=list)  # each row's market ('' = the default market)

    def __len__(self) -> int:
        return len(self.y)

    def column(self, name: str) -> npt.NDArray[np.float64]:
        return self.X[:, self.feature_names.index(name)]

    def split(self, holdout_fraction: float) -> tuple[TrainingSet, TrainingSet]:
        """Time-ordered split: the most recent ``holdout_fraction`` of orders (by placement) is second."""
        if not 0 < holdout_fraction < 1:
            raise ValueError("holdout_fraction must be in (0, 1)")
        order = np.argsort(self.placed_ms, kind="stable")
        cut = int(len(order) * (1 - holdout_fraction))
        return self.take(order[:cut]), self.take(order[cut:])

    def take(self, idx: npt.NDArray[np.intp]) -> TrainingSet:
        return TrainingSet(
            self.feature_names,
            self.X[idx],
            self.y[idx],
            self.placed_ms[idx],
            [self.restaurant_ids[i] for i in idx],
            [self.order_ids[i] for i in idx] if self.order_ids else [],
            [self.markets[i] for i in idx] if self.markets else [],
        )


async def load_training_set(
    pool: asyncpg.Pool | asyncpg.Connection,
    *,
    since_ms: int,
    until_ms: int | None = None,
    allowed_lateness_ms: int = F.DEFAULT_ALLOWED_LATENESS_MS,
    warmup_ms: int = DEFAULT_WARMUP_MS,
    per_market: bool = True,
) -> TrainingSet:
    """One row per delivered order placed in ``[since_ms, until_ms)``; features as of its placement.

    ``until_ms`` (default: no limit) also bounds the history read: nothing that happened at or after it
    is used, labels included (an order delivered after ``until_ms`` has no row). ``per_market=False``
    pools the city-wide state of every market into one, as before markets existed (for measuring what
    the partition is worth: ``eta-trainer market-effect``); rows keep their market."""
    started = time.perf_counter()
    until = until_ms if until_ms is not None else 2**62
    rows = await pool.fetch(
        _EVENTS_SQL, datetime_from_ms(since_ms - warmup_ms), datetime_from_ms(min(until, 253_402_300_799_000))
    )
    fetched = time.perf_counter()
    placed: dict[str, tuple[int, str, float, float, float, float, str, str]] = {}
    delivered: dict[str, int] = {}
    events: list[HistoryEvent] = []
    append = events.append
    for kind, etype, event_ms, ingest_ms, rid, did, oid, lat, lng, clat, clng, cid, market in rows:
        append(
            HistoryEvent(
                kind,
                etype,
                event_ms,
                ingest_ms,
                rid,
                did,
                oid,
                lat,
                lng,
                None,
                (market if per_market else ""),
            )
        )
        if kind == "order" and oid:
            if etype == "PLACED":
                if since_ms <= event_ms and clat is not None and lat is not None and lng is not None:
                    placed.setdefault(oid, (event_ms, rid or "", lat, lng, clat, clng, cid or "", market))
            elif etype == "DELIVERED":
                delivered.setdefault(oid, event_ms)
    queries: list[FeatureQuery] = []
    labels: dict[str, tuple[float, float, float, str]] = {}
    for order_id, (t0, rid, rlat, rlng, clat, clng, cid, market) in placed.items():
        t1 = delivered.get(order_id)
        if t1 is None or t1 <= t0:
            continue
        # the order's market (its PLACED event's): whose free drivers and backlog the row sees
        queries.append(FeatureQuery(order_id, rid, t0, rlat, rlng, (market if per_market else "")))
        labels[order_id] = (
            (t1 - t0) / 60_000.0,
            F.haversine_km(rlat, rlng, clat, clng),
            float(F.hour_of_week(t0)),
            cid,
        )
    customers = CustomerFeaturesAt(
        await load_customer_history(pool, since_ms=since_ms, until_ms=min(until, 253_402_300_799_000))
    )
    builder = OfflineFeatureBuilder(allowed_lateness_ms=allowed_lateness_ms)
    names = list(F.FEATURE_NAMES)
    n = len(queries)
    X = np.empty((n, len(names)), dtype=np.float64)
    y = np.empty(n, dtype=np.float64)
    placed_ms = np.empty(n, dtype=np.int64)
    restaurant_ids: list[str] = []
    order_ids: list[str] = []
    markets: list[str] = []
    for i, (query, values) in enumerate(builder.run(events, queries)):
        minutes, distance, how, customer_id = labels[query.key]
        values[F.DISTANCE_KM] = distance
        values[F.HOUR_OF_WEEK] = how
        values.update(customers.at(customer_id, query.at_ms))
        X[i] = [values[name] for name in names]
        y[i] = minutes
        placed_ms[i] = query.at_ms
        restaurant_ids.append(query.restaurant_id)
        order_ids.append(query.key)
        markets.append(placed[query.key][7])
    log.info(
        "training set built",
        extra={
            "rows": n,
            "orders_placed": len(placed),
            "events": len(events),
            "fetch_s": round(fetched - started, 2),
            "replay_s": round(time.perf_counter() - fetched, 2),
        },
    )
    return TrainingSet(names, X, y, placed_ms, restaurant_ids, order_ids, markets)


class CustomerFeaturesAt:
    """The batch customer features at a row's time (as of the hourly boundary before it), memoised per
    (customer, boundary): a customer's rows within one hour share one computation."""

    def __init__(self, history: CF.CustomerHistory) -> None:
        self._history = history
        self._cache: dict[tuple[str, int], dict[str, float]] = {}

    def at(self, customer_id: str, t_ms: int) -> dict[str, float]:
        if not customer_id:  # no customer on the order: unknown
            return dict(CF.CUSTOMER_DEFAULTS)
        key = (customer_id, CF.as_of_boundary(t_ms))
        found = self._cache.get(key)
        if found is None:
            found = self._cache[key] = self._history.features_as_of(customer_id, key[1])
        return found


async def load_oracle(
    pool: asyncpg.Pool | asyncpg.Connection, order_ids: list[str]
) -> npt.NDArray[np.float64]:
    """The simulator's oracle minutes per order (NaN where there is none, e.g. real traffic)."""
    if not order_ids:
        return np.empty(0, dtype=np.float64)
    exists = await pool.fetchval("SELECT to_regclass('simulation_oracle') IS NOT NULL")
    if not exists:
        return np.full(len(order_ids), np.nan)
    found = {r["order_id"]: float(r["oracle_minutes"]) for r in await pool.fetch(_ORACLE_SQL, order_ids)}
    return np.array([found.get(oid, np.nan) for oid in order_ids], dtype=np.float64)
