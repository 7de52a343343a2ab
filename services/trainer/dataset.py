"""Training set from the event archive, point-in-time correct via the shared offline feature builder."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import asyncpg
import numpy as np
import numpy.typing as npt

from eta_common import features as F
from eta_common.offline_features import FeatureQuery, HistoryEvent, OfflineFeatureBuilder

log = logging.getLogger(__name__)

_EVENTS_SQL = """
SELECT kind, type, (extract(epoch FROM event_time) * 1000)::bigint AS event_ms,
       (extract(epoch FROM ingest_time) * 1000)::bigint AS ingest_ms,
       restaurant_id, driver_id, order_id, lat, lng, customer_lat, customer_lng
FROM events
WHERE event_time >= $1
ORDER BY ingest_time, event_id
"""


@dataclass
class TrainingSet:
    feature_names: list[str]
    X: npt.NDArray[np.float64]
    y: npt.NDArray[np.float64]  # delivery minutes (DELIVERED - PLACED)
    placed_ms: npt.NDArray[np.int64]
    restaurant_ids: list[str]

    def __len__(self) -> int:
        return len(self.y)

    def split(self, holdout_fraction: float) -> tuple[TrainingSet, TrainingSet]:
        """Time-ordered split: the most recent orders are the holdout."""
        order = np.argsort(self.placed_ms, kind="stable")
        cut = int(len(order) * (1 - holdout_fraction))
        return self._take(order[:cut]), self._take(order[cut:])

    def _take(self, idx: npt.NDArray[np.intp]) -> TrainingSet:
        return TrainingSet(
            self.feature_names,
            self.X[idx],
            self.y[idx],
            self.placed_ms[idx],
            [self.restaurant_ids[i] for i in idx],
        )


async def load_training_set(
    pool: asyncpg.Pool | asyncpg.Connection,
    *,
    since_ms: int,
    allowed_lateness_ms: int = F.DEFAULT_ALLOWED_LATENESS_MS,
) -> TrainingSet:
    """One row per delivered order placed since ``since_ms``; features as of its placement time."""
    from eta_common.timeutil import datetime_from_ms

    rows = await pool.fetch(_EVENTS_SQL, datetime_from_ms(since_ms))
    log.info("history loaded", extra={"events": len(rows)})
    placed: dict[str, tuple[int, str, float, float, float, float]] = {}
    delivered: dict[str, int] = {}
    events: list[HistoryEvent] = []
    for row in rows:
        ev = HistoryEvent(
            row["kind"],
            row["type"],
            int(row["event_ms"]),
            int(row["ingest_ms"]),
            row["restaurant_id"],
            row["driver_id"],
            row["order_id"],
            row["lat"],
            row["lng"],
        )
        events.append(ev)
        if ev.kind == "order" and ev.order_id:
            if ev.type == "PLACED" and row["customer_lat"] is not None and ev.lat is not None:
                placed.setdefault(
                    ev.order_id,
                    (
                        ev.event_ms,
                        ev.restaurant_id or "",
                        float(ev.lat),
                        float(ev.lng or 0.0),
                        float(row["customer_lat"]),
                        float(row["customer_lng"]),
                    ),
                )
            elif ev.type == "DELIVERED":
                delivered.setdefault(ev.order_id, ev.event_ms)
    queries: list[FeatureQuery] = []
    labels: dict[str, tuple[float, float, float]] = {}
    for order_id, (t0, rid, rlat, rlng, clat, clng) in placed.items():
        t1 = delivered.get(order_id)
        if t1 is None or t1 <= t0:
            continue
        queries.append(FeatureQuery(order_id, rid, t0, rlat, rlng))
        labels[order_id] = (
            (t1 - t0) / 60_000.0,
            F.haversine_km(rlat, rlng, clat, clng),
            float(F.hour_of_week(t0)),
        )
    builder = OfflineFeatureBuilder(allowed_lateness_ms=allowed_lateness_ms)
    names = list(F.FEATURE_NAMES)
    X = np.empty((len(queries), len(names)), dtype=np.float64)
    y = np.empty(len(queries), dtype=np.float64)
    placed_ms = np.empty(len(queries), dtype=np.int64)
    restaurant_ids: list[str] = []
    for i, (query, values) in enumerate(builder.run(events, queries)):
        minutes, distance, how = labels[query.key]
        values[F.DISTANCE_KM] = distance
        values[F.HOUR_OF_WEEK] = how
        X[i] = [values[name] for name in names]
        y[i] = minutes
        placed_ms[i] = query.at_ms
        restaurant_ids.append(query.restaurant_id)
    log.info("training set built", extra={"rows": len(y), "orders_placed": len(placed)})
    return TrainingSet(names, X, y, placed_ms, restaurant_ids)
