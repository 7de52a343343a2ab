"""The updates the aggregator applies to the online store, derived from events (a tuple per event: cheap
on the hot path)."""

from __future__ import annotations

from typing import Any, NamedTuple

from eta_common.event_facts import EventFacts, event_facts

__all__ = [
    "DISPATCH_ORDER_EVENTS",
    "RESTAURANT_ORDER_EVENTS",
    "DriverUpdate",
    "RestaurantUpdate",
    "update_from_event",
    "update_from_facts",
]

# Order events that also change the city's dispatch backlog (forwarded to the city script).
DISPATCH_ORDER_EVENTS = frozenset({"PLACED", "CANCELLED"})
# Order events the restaurant script applies (PICKED_UP completes an order's pickup wait).
RESTAURANT_ORDER_EVENTS = DISPATCH_ORDER_EVENTS | {"PICKED_UP"}
# Every field given: the tuple's own __new__ makes the same instance as the NamedTuple's (Python code).
_new = tuple.__new__


class RestaurantUpdate(NamedTuple):
    """One order/kitchen event in the form the restaurant script takes (a tuple: cheap on the hot path)."""

    restaurant_id: str
    event_type: str
    order_id: str
    event_ms: int
    lat: float | None = None
    lng: float | None = None
    # "<trace_id>-<span_id>" of the (sampled) span that applied it, stored as the feature's provenance.
    writer: str = ""
    market: str = ""  # '' = the writer's default market


class DriverUpdate(NamedTuple):
    driver_id: str
    event_type: str
    event_ms: int
    lat: float
    lng: float
    writer: str = ""
    # The order an ASSIGNED event assigns (settles it in the dispatch backlog); '' when none.
    order_id: str = ""
    market: str = ""  # '' = the writer's default market


def update_from_event(event: Any) -> RestaurantUpdate | DriverUpdate | None:
    """Map an ``eta.v1.Event`` to the online update it causes (None for events with no online effect)."""
    facts = event_facts(event)
    return None if facts is None else update_from_facts(facts)


def update_from_facts(f: EventFacts) -> RestaurantUpdate | DriverUpdate | None:
    """The online update of an event's facts (None: no online effect, e.g. a type this build does not
    know, or an order event other than PLACED/CANCELLED; the event is still archived)."""
    if not f.known_type:
        return None
    if f.kind == "driver":
        assert f.driver_id is not None
        assert f.lat is not None
        assert f.lng is not None
        return _new(
            DriverUpdate, (f.driver_id, f.type, f.event_ms, f.lat, f.lng, "", f.order_id or "", f.market)
        )
    if f.kind == "order" and f.type not in RESTAURANT_ORDER_EVENTS:
        return None
    assert f.restaurant_id is not None
    return _new(
        RestaurantUpdate, (f.restaurant_id, f.type, f.order_id or "", f.event_ms, f.lat, f.lng, "", f.market)
    )
