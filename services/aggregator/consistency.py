"""Online = offline: recompute served features from the PostgreSQL history and compare.

Every served prediction is logged with the feature values it used (table ``predictions``, read as
``{name: value}`` through SQL's ``prediction_features(p)``, migration 0008). For each one,
this check replays the archived events the online store could have seen at serving time through the
offline builder (the same feature definitions the trainer uses) and compares feature by feature.

Visibility: by default an event counts as visible from the moment its Redis update was applied
(``events.applied_at``, recorded by the aggregator); ``--visibility ingest`` uses the ingest time instead
(exact when serving happens after the stream is quiescent, as in replays). A mismatch where an event of
the same restaurant (or a driver event, for supply) became visible within ``--in-flight-ms`` of serving
is reported as *in flight* (the read raced the update) rather than as a mismatch, unless ``--strict``.

Markets: each served row is recomputed in its market (``predictions.market_id``, the market the request
named; when the log has none, the restaurant's market from its archived events; else the default market),
whose drivers, free-driver index and dispatch backlog are that market's only, as online. A race on a
city-wide feature is looked for among the events of that market only.

The customer features are batch values (refreshed hourly from the archive, see
:mod:`eta_common.customer_features`): each is compared with the value of the refresh at or before serving
time; a value that still is the previous refresh's, served within ``--refresh-grace-minutes`` of the
boundary (the refresh runs shortly after it), is *in flight* too.

Usage against a live system::

    eta-aggregator check-consistency --since-minutes 60 [--limit 2000] [--strict]

Exit code 0 when there is no mismatch, 1 otherwise.
"""

from __future__ import annotations

import argparse
import bisect
import json
import math
import sys
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from eta_common import customer_features as CF
from eta_common import features as F
from eta_common.markets import DEFAULT_MARKET
from eta_common.offline_features import FeatureQuery, HistoryEvent, OfflineFeatureBuilder
from eta_common.timeutil import datetime_from_ms, now_ms

__all__ = ["ConsistencyReport", "ServedRow", "add_arguments", "check_consistency", "run_check"]

ONLINE_FEATURES: tuple[str, ...] = tuple(name for name in F.FEATURE_NAMES if name in F.DEFAULTS)
# The batch refresh runs shortly after each boundary (AGGREGATOR_CUSTOMER_REFRESH_DELAY_SECONDS, 60 s):
# until it lands, the previous refresh's values are served.
DEFAULT_REFRESH_GRACE_MS = 10 * 60_000
_SUPPLY = F.FREE_DRIVERS_NEARBY
SUPPLY_AS_OF = F.SUPPLY_AS_OF_LOG_KEY


@dataclass(frozen=True)
class ServedRow:
    served_ms: int
    restaurant_id: str
    features: dict[str, float | None]
    key: str = ""
    customer_id: str = ""
    market: str | None = None  # the request's market as logged ('' = default); None: not logged


@dataclass
class FeatureTally:
    compared: int = 0
    mismatches: int = 0
    in_flight: int = 0


@dataclass
class ConsistencyReport:
    predictions: int = 0
    per_feature: dict[str, FeatureTally] = field(default_factory=lambda: defaultdict(FeatureTally))
    samples: list[dict[str, Any]] = field(default_factory=list)

    @property
    def mismatches(self) -> int:
        return sum(t.mismatches for t in self.per_feature.values())

    def render(self) -> str:
        lines = [
            f"predictions checked: {self.predictions}",
            f"{'feature':<32} {'compared':>9} {'mismatch':>9} {'in flight':>9}",
        ]
        for name in ONLINE_FEATURES:
            t = self.per_feature[name]
            lines.append(f"{name:<32} {t.compared:>9} {t.mismatches:>9} {t.in_flight:>9}")
        for sample in self.samples[:10]:
            lines.append(f"  mismatch: {json.dumps(sample)}")
        return "\n".join(lines)


def _equal(online: float | None, offline: float) -> bool:
    if online is None or (isinstance(online, float) and math.isnan(online)):
        return math.isnan(offline)
    if math.isnan(offline):
        return False
    return abs(float(online) - offline) <= 1e-6 * max(1.0, abs(offline))


