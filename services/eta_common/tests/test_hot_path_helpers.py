"""The aggregator's hot-path helpers: bulk histogram, sampled-parent check, one-pass event facts."""

from __future__ import annotations

import random

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from eta.v1 import events_pb2
from eta_common.bulk_histogram import BulkHistogram
from eta_common.db.archive import ArchivedEvent, event_row
from eta_common.event_facts import EventFacts, event_facts
from eta_common.online_store import DriverUpdate, RestaurantUpdate, update_from_event
from eta_common.telemetry import headers_with_context, sampled_parent_from_headers
from eta_common.timeutil import timestamp_from_ms

BUCKETS = (0.005, 0.01, 0.1, 1.0, 5.0)


def _series(registry: CollectorRegistry) -> list[str]:
    return [
        line
        for line in generate_latest(registry).decode().splitlines()
        if line and not line.startswith("#") and "_created" not in line
    ]


def test_bulk_histogram_exposes_exactly_what_prometheus_client_would() -> None:
    rng = random.Random(7)
    values = [
        rng.choice([0.0, 0.005, 0.01, 1.0, 7.5]) if i % 5 == 0 else rng.expovariate(3) for i in range(500)
    ]
    bulk_registry, reference_registry = CollectorRegistry(), CollectorRegistry()
    bulk = BulkHistogram("lag_seconds", "doc", BUCKETS, registry=bulk_registry)
    reference = Histogram("lag_seconds", "doc", buckets=BUCKETS, registry=reference_registry)
    bulk.observe_many(values[:300])
    bulk.observe_many(iter(values[300:499]))
    bulk.observe(values[499])
    for value in values:
        reference.observe(value)
    got, want = _series(bulk_registry), _series(reference_registry)
    assert [line.rsplit(" ", 1)[0] for line in got] == [line.rsplit(" ", 1)[0] for line in want]
    for g, w in zip(got, want, strict=True):
        assert float(g.rsplit(" ", 1)[1]) == pytest.approx(float(w.rsplit(" ", 1)[1]))


@pytest.fixture(scope="module")
def tracer() -> trace.Tracer:
    return TracerProvider().get_tracer("test")


def test_sampled_parent_only_for_a_sampled_producer(tracer: trace.Tracer) -> None:
    with tracer.start_as_current_span("produce") as span:
        sampled = [(k, v) for k, v in headers_with_context()]
    ctx = sampled_parent_from_headers(sampled)
    assert ctx is not None
    assert trace.get_current_span(ctx).get_span_context().span_id == span.get_span_context().span_id

    unsampled = [(k, v[:-2] + b"00") if k == "traceparent" else (k, v) for k, v in sampled]
    assert sampled_parent_from_headers(unsampled) is None
    assert sampled_parent_from_headers([]) is None
    assert sampled_parent_from_headers(None) is None
    assert sampled_parent_from_headers([("x-other", b"1")]) is None
    assert sampled_parent_from_headers([("traceparent", b"garbage-01")]) is None  # invalid: no parent


def _event(**payload: object) -> events_pb2.Event:
    return events_pb2.Event(**payload)  # type: ignore[arg-type]


T = 1_800_000_000_123
AT = events_pb2.GeoPoint(lat=52.5, lng=13.4)


@pytest.mark.parametrize(
    ("event", "update"),
    [
        (
            _event(
                driver=events_pb2.DriverEvent(
                    event_id="e1", event_time=timestamp_from_ms(T), driver_id="d1",
                    type=events_pb2.DriverEvent.ASSIGNED, location=AT, order_id="o1",
                )
            ),
            DriverUpdate("d1", "ASSIGNED", T, 52.5, 13.4, "", "o1"),
        ),
        (
            _event(
                kitchen=events_pb2.KitchenEvent(
                    event_id="e2", event_time=timestamp_from_ms(T), restaurant_id="r1",
                    type=events_pb2.KitchenEvent.ORDER_READY, order_id="o1",
                )
            ),
            RestaurantUpdate("r1", "ORDER_READY", "o1", T),
        ),
        (
            _event(
                order=events_pb2.OrderEvent(
                    event_id="e3", event_time=timestamp_from_ms(T), restaurant_id="r1", order_id="o1",
                    customer_id="c1", type=events_pb2.OrderEvent.PLACED, restaurant_location=AT,
                    customer_location=events_pb2.GeoPoint(lat=52.6, lng=13.5),
                )
            ),
            RestaurantUpdate("r1", "PLACED", "o1", T, 52.5, 13.4),
        ),
        (
            _event(
                order=events_pb2.OrderEvent(
                    event_id="e4", event_time=timestamp_from_ms(T), restaurant_id="r1", order_id="o1",
                    type=events_pb2.OrderEvent.DELIVERED, driver_id="d1",
                )
            ),
            None,  # archived only
        ),
        (
            _event(kitchen=events_pb2.KitchenEvent(event_id="e5", restaurant_id="r1", type=99)),  # type: ignore[arg-type]
            None,  # a type this build does not know: no online effect, still archivable
        ),
    ],
)  # fmt: skip
def test_one_pass_facts_give_the_update_and_the_archive_row(
    event: events_pb2.Event, update: RestaurantUpdate | DriverUpdate | None
) -> None:
    assert update_from_event(event) == update
    facts = event_facts(event)
    assert facts is not None
    # the hot path builds these tuples without the NamedTuples' __new__: every field is given
    assert type(facts) is EventFacts
    assert facts == EventFacts(*facts)
    assert len(facts) == len(EventFacts._fields)
    made = update_from_event(event)
    if made is not None:
        assert len(made) == len(type(made)._fields)
        assert made == type(made)(*made)
    row = event_row(ArchivedEvent(event, T + 5, "topic", 0, 1))
    assert row == event_row(ArchivedEvent(event, T + 5, "topic", 0, 1, None, facts))
    assert row[0] == facts.event_id
    assert row[1] == facts.kind
    assert events_pb2.Event.FromString(row[13]) == event


def test_an_event_without_payload_has_no_facts() -> None:
    assert event_facts(events_pb2.Event()) is None
    assert update_from_event(events_pb2.Event()) is None
    with pytest.raises(ValueError, match="no payload"):
        event_row(ArchivedEvent(events_pb2.Event(), T))
