"""Validation rules: every documented rule rejects with a field path, valid events pass."""

from __future__ import annotations

import pytest

from eta.v1 import events_pb2
from eta_common.timeutil import timestamp_from_ms
from ingestion.validation import ValidationLimits, event_type_of, validate_event

NOW = 1_800_000_000_000
LIMITS = ValidationLimits(max_future_skew_ms=300_000, max_age_ms=86_400_000)
HERE = events_pb2.GeoPoint(lat=52.52, lng=13.405)


def order(**overrides: object) -> events_pb2.Event:
    fields: dict[str, object] = {
        "event_id": "e1",
        "event_time": timestamp_from_ms(NOW - 1000),
        "order_id": "o1",
        "restaurant_id": "r1",
        "customer_id": "c1",
        "type": events_pb2.OrderEvent.PLACED,
        "restaurant_location": HERE,
        "customer_location": events_pb2.GeoPoint(lat=52.5, lng=13.4),
    }
    fields.update(overrides)
    return events_pb2.Event(order=events_pb2.OrderEvent(**fields))  # type: ignore[arg-type]


def violations(event: events_pb2.Event) -> list[tuple[str, str]]:
    return validate_event(event, now_ms=NOW, limits=LIMITS)


def test_valid_events_of_every_kind_pass() -> None:
    assert violations(order()) == []
    driver = events_pb2.Event(
        driver=events_pb2.DriverEvent(
            event_id="e2",
            event_time=timestamp_from_ms(NOW),
            driver_id="d1",
            type=events_pb2.DriverEvent.LOCATION,
            location=HERE,
        )
    )
    assert violations(driver) == []
    kitchen = events_pb2.Event(
        kitchen=events_pb2.KitchenEvent(
            event_id="e3",
            event_time=timestamp_from_ms(NOW),
            restaurant_id="r1",
            type=events_pb2.KitchenEvent.ORDER_READY,
            order_id="o1",
        )
    )
    assert violations(kitchen) == []


def test_empty_event_is_rejected() -> None:
    assert violations(events_pb2.Event()) == [("payload", "one of driver, kitchen, order is required")]


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"event_id": ""}, "order.event_id"),
        ({"event_id": "x" * 129}, "order.event_id"),
        ({"event_id": " padded"}, "order.event_id"),
        ({"order_id": ""}, "order.order_id"),
        ({"restaurant_id": ""}, "order.restaurant_id"),
        ({"customer_id": ""}, "order.customer_id"),
        ({"type": 0}, "order.type"),
        ({"type": 99}, "order.type"),
        ({"event_time": timestamp_from_ms(NOW + 301_000)}, "order.event_time"),
        ({"event_time": timestamp_from_ms(NOW - 86_400_001)}, "order.event_time"),
        ({"customer_location": events_pb2.GeoPoint(lat=91, lng=0)}, "order.customer_location.lat"),
        ({"customer_location": events_pb2.GeoPoint(lat=1, lng=-181)}, "order.customer_location.lng"),
        ({"customer_location": events_pb2.GeoPoint(lat=float("nan"), lng=1)}, "order.customer_location.lat"),
        ({"customer_location": events_pb2.GeoPoint(lat=0, lng=0)}, "order.customer_location"),
    ],
)
def test_each_rule_names_the_field(overrides: dict[str, object], field: str) -> None:
    found = violations(order(**overrides))
    assert [f for f, _ in found] == [field], found
    assert all(reason for _, reason in found)


def test_missing_time_and_location_are_required() -> None:
    event = order()
    event.order.ClearField("event_time")
    event.order.ClearField("restaurant_location")
    assert violations(event) == [("order.event_time", "required"), ("order.restaurant_location", "required")]


def test_type_specific_requirements() -> None:
    picked = order(type=events_pb2.OrderEvent.PICKED_UP, customer_id="")
    picked.order.ClearField("customer_location")
    assert violations(picked) == [("order.driver_id", "required")]
    assigned = events_pb2.Event(
        driver=events_pb2.DriverEvent(
            event_id="e",
            event_time=timestamp_from_ms(NOW),
            driver_id="d",
            type=events_pb2.DriverEvent.ASSIGNED,
            location=HERE,
        )
    )
    assert violations(assigned) == [("driver.order_id", "required")]
    accepted = events_pb2.Event(
        kitchen=events_pb2.KitchenEvent(
            event_id="e",
            event_time=timestamp_from_ms(NOW),
            restaurant_id="r",
            type=events_pb2.KitchenEvent.ORDER_ACCEPTED,
        )
    )
    assert violations(accepted) == [("kitchen.order_id", "required")]


@pytest.mark.parametrize(
    ("event", "field"),
    [
        (order(type=events_pb2.OrderEvent.CANCELLED, customer_id=" x"), "order.customer_id"),
        (order(type=events_pb2.OrderEvent.PLACED, driver_id="d" * 129), "order.driver_id"),
    ],
)
def test_optional_ids_follow_the_id_rules_when_set(event: events_pb2.Event, field: str) -> None:
    assert [f for f, _ in violations(event)] == [field]


def test_optional_ids_of_driver_and_kitchen_events() -> None:
    ping = events_pb2.Event(
        driver=events_pb2.DriverEvent(
            event_id="e",
            event_time=timestamp_from_ms(NOW),
            driver_id="d",
            type=events_pb2.DriverEvent.LOCATION,
            location=HERE,
            order_id="\n",
        )
    )
    assert [f for f, _ in violations(ping)] == ["driver.order_id"]
    opened = events_pb2.Event(
        kitchen=events_pb2.KitchenEvent(
            event_id="e",
            event_time=timestamp_from_ms(NOW),
            restaurant_id="r",
            type=events_pb2.KitchenEvent.OPENED,
        )
    )
    assert violations(opened) == []
    opened.kitchen.order_id = "o" * 200
    assert [f for f, _ in violations(opened)] == ["kitchen.order_id"]


def test_event_type_names_for_metrics() -> None:
    assert event_type_of(order()) == "PLACED"
    assert event_type_of(order(type=77)) == "invalid"
    assert event_type_of(events_pb2.Event()) == "none"
