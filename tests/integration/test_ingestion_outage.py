"""Broker outage: ACCEPTED events are never lost, and what could not be acknowledged in time is answered
UNAVAILABLE (retryable) — never ACCEPTED. Client deadlines are honoured while the broker is away.

This module runs its own stack (broker, Redis, one ingestion process) so that killing the broker does not
disturb the shared session stack. Ingestion reaches the broker through a Kafka-protocol proxy (see
``KafkaProxy``); the test reads the topics straight from the broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Iterator

import grpc
import pytest

from devstack.infra import start_broker
from devstack.stack import LocalStack, ServicePorts
from eta.v1 import events_pb2, ingestion_pb2, ingestion_pb2_grpc
from eta_common.config import KafkaSettings
from eta_common.kafka import ensure_topics
from ingestion.tests.support import KafkaProxy, TopicRecord, driver_ping, event_id, new_id, read_topics
from tests.integration.conftest import poll_until

pytestmark = pytest.mark.integration
Result = ingestion_pb2.EventResult
PUBLISH_TIMEOUT_SECONDS = 1.0
CHUNK_EVENTS = 20


@pytest.fixture(scope="module")
def outage(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalStack, KafkaProxy]]:
    workdir = tmp_path_factory.mktemp("ingestion-outage")
    stack = LocalStack(
        workdir, ports=ServicePorts.free(), use_env_endpoints=False, extra_env={"LOG_FORMAT": "json"}
    )
    proxy: KafkaProxy | None = None
    try:
        stack.start_infra()
        proxy = KafkaProxy(stack.kafka, stack.log_dir)
        proxy.start()
        stack.start_service(
            "ingestion",
            extra_env={
                "KAFKA_BOOTSTRAP_SERVERS": proxy.address,
                "INGESTION_PUBLISH_TIMEOUT_SECONDS": str(PUBLISH_TIMEOUT_SECONDS),
                "SHUTDOWN_GRACE_SECONDS": "1",
            },
        )
        yield stack, proxy
    finally:
        if proxy is not None:
            proxy.stop()
        stack.stop()


async def _settled_read(bootstrap: str) -> list[TopicRecord]:
    """The topics' whole content once nothing more arrives (two reads in a row agree)."""
    records = await read_topics(bootstrap)
    while True:
        again = await read_topics(bootstrap)
        if len(again) == len(records):
            return again
        records = again


async def _restart_broker(stack: LocalStack) -> None:
    """SIGKILL the broker and start a fresh one on the same port (Tansu keeps data in memory only, so
    it comes back empty: the topics are created again, as an operator would)."""
    broker = next(p for p in stack.processes if p.name == "broker")
    broker.kill()
    stack.processes.remove(broker)
    stack.processes.append(start_broker(stack.log_dir, port=broker.port))
    await ensure_topics(KafkaSettings(bootstrap_servers=stack.kafka))


