"""One pass over an ``eta.v1.Event``: the flat facts every consumer of an event needs.

Reading a protobuf field from Python allocates a wrapper per access, so the aggregator reads each event
once, here, and derives both its online update (:func:`eta_common.online_store.update_from_facts`) and
its archive row (:func:`eta_common.db.archive.event_row`) from the result.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

from eta.v1 import events_pb2

__all__ = ["EventFacts", "event_facts", "type_names"]


class EventFacts(NamedTuple):
    kind: str  # driver | kitchen | order
    type: str  # the enum name; "UNKNOWN_<n>" for a number this build does not know
    known_type: bool
    event_id: str
    event_ms: int
    restaurant_id: str | None
    driver_id: str | None
    order_id: str | None
    customer_id: str | None
    lat: float | None
    lng: float | None
    customer_lat: float | None
    customer_lng: float | None
    market: str = ""  # the event's market_id ('' = the default market)


@functools.cache
def type_names(kind: str) -> dict[int, str]:
    """Enum number → name of an event kind's ``Type`` (a dict lookup instead of ``Type.Name``)."""
    enum: Any = {
        "driver": events_pb2.DriverEvent.Type,
        "kitchen": events_pb2.KitchenEvent.Type,
        "order": events_pb2.OrderEvent.Type,
    }[kind]
    return {number: enum.Name(number) for number in enum.values()}


# A NamedTuple's generated __new__ is Python code (~0.5 µs a call); the tuple's own, given every field, makes
# the same instance (hot path: one per event).
_new = tuple.__new__


def _type(kind: str, number: int) -> tuple[str, bool]:
    name = type_names(kind).get(number)
    return (name, True) if name is not None else (f"UNKNOWN_{number}", False)


def event_facts(event: events_pb2.Event) -> EventFacts | None:
    """The facts of an event; None when it has no payload."""
    kind = event.WhichOneof("payload")
    if kind == "driver":
        d = event.driver
        t = d.event_time
        loc = d.location
        etype, known = _type(kind, d.type)
        return _new(EventFacts, (
            kind, etype, known, d.event_id, t.seconds * 1000 + t.nanos // 1_000_000, None,
            d.driver_id, d.order_id or None, None, loc.lat, loc.lng, None, None, d.market_id,
        ))  # fmt: skip
    if kind == "kitchen":
        k = event.kitchen
        t = k.event_time
        etype, known = _type(kind, k.type)
        lat = lng = None
        if k.HasField("restaurant_location"):
            loc = k.restaurant_location
            lat, lng = loc.lat, loc.lng
        return _new(EventFacts, (
            kind, etype, known, k.event_id, t.seconds * 1000 + t.nanos // 1_000_000, k.restaurant_id,
            None, k.order_id or None, None, lat, lng, None, None, k.market_id,
        ))  # fmt: skip
    if kind == "order":
        o = event.order
        t = o.event_time
        etype, known = _type(kind, o.type)
        lat = lng = clat = clng = None
        if o.HasField("restaurant_location"):
            loc = o.restaurant_location
            lat, lng = loc.lat, loc.lng
        if o.HasField("customer_location"):
            loc = o.customer_location
            clat, clng = loc.lat, loc.lng
        return _new(EventFacts, (
            kind, etype, known, o.event_id, t.seconds * 1000 + t.nanos // 1_000_000, o.restaurant_id,
            o.driver_id or None, o.order_id, o.customer_id or None, lat, lng, clat, clng, o.market_id,
        ))  # fmt: skip
    return None
