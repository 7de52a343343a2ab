"""Event validation rules (also documented in protos/eta/v1/events.proto). Pure functions: no I/O."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from eta.v1 import events_pb2
from eta_common import markets
from eta_common.geo import check_point
from eta_common.markets import MARKET_ID_PATTERN
from eta_common.timeutil import ms_from_timestamp

__all__ = [
    "MARKET_ID_REASON",
    "ValidationLimits",
    "Violation",
    "check_market_id",
    "event_id_of",
    "event_type_of",
    "validate_event",
]

MAX_ID_LENGTH = 128
Violation = tuple[str, str]  # (field path, reason)


@dataclass(frozen=True)
class ValidationLimits:
    max_future_skew_ms: int = 300_000
    max_age_ms: int = 7 * 24 * 3_600_000


def _check_id(out: list[Violation], path: str, value: str) -> None:
    if not value:
        out.append((path, "required"))
    elif len(value) > MAX_ID_LENGTH:
        out.append((path, f"longer than {MAX_ID_LENGTH} characters"))
    elif not value.isprintable() or value != value.strip():
        out.append((path, "must be printable with no leading/trailing whitespace"))


def _check_optional_id(out: list[Violation], path: str, value: str) -> None:
    if value:
        _check_id(out, path, value)


MARKET_ID_REASON = markets.MARKET_ID_REASON


def check_market_id(out: list[Violation], path: str, value: str) -> None:
    """An optional ``market_id``: empty is the default market; else it must match MARKET_ID_PATTERN."""
    if value and MARKET_ID_PATTERN.fullmatch(value) is None:
        out.append((path, MARKET_ID_REASON))


def _check_time(
    out: list[Violation], path: str, has: bool, ts: Timestamp, now_ms: int, limits: ValidationLimits
) -> None:
    if not has:
        out.append((path, "required"))
        return
    if not 0 <= ts.nanos < 1_000_000_000:
        out.append((path, "nanos out of range"))
        return
    ms = ms_from_timestamp(ts)
    if ms > now_ms + limits.max_future_skew_ms:
        out.append((path, f"more than {limits.max_future_skew_ms // 1000}s in the future"))
    elif ms < now_ms - limits.max_age_ms:
        out.append((path, f"older than {limits.max_age_ms // 1000}s"))


_ENUM_NAMES: dict[Any, dict[int, str]] = {
    enum: {number: value.name for number, value in enum.DESCRIPTOR.values_by_number.items()}
    for enum in (events_pb2.DriverEvent.Type, events_pb2.KitchenEvent.Type, events_pb2.OrderEvent.Type)
}


def _check_type(out: list[Violation], path: str, value: int, enum: Any) -> str | None:
    names = _ENUM_NAMES[enum]
    if value not in names:
        out.append((path, f"unknown value {value}"))
        return None
    if value == 0:
        out.append((path, "required"))
        return None
    return names[value]


def validate_event(event: events_pb2.Event, *, now_ms: int, limits: ValidationLimits) -> list[Violation]:
    """Every violation of the event (empty list = valid). Field paths are relative to the Event."""
    out: list[Violation] = []
    kind = event.WhichOneof("payload")
    if kind == "driver":
        d = event.driver
        _check_id(out, "driver.event_id", d.event_id)
        _check_time(out, "driver.event_time", d.HasField("event_time"), d.event_time, now_ms, limits)
        _check_id(out, "driver.driver_id", d.driver_id)
        etype = _check_type(out, "driver.type", d.type, events_pb2.DriverEvent.Type)
        check_point(out, "driver.location", d.HasField("location"), d.location, required=True)
        if etype in ("ASSIGNED", "DELIVERED"):
            _check_id(out, "driver.order_id", d.order_id)
        else:
            _check_optional_id(out, "driver.order_id", d.order_id)
        check_market_id(out, "driver.market_id", d.market_id)
    elif kind == "kitchen":
        k = event.kitchen
        _check_id(out, "kitchen.event_id", k.event_id)
        _check_time(out, "kitchen.event_time", k.HasField("event_time"), k.event_time, now_ms, limits)
        _check_id(out, "kitchen.restaurant_id", k.restaurant_id)
        etype = _check_type(out, "kitchen.type", k.type, events_pb2.KitchenEvent.Type)
        if etype in ("ORDER_ACCEPTED", "ORDER_READY"):
            _check_id(out, "kitchen.order_id", k.order_id)
        else:
            _check_optional_id(out, "kitchen.order_id", k.order_id)
        check_point(
            out,
            "kitchen.restaurant_location",
            k.HasField("restaurant_location"),
            k.restaurant_location,
            required=False,
        )
        check_market_id(out, "kitchen.market_id", k.market_id)
    elif kind == "order":
        o = event.order
        _check_id(out, "order.event_id", o.event_id)
        _check_time(out, "order.event_time", o.HasField("event_time"), o.event_time, now_ms, limits)
        _check_id(out, "order.order_id", o.order_id)
        _check_id(out, "order.restaurant_id", o.restaurant_id)
        etype = _check_type(out, "order.type", o.type, events_pb2.OrderEvent.Type)
        placed = etype == "PLACED"
        if placed:
            _check_id(out, "order.customer_id", o.customer_id)
        else:
            _check_optional_id(out, "order.customer_id", o.customer_id)
        check_point(
            out,
            "order.restaurant_location",
            o.HasField("restaurant_location"),
            o.restaurant_location,
            required=placed,
        )
        check_point(
            out,
            "order.customer_location",
            o.HasField("customer_location"),
            o.customer_location,
            required=placed,
        )
        if etype in ("PICKED_UP", "DELIVERED"):
            _check_id(out, "order.driver_id", o.driver_id)
        else:
            _check_optional_id(out, "order.driver_id", o.driver_id)
        check_market_id(out, "order.market_id", o.market_id)
    else:
        out.append(("payload", "one of driver, kitchen, order is required"))
    return out


def event_id_of(event: events_pb2.Event) -> str:
    kind = event.WhichOneof("payload")
    return str(getattr(event, kind).event_id) if kind else ""


_TYPE_ENUMS = {
    "driver": events_pb2.DriverEvent.Type,
    "kitchen": events_pb2.KitchenEvent.Type,
    "order": events_pb2.OrderEvent.Type,
}


def event_type_of(event: events_pb2.Event) -> str:
    """The event's type name (e.g. ``PLACED``), ``invalid`` for unknown values, ``none`` without payload."""
    kind = event.WhichOneof("payload")
    if kind is None:
        return "none"
    value = getattr(event, kind).type
    names = _TYPE_ENUMS[kind].DESCRIPTOR.values_by_number
    return str(names[value].name) if value in names else "invalid"