async def test_accepted_events_survive_a_broker_restart_mid_stream(
    outage: tuple[LocalStack, KafkaProxy],
) -> None:
    """A driver-location source streams through a broker crash; nothing answered ACCEPTED is lost.

    What proves "ACCEPTED ⇒ not lost": an event is on the topic if the broker appended it. The local
    broker keeps its log in memory, so a crash erases what it had acknowledged — a property of that
    broker, not of ingestion (a replicated Kafka with acks=all keeps acknowledged records). So the
    broker's content is taken *before* the crash, when nothing can reach it any more, and again after
    the restart; the topic "afterwards" is the union of the two. The sequence:

    1. healthy streaming: events are ACCEPTED;
    2. ingestion is cut off its broker mid-request (the proxy it talks through is killed): connections
       reset, reconnects refused. The stream stays open; events are now answered UNAVAILABLE after the
       publish timeout, never ACCEPTED;
    3. once ingestion cannot write any more, the broker's whole log is read (snapshot 1), then the
       broker is SIGKILLed while the client keeps streaming, and restarted empty on the same port;
    4. the path comes back; events are ACCEPTED again on the same stream; the stream ends OK;
    5. the client retries every UNAVAILABLE event with the same event_id: ACCEPTED (the failed
       claims were released, so a retry is not mistaken for a duplicate); snapshot 2 is read.

    Every ACCEPTED event_id must be in snapshot 1 ∪ snapshot 2, and so must every event the client
    sent (it retried what was UNAVAILABLE). An event may be on the topic twice (an ack lost in the
    crash, a late delivery after UNAVAILABLE, then the retry): the local broker has no idempotent
    producer, and downstream dedup by event_id absorbs that.
    """
    stack, proxy = outage
    channel = grpc.aio.insecure_channel(stack.target("ingestion"))
    stub = ingestion_pb2_grpc.IngestionServiceStub(channel)
    call = stub.StreamEvents(timeout=90)
    sent: dict[int, list[events_pb2.Event]] = {}
    answers: list[ingestion_pb2.PublishEventsResponse] = []
    stop = asyncio.Event()
    drivers = [new_id("drv") for _ in range(CHUNK_EVENTS)]

    async def stream_events() -> None:
        sequence = 0
        while not stop.is_set():
            events = [driver_ping(driver) for driver in drivers]
            sent[sequence] = events
            await call.write(ingestion_pb2.PublishEventsRequest(events=events, sequence=sequence))
            sequence += 1
            await asyncio.sleep(0.02)
        await call.done_writing()

    async def read_answers() -> None:
        async for answer in call:
            answers.append(answer)

    def count(status: int, since: int = 0) -> int:
        return sum(r.status == status for a in answers[since:] for r in a.results)

    writer, reader = asyncio.create_task(stream_events()), asyncio.create_task(read_answers())
    try:
        await poll_until(lambda: count(Result.ACCEPTED), lambda n: n >= 5 * CHUNK_EVENTS)
        proxy.kill()
        cut = len(answers)
        await poll_until(lambda: count(Result.UNAVAILABLE, cut), lambda n: n >= CHUNK_EVENTS, timeout=20)
        before_crash = await _settled_read(stack.kafka)
        await _restart_broker(stack)
        await poll_until(lambda: count(Result.UNAVAILABLE), lambda n: n >= 3 * CHUNK_EVENTS, timeout=20)
        proxy.start()
        back = len(answers)
        await poll_until(lambda: count(Result.ACCEPTED, back), lambda n: n >= 5 * CHUNK_EVENTS, timeout=30)
    finally:
        stop.set()
        await writer
        await reader
    assert await call.code() == grpc.StatusCode.OK, await call.details()

    # One answer per chunk, in send order, each for exactly the events of its chunk.
    assert [a.sequence for a in answers] == sorted(sent)
    for answer in answers:
        assert [r.event_id for r in answer.results] == [event_id(e) for e in sent[answer.sequence]]
    statuses = Counter(Result.Status.Name(r.status) for a in answers for r in a.results)
    assert set(statuses) == {"ACCEPTED", "UNAVAILABLE"}, statuses

    # The client retries what was UNAVAILABLE, with the same event ids.
    by_id = {event_id(e): e for events in sent.values() for e in events}
    accepted = {r.event_id for a in answers for r in a.results if r.status == Result.ACCEPTED}
    retry = [by_id[r.event_id] for a in answers for r in a.results if r.status == Result.UNAVAILABLE]
    for start in range(0, len(retry), 500):
        reply = await stub.PublishEvents(
            ingestion_pb2.PublishEventsRequest(events=retry[start : start + 500])
        )
        assert {Result.Status.Name(r.status) for r in reply.results} == {"ACCEPTED"}, reply.results[0]
        accepted.update(r.event_id for r in reply.results)
    await channel.close()

    after_restart = await read_topics(stack.kafka)
    on_topic = Counter(r.event_id() for r in before_crash) + Counter(r.event_id() for r in after_restart)
    lost = accepted - set(on_topic)
    assert not lost, f"{len(lost)} ACCEPTED events are not on the topic, e.g. {sorted(lost)[:5]}"
    assert set(by_id) <= set(on_topic)
    assert before_crash
    assert after_restart
    for record in (*before_crash, *after_restart):
        assert record.topic == "eta.driver-events"
        assert record.key == record.envelope().event.driver.driver_id.encode()


async def test_client_deadline_is_honoured_while_the_broker_is_unreachable(
    outage: tuple[LocalStack, KafkaProxy],
) -> None:
    """With the broker unreachable, a call whose deadline is shorter than the publish timeout gets its
    answer before the deadline (every event UNAVAILABLE), not DEADLINE_EXCEEDED; so does every chunk of
    a stream. When the broker is back the same event ids are ACCEPTED."""
    stack, proxy = outage
    async with grpc.aio.insecure_channel(stack.target("ingestion")) as channel:
        stub = ingestion_pb2_grpc.IngestionServiceStub(channel)
        events = [driver_ping(new_id("drv")) for _ in range(10)]
        request = ingestion_pb2.PublishEventsRequest(events=events)
        assert (await stub.PublishEvents(request, timeout=5)).accepted == 10  # warm: producer connected
        events = [driver_ping(new_id("drv")) for _ in range(10)]
        request = ingestion_pb2.PublishEventsRequest(events=events)
        proxy.kill()
        try:
            deadline = PUBLISH_TIMEOUT_SECONDS / 2
            started = time.monotonic()
            reply = await stub.PublishEvents(request, timeout=deadline)
            assert time.monotonic() - started < deadline
            assert reply.unavailable == 10
            assert all("not acknowledged" in r.detail for r in reply.results)

            stream = stub.StreamEvents(timeout=deadline)
            await stream.write(ingestion_pb2.PublishEventsRequest(events=events[:3], sequence=7))
            answer = await stream.read()
            assert answer.sequence == 7
            assert [r.status for r in answer.results] == [Result.UNAVAILABLE] * 3
            with contextlib.suppress(grpc.aio.AioRpcError):
                await stream.done_writing()
            assert await stream.code() in (grpc.StatusCode.OK, grpc.StatusCode.DEADLINE_EXCEEDED)
        finally:
            proxy.start()

        reply = await poll_until(
            lambda: stub.PublishEvents(request, timeout=5), lambda r: r.accepted == 10, timeout=30
        )
        assert reply.accepted == 10