def check_consistency(
    events: Sequence[HistoryEvent],
    served: Sequence[ServedRow],
    *,
    allowed_lateness_ms: int = F.DEFAULT_ALLOWED_LATENESS_MS,
    in_flight_ms: int = 1000,
    strict: bool = False,
    customers: CF.CustomerHistory | None = None,
    refresh_grace_ms: int = DEFAULT_REFRESH_GRACE_MS,
) -> ConsistencyReport:
    """Compare served rows with offline values; ``events`` must be sorted by ``seen_ms``. The customer
    features are compared when ``customers`` (the archive's customer history) is given."""
    report = ConsistencyReport()
    locations: dict[str, list[tuple[int, float, float]]] = defaultdict(list)
    seen_by_restaurant: dict[str, list[int]] = defaultdict(list)
    restaurant_market: dict[str, str] = {}
    # per market: what moves its drivers, and what moves its backlog (PLACED, CANCELLED, ASSIGNED)
    driver_seen: dict[str, list[int]] = defaultdict(list)
    dispatch_seen: dict[str, list[int]] = defaultdict(list)
    for ev in events:
        market = ev.market or DEFAULT_MARKET
        if ev.restaurant_id and ev.lat is not None and ev.lng is not None:
            locations[ev.restaurant_id].append((ev.seen_ms, ev.lat, ev.lng))
        if ev.restaurant_id:
            seen_by_restaurant[ev.restaurant_id].append(ev.seen_ms)
            restaurant_market[ev.restaurant_id] = market
        if ev.kind == "driver":
            driver_seen[market].append(ev.seen_ms)
        if ev.type in ("PLACED", "CANCELLED", "ASSIGNED"):
            dispatch_seen[market].append(ev.seen_ms)
    queries: list[FeatureQuery] = []
    rows: dict[str, ServedRow] = {}
    markets: dict[str, str] = {}
    for i, row in enumerate(served):
        known = [loc for loc in locations.get(row.restaurant_id, []) if loc[0] <= row.served_ms]
        if not known:
            continue
        _, lat, lng = known[-1]
        key = row.key or str(i)
        rows[key] = row
        if row.market is not None:
            market = row.market or DEFAULT_MARKET
        else:
            market = restaurant_market.get(row.restaurant_id, DEFAULT_MARKET)
        markets[key] = market
        queries.append(FeatureQuery(key, row.restaurant_id, row.served_ms, lat, lng, market))
        as_of = row.features.get(SUPPLY_AS_OF)
        if as_of is not None:  # a materialised free-driver count: judged at the instant it was counted
            queries.append(FeatureQuery(key + SUPPLY_AS_OF, row.restaurant_id, int(as_of), lat, lng, market))

    def racing(times: list[int], at: int) -> bool:
        lo = bisect.bisect_left(times, at - in_flight_ms)
        return lo < len(times) and times[lo] <= at + in_flight_ms

    builder = OfflineFeatureBuilder(allowed_lateness_ms=allowed_lateness_ms)
    computed = dict((query.key, offline) for query, offline in builder.run(events, queries))
    for key, row in rows.items():
        offline = computed[key]
        supply_as_of = row.features.get(SUPPLY_AS_OF)
        if supply_as_of is not None:
            offline = {**offline, _SUPPLY: computed[key + SUPPLY_AS_OF][_SUPPLY]}
        report.predictions += 1
        if customers is not None:
            _check_customer(report, row, customers, refresh_grace_ms=refresh_grace_ms, strict=strict)
        for name in ONLINE_FEATURES:
            if name not in row.features or name in CF.CUSTOMER_FEATURE_NAMES:
                continue
            tally = report.per_feature[name]
            tally.compared += 1
            if _equal(row.features[name], offline[name]):
                continue
            at = row.served_ms
            if name == _SUPPLY:
                times = driver_seen[markets[key]]
                at = int(supply_as_of) if supply_as_of is not None else at
            elif name == F.ORDERS_WAITING_FOR_DRIVER:
                times = dispatch_seen[markets[key]]
            else:
                times = seen_by_restaurant[row.restaurant_id]
            if not strict and racing(times, at):
                tally.in_flight += 1
                continue
            tally.mismatches += 1
            report.samples.append(
                {
                    "restaurant_id": row.restaurant_id,
                    "market": markets[key],
                    "served_ms": row.served_ms,
                    "feature": name,
                    "online": row.features[name],
                    "offline": offline[name],
                }
            )
    return report


def _check_customer(
    report: ConsistencyReport,
    row: ServedRow,
    customers: CF.CustomerHistory,
    *,
    refresh_grace_ms: int,
    strict: bool,
) -> None:
    served = {name: row.features[name] for name in CF.CUSTOMER_FEATURE_NAMES if name in row.features}
    if not served:
        return
    if row.customer_id:
        expected = customers.features_at(row.customer_id, row.served_ms)
        boundary = CF.as_of_boundary(row.served_ms)
        previous = customers.features_as_of(row.customer_id, boundary - CF.CUSTOMER_REFRESH_MS)
    else:  # no customer on the request: unknown
        expected = previous = dict(CF.CUSTOMER_DEFAULTS)
        boundary = row.served_ms
    landing = not strict and row.served_ms - boundary <= refresh_grace_ms
    for name, value in served.items():
        tally = report.per_feature[name]
        tally.compared += 1
        if _equal(value, expected[name]):
            continue
        if landing and _equal(value, previous[name]):
            tally.in_flight += 1  # the refresh of this boundary had not landed yet
            continue
        tally.mismatches += 1
        report.samples.append(
            {
                "customer_id": row.customer_id,
                "served_ms": row.served_ms,
                "feature": name,
                "online": value,
                "offline": expected[name],
            }
        )


