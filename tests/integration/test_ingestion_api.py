"""The ingestion API as an app backend sees it, on the shared session stack: the streaming RPC's
protocol, per-event statuses, rich errors for whole-call failures, unknown fields, and the spans and
metrics that explain what happened."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from devstack.stack import LocalStack
from eta.v1 import events_pb2, ingestion_pb2, ingestion_pb2_grpc
from ingestion.tests.support import driver_ping, event_id, new_id, order_placed, read_topics, scrape, statuses
from tests.integration.conftest import poll_until

pytestmark = pytest.mark.integration
Result = ingestion_pb2.EventResult


def _stub(channels: dict[str, grpc.aio.Channel]) -> ingestion_pb2_grpc.IngestionServiceStub:
    return ingestion_pb2_grpc.IngestionServiceStub(channels["ingestion"])


async def _drain(call: Any) -> tuple[list[ingestion_pb2.PublishEventsResponse], grpc.aio.AioRpcError | None]:
    """Every answer of a stream, and the error it ended with (None for OK)."""
    answers = []
    try:
        async for answer in call:
            answers.append(answer)
    except grpc.aio.AioRpcError as error:
        return answers, error
    return answers, None


def _bad_request(error: grpc.aio.AioRpcError) -> list[tuple[str, str]]:
    status = rpc_status.from_call(error)
    assert status is not None
    details = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(details)
    return [(v.field, v.description) for v in details.field_violations]


async def test_stream_answers_each_chunk_in_order_with_per_event_statuses(
    channels: dict[str, grpc.aio.Channel], stack: LocalStack
) -> None:
    driver = new_id("drv")
    pings = [driver_ping(driver) for _ in range(6)]
    off_the_map = driver_ping(driver)
    off_the_map.driver.location.lat = 91.0
    chunks = [
        [pings[0], pings[1]],
        [pings[2], off_the_map, pings[3]],  # a bad event does not fail its chunk-mates
        [pings[0], pings[4]],  # pings[0] again: DUPLICATE, not republished
        [],
        [pings[5], pings[5]],  # the same event twice in one chunk
    ]
    call = _stub(channels).StreamEvents(timeout=30)
    answers = []
    for sequence, events in enumerate(chunks, start=100):
        await call.write(ingestion_pb2.PublishEventsRequest(events=events, sequence=sequence))
        if sequence == 101:  # resend pings[0] only once it was answered (while in flight it is UNAVAILABLE)
            answers += [await call.read(), await call.read()]
    await call.done_writing()
    while (answer := await call.read()) != grpc.aio.EOF:
        answers.append(answer)
    assert await call.code() == grpc.StatusCode.OK

    assert [a.sequence for a in answers] == [100, 101, 102, 103, 104]
    assert [statuses(a) for a in answers] == [
        ["ACCEPTED", "ACCEPTED"],
        ["ACCEPTED", "REJECTED", "ACCEPTED"],
        ["DUPLICATE", "ACCEPTED"],
        [],
        ["ACCEPTED", "DUPLICATE"],
    ]
    assert [(v.field, v.description) for v in answers[1].results[1].violations] == [
        ("driver.location.lat", "must be within [-90, 90]")
    ]
    assert "accepted earlier" in answers[2].results[0].detail
    assert (answers[1].accepted, answers[1].rejected, answers[2].duplicates) == (2, 1, 1)

    records = await read_topics(stack.kafka, ["eta.driver-events"])
    ours = [r for r in records if r.key == driver.encode()]
    # each accepted event once, in the order it was sent (one key, one partition)
    assert [r.event_id() for r in ours] == [event_id(p) for p in pings]


async def test_undecodable_bytes_are_invalid_argument_with_bad_request_details(
    channels: dict[str, grpc.aio.Channel],
) -> None:
    raw = channels["ingestion"].unary_unary(
        "/eta.v1.IngestionService/PublishEvents",
        response_deserializer=ingestion_pb2.PublishEventsResponse.FromString,
    )
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await raw(b"\xff\xff\xff\xff not protobuf", timeout=5)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    [(field, description)] = _bad_request(info.value)
    assert field == "request"
    assert "not a valid eta.v1.PublishEventsRequest" in description

    stream = channels["ingestion"].stream_stream(
        "/eta.v1.IngestionService/StreamEvents",
        response_deserializer=ingestion_pb2.PublishEventsResponse.FromString,
    )(timeout=10)
    good = ingestion_pb2.PublishEventsRequest(events=[driver_ping(new_id("drv"))], sequence=1)
    await stream.write(good.SerializeToString())
    await stream.write(b"\x0a\xff\x01")  # field 1, length 255, then nothing
    answers, ended = await _drain(stream)
    assert [(a.sequence, a.accepted) for a in answers] == [(1, 1)]  # the chunk before was answered
    assert ended is not None
    assert ended.code() == grpc.StatusCode.INVALID_ARGUMENT
    [(field, description)] = _bad_request(ended)
    assert (field, description.startswith("chunk 1: not a valid")) == ("request", True)


async def test_oversized_chunk_ends_the_stream_after_answering_the_earlier_ones(
    channels: dict[str, grpc.aio.Channel],
) -> None:
    call = _stub(channels).StreamEvents(timeout=10)
    await call.write(ingestion_pb2.PublishEventsRequest(events=[driver_ping(new_id("drv"))], sequence=7))
    await call.write(
        ingestion_pb2.PublishEventsRequest(events=[driver_ping(new_id("drv"))] * 501, sequence=8)
    )
    answers, ended = await _drain(call)
    assert [a.sequence for a in answers] == [7]
    assert ended is not None
    assert ended.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _bad_request(ended) == [("events", "chunk 1: at most 500 events per call, got 501")]


async def test_unknown_fields_never_reach_the_topic(
    channels: dict[str, grpc.aio.Channel], stack: LocalStack
) -> None:
    """A field this server does not know (e.g. from a newer client) is dropped, not forwarded unchecked."""
    restaurant = new_id("rest")
    event = order_placed(restaurant)
    unknown = bytes([0xF8, 0x07, 0x2A])  # field 127 = 42 (varint): in neither Event nor OrderEvent
    sneaky = events_pb2.Event.FromString(event.SerializeToString() + unknown)
    sneaky.order.MergeFromString(unknown)
    request = ingestion_pb2.PublishEventsRequest(events=[sneaky])
    assert (
        request.SerializeToString() != ingestion_pb2.PublishEventsRequest(events=[event]).SerializeToString()
    )
    reply = await _stub(channels).PublishEvents(request, timeout=10)
    assert statuses(reply) == ["ACCEPTED"]
    records = [
        r for r in await read_topics(stack.kafka, ["eta.order-events"]) if r.key == restaurant.encode()
    ]
    assert [r.envelope().event.SerializeToString() for r in records] == [event.SerializeToString()]


async def test_spans_per_rpc_and_per_kafka_produce(
    channels: dict[str, grpc.aio.Channel], spans_of: Callable[[], list[dict[str, Any]]]
) -> None:
    pings = [driver_ping(new_id("drv")) for _ in range(3)]
    call = _stub(channels).StreamEvents(timeout=10)
    await call.write(ingestion_pb2.PublishEventsRequest(events=pings[:2], sequence=1))
    await call.write(ingestion_pb2.PublishEventsRequest(events=pings[2:], sequence=2))
    await call.done_writing()
    assert [a.accepted async for a in call] == [2, 1]
    ids = {event_id(p) for p in pings}

    def find(spans: list[dict[str, Any]]) -> tuple[dict[str, Any], list[dict[str, Any]]] | None:
        producers = [
            s for s in spans if s["kind"] == "PRODUCER" and s["attributes"].get("messaging.message.id") in ids
        ]
        if len(producers) < 3:
            return None
        parent = next((s for s in spans if s["span_id"] == producers[0]["parent_span_id"]), None)
        return (parent, producers) if parent is not None else None

    server, producers = await poll_until(lambda: find(spans_of()), lambda found: found is not None)
    assert server["name"] == "eta.v1.IngestionService/StreamEvents"
    assert server["kind"] == "SERVER"
    assert server["attributes"]["rpc.system"] == "grpc"
    assert server["attributes"]["rpc.method"] == "StreamEvents"
    assert server["attributes"]["eta.chunks"] == 2
    assert server["attributes"]["eta.events.accepted"] == 3
    assert server["attributes"]["rpc.grpc.status_code"] == 0
    for span in producers:
        attributes = span["attributes"]
        assert span["parent_span_id"] == server["span_id"]
        assert span["name"] == "send eta.driver-events"
        assert attributes["messaging.system"] == "kafka"
        assert attributes["messaging.operation.type"] == "send"
        assert attributes["messaging.destination.name"] == "eta.driver-events"
        assert attributes["messaging.destination.partition.id"] in {"0", "1", "2"}
        assert attributes["messaging.kafka.offset"] >= 0
        assert attributes["messaging.kafka.message.key"].startswith("drv-")
        assert span["status"] == "UNSET"


async def test_metrics_count_events_by_kind_type_and_status(
    channels: dict[str, grpc.aio.Channel], stack: LocalStack
) -> None:
    port = stack.ports.metrics["ingestion"]
    accepted = 'eta_ingestion_events_total{kind="order",status="accepted",type="PLACED"}'
    rejected = 'eta_ingestion_events_total{kind="driver",status="rejected",type="LOCATION"}'
    before = await asyncio.to_thread(scrape, port)
    bad = driver_ping(new_id("drv"))
    bad.driver.driver_id = ""
    reply = await _stub(channels).PublishEvents(
        ingestion_pb2.PublishEventsRequest(events=[order_placed(new_id("rest")), bad]), timeout=10
    )
    assert statuses(reply) == ["ACCEPTED", "REJECTED"]
    after = await asyncio.to_thread(scrape, port)
    assert after[accepted] - before.get(accepted, 0) == 1
    assert after[rejected] - before.get(rejected, 0) == 1
    assert after["eta_ingestion_publish_seconds_count"] > before.get("eta_ingestion_publish_seconds_count", 0)
    assert after["eta_ingestion_in_flight_events"] == 0
    assert after["eta_ingestion_in_flight_limit"] == 10_000
    assert "eta_ingestion_open_streams" in after
