"""Event builders for the integration tests."""

from __future__ import annotations

import uuid

from eta.v1 import events_pb2
from eta_common.timeutil import now_ms, timestamp_from_ms

BERLIN = events_pb2.GeoPoint(lat=52.52, lng=13.405)
NEARBY = events_pb2.GeoPoint(lat=52.53, lng=13.42)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def placed(
    restaurant_id: str, *, order_id: str | None = None, ago_ms: int = 0, event_id: str | None = None
) -> events_pb2.Event:
    return events_pb2.Event(
        order=events_pb2.OrderEvent(
            event_id=event_id or new_id("ev"),
            event_time=timestamp_from_ms(now_ms() - ago_ms),
            order_id=order_id or new_id("order"),
            restaurant_id=restaurant_id,
            customer_id=new_id("cust"),
            type=events_pb2.OrderEvent.PLACED,
            restaurant_location=BERLIN,
            customer_location=NEARBY,
        )
    )


def driver_online(driver_id: str, location: events_pb2.GeoPoint = BERLIN) -> events_pb2.Event:
    return events_pb2.Event(
        driver=events_pb2.DriverEvent(
            event_id=new_id("ev"),
            event_time=timestamp_from_ms(now_ms()),
            driver_id=driver_id,
            type=events_pb2.DriverEvent.ONLINE,
            location=location,
        )
    )
