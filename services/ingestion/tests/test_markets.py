"""market_id on events: optional (empty = the default market), validated with a field-level reason when set,
and published as sent in the Kafka payload (the event message itself)."""

from __future__ import annotations

import asyncio

import pytest

from eta.v1 import events_pb2, ingestion_pb2
from eta_common.event_facts import event_facts
from eta_common.kafka import Topics
from eta_common.timeutil import timestamp_from_ms
from ingestion.dedup import DedupStore
from ingestion.pipeline import Ingestor
from ingestion.publisher import Publisher
from ingestion.tests.fakes import FakeProducer, FakeRedis
from ingestion.tests.support import new_id, statuses
from ingestion.validation import MARKET_ID_REASON, ValidationLimits, validate_event

NOW = 1_800_000_000_000
LIMITS = ValidationLimits(max_future_skew_ms=300_000, max_age_ms=86_400_000)
HERE = events_pb2.GeoPoint(lat=52.52, lng=13.405)


def _events(market: str) -> dict[str, events_pb2.Event]:
    t = timestamp_from_ms(NOW - 1000)
    return {
        "driver": events_pb2.Event(
            driver=events_pb2.DriverEvent(
                event_id=new_id("e"), event_time=t, driver_id="d1", type=events_pb2.DriverEvent.LOCATION,
                location=HERE, market_id=market,
            )
        ),
        "kitchen": events_pb2.Event(
            kitchen=events_pb2.KitchenEvent(
                event_id=new_id("e"), event_time=t, restaurant_id="r1", type=events_pb2.KitchenEvent.BUSY,
                market_id=market,
            )
        ),
        "order": events_pb2.Event(
            order=events_pb2.OrderEvent(
                event_id=new_id("e"), event_time=t, order_id="o1", restaurant_id="r1", customer_id="c1",
                type=events_pb2.OrderEvent.PLACED, restaurant_location=HERE,
                customer_location=events_pb2.GeoPoint(lat=52.5, lng=13.4), market_id=market,
            )
        ),
    }  # fmt: skip


@pytest.mark.parametrize("market", ["", "berlin", "de.munich-2", "A_b.c-9", "x" * 64])
@pytest.mark.parametrize("kind", ["driver", "kitchen", "order"])
def test_valid_or_absent_market_passes_and_is_read_into_the_facts(kind: str, market: str) -> None:
    event = _events(market)[kind]
    assert validate_event(event, now_ms=NOW, limits=LIMITS) == []
    facts = event_facts(event)
    assert facts is not None
    assert facts.market == market


@pytest.mark.parametrize(
    "market", ["x" * 65, "drv:{berlin}", "ber lin", "berlin\n", " berlin", "münchen", "a/b", "{x}"]
)
@pytest.mark.parametrize("kind", ["driver", "kitchen", "order"])
def test_bad_market_is_rejected_on_its_field(kind: str, market: str) -> None:
    found = validate_event(_events(market)[kind], now_ms=NOW, limits=LIMITS)
    assert found == [(f"{kind}.market_id", MARKET_ID_REASON)]


async def test_market_is_published_in_the_kafka_payload() -> None:
    producer = FakeProducer()
    ingestor = Ingestor(
        publisher=Publisher(producer, Topics("d", "k", "o"), replica="test"),
        dedup=DedupStore(FakeRedis(), ttl_seconds=60, pending_ttl_seconds=5),  # type: ignore[arg-type]
        limits=ValidationLimits(),
    )
    events = [
        _events(market)[kind] for kind, market in (("driver", "berlin"), ("kitchen", "munich"), ("order", ""))
    ]
    bad = _events("no:colons")["driver"]
    request = ingestion_pb2.PublishEventsRequest(events=[*events, bad])
    for event in request.events:  # event times at the real clock (the pipeline checks against it)
        kind = event.WhichOneof("payload")
        assert kind is not None
        getattr(event, kind).event_time.GetCurrentTime()
    deadline = asyncio.get_running_loop().time() + 1.0
    reply = await ingestor.complete(await ingestor.prepare(request, deadline=deadline))
    assert statuses(reply) == ["ACCEPTED", "ACCEPTED", "ACCEPTED", "REJECTED"]
    assert [(v.field, v.description) for v in reply.results[3].violations] == [
        ("driver.market_id", MARKET_ID_REASON)
    ]
    published = [events_pb2.EventEnvelope.FromString(r.value).event for r in producer.records]
    assert [e.driver.market_id or e.kitchen.market_id or e.order.market_id for e in published] == [
        "berlin",
        "munich",
        "",
    ]
    assert published == list(request.events[:3])
