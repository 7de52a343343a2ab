"""Builders for the ``eta.v1.Event`` messages the simulator emits (fields as the proto comments require)."""

from __future__ import annotations

from eta.v1 import events_pb2
from simulator.city import GeoPoint

__all__ = ["driver_event", "event_ms", "kitchen_event", "order_event"]

DriverType = events_pb2.DriverEvent.Type
KitchenType = events_pb2.KitchenEvent.Type
OrderType = events_pb2.OrderEvent.Type


def driver_event(
    event_id: str,
    ms: int,
    driver_id: str,
    etype: DriverType.ValueType,
    at: GeoPoint,
    order_id: str = "",
    market_id: str = "",
) -> events_pb2.Event:
    event = events_pb2.Event()
    d = event.driver
    d.event_id = event_id
    d.event_time.seconds, rem = divmod(ms, 1000)
    d.event_time.nanos = rem * 1_000_000
    d.driver_id = driver_id
    d.type = etype
    d.location.lat = at.lat
    d.location.lng = at.lng
    if order_id:
        d.order_id = order_id
    if market_id:
        d.market_id = market_id
    return event


def kitchen_event(
    event_id: str,
    ms: int,
    restaurant_id: str,
    etype: KitchenType.ValueType,
    at: GeoPoint,
    order_id: str = "",
    market_id: str = "",
) -> events_pb2.Event:
    event = events_pb2.Event()
    k = event.kitchen
    k.event_id = event_id
    k.event_time.seconds, rem = divmod(ms, 1000)
    k.event_time.nanos = rem * 1_000_000
    k.restaurant_id = restaurant_id
    k.type = etype
    if order_id:
        k.order_id = order_id
    k.restaurant_location.lat = at.lat
    k.restaurant_location.lng = at.lng
    if market_id:
        k.market_id = market_id
    return event


def order_event(
    event_id: str,
    ms: int,
    order_id: str,
    restaurant_id: str,
    etype: OrderType.ValueType,
    *,
    customer_id: str = "",
    restaurant_at: GeoPoint | None = None,
    customer_at: GeoPoint | None = None,
    driver_id: str = "",
    market_id: str = "",
) -> events_pb2.Event:
    event = events_pb2.Event()
    o = event.order
    o.event_id = event_id
    o.event_time.seconds, rem = divmod(ms, 1000)
    o.event_time.nanos = rem * 1_000_000
    o.order_id = order_id
    o.restaurant_id = restaurant_id
    o.type = etype
    if customer_id:
        o.customer_id = customer_id
    if restaurant_at is not None:
        o.restaurant_location.lat = restaurant_at.lat
        o.restaurant_location.lng = restaurant_at.lng
    if customer_at is not None:
        o.customer_location.lat = customer_at.lat
        o.customer_location.lng = customer_at.lng
    if driver_id:
        o.driver_id = driver_id
    if market_id:
        o.market_id = market_id
    return event


def event_ms(event: events_pb2.Event) -> int:
    """The event time of any event, in epoch milliseconds."""
    kind = event.WhichOneof("payload")
    if kind == "driver":
        ts = event.driver.event_time
    elif kind == "kitchen":
        ts = event.kitchen.event_time
    elif kind == "order":
        ts = event.order.event_time
    else:
        raise ValueError("event has no payload")
    return ts.seconds * 1000 + ts.nanos // 1_000_000
