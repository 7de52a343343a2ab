"""Event archive in PostgreSQL: one row per ``event_id``; re-delivery is a no-op (ON CONFLICT DO NOTHING)."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from eta.v1 import events_pb2
from eta_common.timeutil import datetime_from_ms, ms_from_timestamp

__all__ = ["ArchivedEvent", "archive_events", "event_row"]

_COLUMNS = (
    "event_id", "kind", "type", "event_time", "ingest_time", "restaurant_id", "driver_id", "order_id",
    "customer_id", "lat", "lng", "customer_lat", "customer_lng", "payload", "kafka_topic", "kafka_partition",
    "kafka_offset", "applied_at",
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
]


@dataclass(frozen=True)
class ArchivedEvent:
    event: events_pb2.Event
    ingest_ms: int
    topic: str | None = None
    partition: int | None = None
    offset: int | None = None
    # When its online update became visible in Redis (None: no online effect).
    applied_ms: int | None = None


def _none_if_empty(value: str) -> str | None:
    return value or None


def event_row(item: ArchivedEvent) -> Row:
    event = item.event
    kind = event.WhichOneof("payload")
    restaurant_id = driver_id = order_id = customer_id = None
    lat = lng = clat = clng = None
    if kind == "driver":
        d = event.driver
        event_id, ms, etype = (
            d.event_id,
            ms_from_timestamp(d.event_time),
            events_pb2.DriverEvent.Type.Name(d.type),
        )
        driver_id, order_id = d.driver_id, _none_if_empty(d.order_id)
        lat, lng = d.location.lat, d.location.lng
    elif kind == "kitchen":
        k = event.kitchen
        event_id, ms, etype = (
            k.event_id,
            ms_from_timestamp(k.event_time),
            events_pb2.KitchenEvent.Type.Name(k.type),
        )
        restaurant_id, order_id = k.restaurant_id, _none_if_empty(k.order_id)
        if k.HasField("restaurant_location"):
            lat, lng = k.restaurant_location.lat, k.restaurant_location.lng
    elif kind == "order":
        o = event.order
        event_id, ms, etype = (
            o.event_id,
            ms_from_timestamp(o.event_time),
            events_pb2.OrderEvent.Type.Name(o.type),
        )
        restaurant_id, order_id = o.restaurant_id, o.order_id
        customer_id, driver_id = _none_if_empty(o.customer_id), _none_if_empty(o.driver_id)
        if o.HasField("restaurant_location"):
            lat, lng = o.restaurant_location.lat, o.restaurant_location.lng
        if o.HasField("customer_location"):
            clat, clng = o.customer_location.lat, o.customer_location.lng
    else:
        raise ValueError("event has no payload")
    return (
        event_id, kind, etype, datetime_from_ms(ms), datetime_from_ms(item.ingest_ms), restaurant_id,
        driver_id, order_id, customer_id, lat, lng, clat, clng, event.SerializeToString(), item.topic,
        item.partition, item.offset, None if item.applied_ms is None else datetime_from_ms(item.applied_ms),
    )  # fmt: skip


async def archive_events(conn: asyncpg.Connection | asyncpg.Pool, items: Sequence[ArchivedEvent]) -> int:
    """Insert events, skipping event_ids already archived. Returns the number of new rows."""
    if not items:
        return 0
    rows = [event_row(item) for item in items]
    columns = ", ".join(_COLUMNS)
    acquire = conn.acquire() if isinstance(conn, asyncpg.Pool) else contextlib.nullcontext(conn)
    async with acquire as c, c.transaction():
        await c.execute(
            "CREATE TEMP TABLE IF NOT EXISTS events_incoming (LIKE events INCLUDING DEFAULTS) "
            "ON COMMIT DELETE ROWS"
        )
        await c.copy_records_to_table("events_incoming", records=rows, columns=list(_COLUMNS))
        status = await c.execute(
            f"INSERT INTO events ({columns}) SELECT DISTINCT ON (event_id) {columns} "
            "FROM events_incoming ORDER BY event_id ON CONFLICT (event_id) DO NOTHING"
        )
    return int(status.rsplit(" ", 1)[-1])
