"""Event archive in PostgreSQL: one row per ``event_id``; re-delivery is a no-op (ON CONFLICT DO NOTHING).

``market_id`` is the event's market as sent (NULL: none named, the default market; migration 0007)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import NamedTuple

import asyncpg

from eta.v1 import events_pb2
from eta_common.event_facts import EventFacts, event_facts
from eta_common.timeutil import datetime_from_ms

__all__ = ["ArchivedEvent", "archive_events", "event_row"]

_COLUMNS = (
    "event_id", "kind", "type", "event_time", "ingest_time", "restaurant_id", "driver_id", "order_id",
    "customer_id", "lat", "lng", "customer_lat", "customer_lng", "payload", "kafka_topic", "kafka_partition",
    "kafka_offset", "applied_at", "market_id",
)  # fmt: skip

Row = tuple[
    str,
    str,
    str,
    datetime,
    datetime,
    str | None,
    str | None,
    str | None,
    str | None,
    float | None,
    float | None,
    float | None,
    float | None,
    bytes,
    str | None,
    int | None,
    int | None,
    datetime | None,
    str | None,
]


class ArchivedEvent(NamedTuple):
    event: events_pb2.Event
    ingest_ms: int
    topic: str | None = None
    partition: int | None = None
    offset: int | None = None
    # When its online update became visible in Redis (None: no online effect).
    applied_ms: int | None = None
    # The event's facts when the caller already read them (the aggregator); else read here.
    facts: EventFacts | None = None


def event_row(item: ArchivedEvent) -> Row:
    f = item.facts or event_facts(item.event)
    if f is None:
        raise ValueError("event has no payload")
    return (
        f.event_id, f.kind, f.type, datetime_from_ms(f.event_ms), datetime_from_ms(item.ingest_ms),
        f.restaurant_id, f.driver_id, f.order_id, f.customer_id, f.lat, f.lng, f.customer_lat,
        f.customer_lng, item.event.SerializeToString(), item.topic, item.partition, item.offset,
        None if item.applied_ms is None else datetime_from_ms(item.applied_ms), f.market or None,
    )  # fmt: skip


# The columns' PostgreSQL types, for one multi-row INSERT … SELECT FROM unnest(arrays): one statement, one
# round trip and no temporary table (measured ~30 % cheaper than COPY into a staging table + INSERT).
_TYPES = (
    "text", "text", "text", "timestamptz", "timestamptz", "text", "text", "text", "text", "float8", "float8",
    "float8", "float8", "bytea", "text", "int4", "int8", "timestamptz", "text",
)  # fmt: skip
_INSERT = (
    f"INSERT INTO events ({', '.join(_COLUMNS)}) "
    f"SELECT * FROM unnest({', '.join(f'${i}::{t}[]' for i, t in enumerate(_TYPES, 1))}) "
    "ON CONFLICT (event_id) DO NOTHING"
)


async def archive_events(conn: asyncpg.Connection | asyncpg.Pool, items: Sequence[ArchivedEvent]) -> int:
    """Insert events, skipping event_ids already archived (and repeats within ``items``: the first one
    wins). Returns the number of new rows."""
    if not items:
        return 0
    rows: dict[str, Row] = {}
    for item in items:
        row = event_row(item)
        rows.setdefault(row[0], row)
    columns = list(zip(*rows.values(), strict=True))
    status = await conn.execute(_INSERT, *columns)
    return int(status.rsplit(" ", 1)[-1])
