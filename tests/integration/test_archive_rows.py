"""The archive's rows, written the hot path's way (one jsonb parameter) and the reference way (the
``event_row`` tuples through ``unnest`` arrays), are identical column for column — including the values
JSON cannot carry exactly (NaN, ±inf, -0.0: their batches take the arrays), odd text, absent fields and
repeats within a batch (the first one wins)."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from typing import Any, cast

import asyncpg
import pytest

from devstack.infra import ChildProcess
from eta.v1 import events_pb2
from eta_common.db import archive as A
from eta_common.db.archive import ArchivedEvent, archive_events
from eta_common.db.migrate import apply_migrations
from eta_common.event_facts import event_facts
from eta_common.timeutil import timestamp_from_ms

T = 1_765_000_000_123
COLUMNS = ", ".join(A._COLUMNS)


@pytest.fixture
async def conn(postgres: ChildProcess) -> AsyncIterator[asyncpg.Connection]:
    await apply_migrations(postgres.url)
    connection = await asyncpg.connect(postgres.url)
    await connection.execute("TRUNCATE events")
    yield connection
    await connection.close()


def _order(n: int, **fields: Any) -> events_pb2.Event:
    base: dict[str, Any] = {
        "event_id": f"o{n}",
        "event_time": timestamp_from_ms(T + n),
        "restaurant_id": "r1",
        "order_id": f"order-{n}",
        "type": events_pb2.OrderEvent.PLACED,
    }
    return events_pb2.Event(order=events_pb2.OrderEvent(**{**base, **fields}))


def _events() -> list[ArchivedEvent]:
    at = events_pb2.GeoPoint
    events = [
        _order(1, restaurant_location=at(lat=52.520008, lng=13.404954), customer_id="c1"),
        _order(2, customer_location=at(lat=1e-7, lng=-179.99999999999997), market_id="berlin"),
        _order(3, restaurant_id='r "quoted" \\ back\nslash \u2028 ö 🍕', order_id="o,]0.0,"),
        _order(4, restaurant_location=at(lat=0.0, lng=0.0)),
        events_pb2.Event(
            driver=events_pb2.DriverEvent(
                event_id="d1", event_time=timestamp_from_ms(T), driver_id="drv", order_id="",
                type=events_pb2.DriverEvent.LOCATION, location=at(lat=48.1, lng=11.5),
            )
        ),
        events_pb2.Event(
            kitchen=events_pb2.KitchenEvent(
                event_id="k1", event_time=timestamp_from_ms(T - 1), restaurant_id="r1",
                type=events_pb2.KitchenEvent.BUSY,
            )
        ),
    ]  # fmt: skip
    items = []
    for n, event in enumerate(events):
        applied = None if n % 2 else T + 1_000 + n
        items.append(
            ArchivedEvent(event, T + 500 + n, f"topic-{n % 2}", n % 3, 10 * n, applied, event_facts(event))
        )
    return items


def _key(value: Any) -> Any:
    return repr(value) if isinstance(value, float) else value  # NaN == NaN, -0.0 != 0.0


async def _stored(conn: asyncpg.Connection, prefix: str) -> list[tuple[Any, ...]]:
    rows = await conn.fetch(
        f"SELECT {COLUMNS} FROM events WHERE event_id LIKE $1 ORDER BY event_id", prefix + "%"
    )
    return [tuple(_key(v) for v in row) for row in rows]


async def _reference(conn: asyncpg.Connection, items: list[ArchivedEvent]) -> None:
    unique: dict[str, A.Row] = {}
    for item in items:
        row = A.event_row(item)
        unique.setdefault(row[0], row)
    await conn.execute(A._INSERT, *zip(*unique.values(), strict=True))


def _renamed(items: list[ArchivedEvent], prefix: str) -> list[ArchivedEvent]:
    out = []
    for item in items:
        assert item.facts is not None
        out.append(item._replace(facts=item.facts._replace(event_id=prefix + item.facts.event_id)))
    return out


class _Recording:
    """The connection, recording which statement each archive call took."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn
        self.statements: list[str] = []

    async def execute(self, query: str, *args: Any) -> str:
        self.statements.append("json" if query == A._INSERT_JSON else "arrays")
        return str(await self.conn.execute(query, *args))


@pytest.mark.parametrize(
    ("odd", "path"),
    [
        (None, "json"),
        (math.nan, "arrays"),
        (math.inf, "arrays"),
        (-math.inf, "arrays"),
        (-0.0, "arrays"),
        ("x-0.0,", "arrays"),  # text that looks like a -0.0 element: harmless, the arrays take it
    ],
    ids=["plain", "nan", "inf", "-inf", "-0.0", "text"],
)
async def test_json_rows_equal_the_reference_rows(conn: asyncpg.Connection, odd: Any, path: str) -> None:
    items = _events()
    facts = items[4].facts
    assert facts is not None
    if isinstance(odd, float):  # one event with the odd value as its latitude
        items[4] = items[4]._replace(facts=facts._replace(lat=odd))
    elif odd is not None:
        items[4] = items[4]._replace(facts=facts._replace(driver_id=odd))
    items.append(items[0]._replace(ingest_ms=T + 99_999))  # a repeat within the batch: the first one wins
    recording = _Recording(conn)
    assert (
        await archive_events(cast(asyncpg.Connection, recording), _renamed(items, "json-")) == len(items) - 1
    )
    assert recording.statements == [path]
    await _reference(conn, _renamed(items, "ref-"))
    json_rows = await _stored(conn, "json-")
    reference = await _stored(conn, "ref-")
    assert [row[1:] for row in json_rows] == [row[1:] for row in reference]
    assert len(json_rows) == len(items) - 1
    # re-delivery is a no-op
    assert await archive_events(conn, _renamed(items, "json-")) == 0
