"""The batch pipeline (validate → dedup → Kafka → answer) with an in-memory producer and Redis: every
status is the honest one, claims are settled or released, and — for thousands of random requests — no
reply is malformed and nothing invalid is handed to the producer."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eta.v1 import events_pb2, ingestion_pb2
from eta_common.kafka import Topics
from eta_common.timeutil import ms_from_timestamp
from ingestion.dedup import ACCEPTED, PENDING, DedupStore
from ingestion.pipeline import Ingestor
from ingestion.publisher import Publisher
from ingestion.tests.fakes import FakeProducer, FakeRedis
from ingestion.tests.strategies import requests
from ingestion.tests.support import driver_ping, event_id, new_id, order_placed, statuses
from ingestion.validation import ValidationLimits, validate_event

Result = ingestion_pb2.EventResult
LIMITS = ValidationLimits()
TOPICS = Topics("eta.driver-events", "eta.kitchen-events", "eta.order-events")


def _ingestor(producer: FakeProducer, redis: FakeRedis, *, ttl: int = 60) -> Ingestor:
    return Ingestor(
        publisher=Publisher(producer, TOPICS, replica="test"),
        dedup=DedupStore(redis, ttl_seconds=ttl, pending_ttl_seconds=5),  # type: ignore[arg-type]
        limits=LIMITS,
    )


async def _run(
    ingestor: Ingestor, events: list[events_pb2.Event], *, timeout: float = 1.0
) -> ingestion_pb2.PublishEventsResponse:
    request = ingestion_pb2.PublishEventsRequest(events=events, sequence=9)
    deadline = asyncio.get_running_loop().time() + timeout
    return await ingestor.complete(await ingestor.prepare(request, deadline=deadline))


async def test_statuses_and_what_reaches_the_producer() -> None:
    producer, redis = FakeProducer(), FakeRedis()
    ingestor = _ingestor(producer, redis)
    good, other = order_placed(new_id("rest")), driver_ping(new_id("drv"))
    bad = driver_ping("d")
    bad.driver.type = events_pb2.DriverEvent.TYPE_UNSPECIFIED
    reply = await _run(ingestor, [good, bad, other, good])
    assert statuses(reply) == ["ACCEPTED", "REJECTED", "ACCEPTED", "DUPLICATE"]
    assert reply.sequence == 9
    assert (reply.accepted, reply.rejected, reply.duplicates, reply.unavailable) == (2, 1, 1, 0)
    assert [r.topic for r in producer.records] == ["eta.order-events", "eta.driver-events"]
    envelope = events_pb2.EventEnvelope.FromString(producer.records[0].value)
    assert envelope.event == good
    assert envelope.ingested_by == "test"
    assert redis._get(DedupStore.key(event_id(good))) == ACCEPTED
    again = await _run(ingestor, [good])
    assert statuses(again) == ["DUPLICATE"]
    assert "accepted earlier" in again.results[0].detail
    assert len(producer.records) == 2  # not republished


@pytest.mark.parametrize("mode", ["fail", "hold", "refuse"])
async def test_unacknowledged_events_are_unavailable_and_their_claims_released(mode: str) -> None:
    producer, redis = FakeProducer(mode=mode), FakeRedis()
    ingestor = _ingestor(producer, redis)
    events = [driver_ping(new_id("drv")) for _ in range(3)]
    reply = await _run(ingestor, [*events, events[0]], timeout=0.2)
    assert statuses(reply) == ["UNAVAILABLE"] * 4  # the in-request copy shares the first copy's fate
    assert all("retry" in r.detail for r in reply.results)
    assert not redis.data  # the retry will not be mistaken for a duplicate
    producer.mode = "ack"
    assert statuses(await _run(ingestor, events)) == ["ACCEPTED"] * 3


async def test_event_being_published_elsewhere_is_unavailable_not_duplicate() -> None:
    producer, redis = FakeProducer(mode="hold"), FakeRedis()
    ingestor = _ingestor(producer, redis)
    event = order_placed(new_id("rest"))
    first = asyncio.create_task(_run(ingestor, [event], timeout=5))
    await asyncio.sleep(0.05)
    assert redis._get(DedupStore.key(event_id(event))) == PENDING
    second = await _run(ingestor, [event])
    assert statuses(second) == ["UNAVAILABLE"]
    assert "right now" in second.results[0].detail
    producer.ack_all()
    assert statuses(await first) == ["ACCEPTED"]
    assert statuses(await _run(ingestor, [event])) == ["DUPLICATE"]


async def test_cancelled_call_releases_its_claims() -> None:
    producer, redis = FakeProducer(mode="hold"), FakeRedis()
    ingestor = _ingestor(producer, redis)
    event = order_placed(new_id("rest"))
    call = asyncio.create_task(_run(ingestor, [event], timeout=5))
    await asyncio.sleep(0.05)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    for _ in range(5):
        await asyncio.sleep(0)
    assert not redis.data
    assert producer.records[0].future.cancelled()


async def test_dedup_fails_open_when_redis_is_down() -> None:
    producer, redis = FakeProducer(), FakeRedis()
    redis.down = True
    event = order_placed(new_id("rest"))
    reply = await _run(_ingestor(producer, redis), [event, event])
    assert statuses(reply) == ["ACCEPTED", "DUPLICATE"]  # in-request copies are still caught
    assert len(producer.records) == 1


async def test_no_time_left_means_unavailable_without_publishing() -> None:
    producer = FakeProducer()
    reply = await _run(_ingestor(producer, FakeRedis()), [driver_ping(new_id("drv"))], timeout=-0.01)
    assert statuses(reply) == ["UNAVAILABLE"]
    assert not producer.records


@settings(max_examples=400, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    request=requests(lambda: int(time.time()), LIMITS),
    mode=st.sampled_from(["ack", "ack", "ack", "fail", "refuse"]),
)
def test_random_requests_get_well_formed_truthful_replies(
    request: ingestion_pb2.PublishEventsRequest, mode: str
) -> None:
    """For any request: one result per event in order, a status that matches what happened to the
    event, and only valid events handed to the producer."""
    asyncio.run(_check_random_request(request, mode))


_REDIS = FakeRedis()  # shared across examples, so resends and duplicates come up


async def _check_random_request(request: ingestion_pb2.PublishEventsRequest, mode: str) -> None:
    producer = FakeProducer(mode=mode)
    ingestor = _ingestor(producer, _REDIS)
    before = {key: value for key, (value, _) in _REDIS.data.items()}
    sent_ms = int(time.time() * 1000)
    reply = await _run(ingestor, list(request.events), timeout=0.5)

    assert len(reply.results) == len(request.events)
    published: dict[str, Any] = {}
    for record in producer.records:
        envelope = events_pb2.EventEnvelope.FromString(record.value)
        assert (
            validate_event(envelope.event, now_ms=ms_from_timestamp(envelope.ingest_time), limits=LIMITS)
            == []
        )
        published[event_id(envelope.event)] = record.future
    for i, (event, result) in enumerate(zip(request.events, reply.results, strict=True)):
        assert result.index == i
        assert result.event_id == event_id(event)
        violations = validate_event(event, now_ms=sent_ms, limits=LIMITS)
        assert (result.status == Result.REJECTED) == bool(violations)
        assert [(v.field, v.description) for v in result.violations] == violations
        if result.status == Result.ACCEPTED:
            future = published[result.event_id]
            assert future.done()
            assert not future.cancelled()
            assert future.exception() is None
        elif result.status == Result.DUPLICATE:
            key = DedupStore.key(result.event_id)
            earlier = [r for r in reply.results[:i] if r.event_id == result.event_id]
            assert before.get(key) == ACCEPTED or any(r.status == Result.ACCEPTED for r in earlier)
        elif result.status == Result.UNAVAILABLE:
            assert mode != "ack" or before.get(DedupStore.key(result.event_id)) == PENDING
        else:
            assert result.status == Result.REJECTED
