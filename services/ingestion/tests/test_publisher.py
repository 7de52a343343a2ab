"""The Kafka hand-off: byte-exact envelopes, order kept, and a record counts as published only when its
broker acknowledgement arrived before the deadline."""

from __future__ import annotations

import asyncio
import time

from hypothesis import given, settings
from hypothesis import strategies as st

from eta.v1 import events_pb2
from eta_common.kafka import Topics
from eta_common.timeutil import timestamp_from_ms
from ingestion.publisher import Publisher, envelope_bytes, envelope_suffix
from ingestion.tests.fakes import FakeProducer, Meta
from ingestion.tests.strategies import events
from ingestion.tests.support import driver_ping, event_id, new_id
from ingestion.validation import ValidationLimits

TOPICS = Topics("eta.driver-events", "eta.kitchen-events", "eta.order-events")
TS = timestamp_from_ms(1_800_000_000_123)


@settings(max_examples=300, deadline=None, database=None)
@given(event=events(lambda: int(time.time()), ValidationLimits()), replica=st.text(max_size=300))
def test_envelope_bytes_match_the_message_serialization(event: events_pb2.Event, replica: str) -> None:
    expected = events_pb2.EventEnvelope(event=event, ingest_time=TS, ingested_by=replica).SerializeToString()
    assert envelope_bytes(event.SerializeToString(), envelope_suffix(TS, replica)) == expected


def test_envelope_bytes_with_a_long_event() -> None:
    event = driver_ping("d" * 128, event_id="e" * 128)
    event.driver.order_id = "o" * 5000  # length prefix needs two varint bytes
    expected = events_pb2.EventEnvelope(event=event, ingest_time=TS, ingested_by="r").SerializeToString()
    assert envelope_bytes(event.SerializeToString(), envelope_suffix(TS, "r")) == expected


async def _publish(producer: FakeProducer, batch: list[events_pb2.Event], timeout: float) -> dict[int, str]:
    publisher = Publisher(producer, TOPICS, replica="r")
    deadline = asyncio.get_running_loop().time() + timeout
    pending = await publisher.send(batch, list(range(len(batch))), ingest_time=TS, deadline=deadline)
    return await pending.wait()


async def test_records_are_handed_over_in_order_and_acked() -> None:
    producer = FakeProducer()
    batch = [driver_ping("same-driver") for _ in range(5)]
    assert await _publish(producer, batch, 1.0) == {}
    sent = [events_pb2.EventEnvelope.FromString(r.value).event for r in producer.records]
    assert [event_id(e) for e in sent] == [event_id(e) for e in batch]
    assert {r.key for r in producer.records} == {b"same-driver"}


async def test_only_records_acked_before_the_deadline_count() -> None:
    producer = FakeProducer(mode="hold")
    batch = [driver_ping(new_id("drv")) for _ in range(3)]

    async def ack_first_then_late() -> None:
        await asyncio.sleep(0.01)
        producer.ack(producer.records[0])
        await asyncio.sleep(0.3)
        producer.ack(producer.records[1])  # after the deadline: too late

    acker = asyncio.create_task(ack_first_then_late())
    failed = await _publish(producer, batch, 0.1)
    await acker
    assert failed == {1: "timeout", 2: "timeout"}
    assert producer.records[2].future.cancelled()  # nobody waits for it any more


async def test_producer_errors_fail_only_their_records() -> None:
    producer = FakeProducer(mode="fail")
    assert await _publish(producer, [driver_ping(new_id("drv"))], 1.0) == {0: "ConnectionResetError"}
    producer = FakeProducer(mode="refuse")
    assert await _publish(producer, [driver_ping(new_id("drv"))] * 2, 1.0) == {
        0: "TimeoutError",
        1: "TimeoutError",
    }


async def test_records_not_handed_over_before_the_deadline_fail() -> None:
    class Slow(FakeProducer):
        async def send(
            self,
            topic: str,
            value: bytes,
            key: bytes | None = None,
            partition: int | None = None,
            headers: list[tuple[str, bytes]] | None = None,
        ) -> asyncio.Future[Meta]:
            await asyncio.sleep(0.2)  # e.g. waiting for metadata while the broker is down
            return await super().send(topic, value, key, partition, headers)

    failed = await _publish(Slow(), [driver_ping(new_id("drv")) for _ in range(3)], 0.05)
    assert failed == {0: "timeout", 1: "timeout", 2: "timeout"}


def test_partitions_are_the_default_partitioners_choice() -> None:
    from aiokafka.partitioner import DefaultPartitioner

    from ingestion.publisher import _Partitions

    class Cluster:
        partitions: set[int] = {0, 1, 2}

        def partitions_for_topic(self, topic: str) -> set[int]:
            return self.partitions

    producer = FakeProducer()
    producer.client = type("Client", (), {"cluster": Cluster()})()
    pick = _Partitions(producer)
    keys = [f"drv-{i}".encode() for i in range(200)]
    expected = [DefaultPartitioner()(k, [0, 1, 2], [0, 1, 2]) for k in keys]
    assert [pick("t", k) for k in keys] == expected
    assert [pick("t", k) for k in keys] == expected  # memoised, same answers
    Cluster.partitions = {0, 1, 2, 3, 4}  # partitions added: new mapping, as the producer would do
    assert [pick("t", k) for k in keys] == [DefaultPartitioner()(k, [0, 1, 2, 3, 4], []) for k in keys]