_EVENTS_SQL = """
SELECT kind, type, (extract(epoch FROM event_time) * 1000)::bigint AS event_ms,
       (extract(epoch FROM ingest_time) * 1000)::bigint AS ingest_ms,
       (extract(epoch FROM applied_at) * 1000)::bigint AS applied_ms,
       restaurant_id, driver_id, order_id, lat, lng, coalesce(market_id, '') AS market_id
FROM events WHERE ingest_time >= $1 AND ingest_time <= $2
"""
_SERVED_SQL = """
SELECT id, (extract(epoch FROM served_at) * 1000)::bigint AS served_ms, restaurant_id,
       prediction_features(p) AS features, coalesce(customer_id, '') AS customer_id, market_id
FROM predictions p WHERE served_at >= $1 AND served_at <= $2 ORDER BY served_at LIMIT $3
"""


def served_features(raw: Any) -> dict[str, float | None]:
    """The logged feature map: ``{name: value}`` (None for missing)."""
    data = json.loads(raw) if isinstance(raw, str | bytes) else dict(raw)
    return {str(k): (None if v is None else float(v)) for k, v in data.items()}


async def load_and_check(
    pool: asyncpg.Pool | asyncpg.Connection,
    *,
    since_ms: int,
    until_ms: int,
    limit: int,
    lookback_ms: int,
    visibility: str = "applied",
    allowed_lateness_ms: int = F.DEFAULT_ALLOWED_LATENESS_MS,
    in_flight_ms: int = 1000,
    strict: bool = False,
    refresh_grace_ms: int = DEFAULT_REFRESH_GRACE_MS,
) -> ConsistencyReport:
    served_rows = await pool.fetch(_SERVED_SQL, datetime_from_ms(since_ms), datetime_from_ms(until_ms), limit)
    served = [
        ServedRow(
            int(r["served_ms"]),
            r["restaurant_id"],
            served_features(r["features"]),
            str(r["id"]),
            r["customer_id"],
            r["market_id"],
        )
        for r in served_rows
    ]
    last_served = max((s.served_ms for s in served), default=until_ms)
    rows = await pool.fetch(
        _EVENTS_SQL, datetime_from_ms(since_ms - lookback_ms), datetime_from_ms(last_served)
    )
    events = [
        HistoryEvent(
            r["kind"],
            r["type"],
            int(r["event_ms"]),
            int(r["ingest_ms"]),
            r["restaurant_id"],
            r["driver_id"],
            r["order_id"],
            r["lat"],
            r["lng"],
            int(r["applied_ms"]) if visibility == "applied" and r["applied_ms"] is not None else None,
            r["market_id"],
        )
        for r in rows
    ]
    events.sort(key=lambda e: (e.seen_ms, e.ingest_ms))
    first_served = min((s.served_ms for s in served), default=since_ms)
    customers = await CF.load_customer_history(pool, since_ms=first_served, until_ms=last_served)
    return check_consistency(
        events,
        served,
        allowed_lateness_ms=allowed_lateness_ms,
        in_flight_ms=in_flight_ms,
        strict=strict,
        customers=customers,
        refresh_grace_ms=refresh_grace_ms,
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument(
        "--since-minutes", type=float, default=60.0, help="served predictions of the last N minutes"
    )
    parser.add_argument(
        "--limit", type=int, default=5000, help="at most this many predictions (default 5000)"
    )
    parser.add_argument(
        "--lookback-hours",
        type=float,
        default=24.0,
        help="history replayed before the first prediction, for state features (default 24)",
    )
    parser.add_argument(
        "--visibility",
        choices=["applied", "ingest"],
        default="applied",
        help="when an event counts as visible online (default: applied)",
    )
    parser.add_argument(
        "--in-flight-ms", type=int, default=1000, help="race window for 'in flight' (default 1000)"
    )
    parser.add_argument(
        "--refresh-grace-minutes",
        type=float,
        default=DEFAULT_REFRESH_GRACE_MS / 60_000,
        help="customer features served this soon after an hourly boundary may still be the previous"
        f" refresh's (default {DEFAULT_REFRESH_GRACE_MS // 60_000})",
    )
    parser.add_argument("--strict", action="store_true", help="count in-flight differences as mismatches")


async def run_check(settings: Any, args: argparse.Namespace) -> int:
    until = now_ms()
    conn = await asyncpg.connect(settings.database.url)
    try:
        report = await load_and_check(
            conn,
            since_ms=until - int(args.since_minutes * 60_000),
            until_ms=until,
            limit=args.limit,
            lookback_ms=int(args.lookback_hours * 3_600_000),
            visibility=args.visibility,
            allowed_lateness_ms=int(settings.allowed_lateness_seconds * 1000),
            in_flight_ms=args.in_flight_ms,
            strict=args.strict,
            refresh_grace_ms=int(args.refresh_grace_minutes * 60_000),
        )
    finally:
        await conn.close()
    sys.stdout.write(report.render() + "\n")
    return 0 if report.mismatches == 0 else 1
