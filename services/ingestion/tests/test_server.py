"""The gRPC surface in-process (fake Kafka and Redis): the stream window bounds how far the server reads
ahead of its answers, and a cancelled stream gives back its budget and its claims."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import grpc
import pytest

from eta.v1 import ingestion_pb2, ingestion_pb2_grpc
from eta_common.kafka import Topics
from ingestion.budget import InFlightBudget
from ingestion.dedup import DedupStore
from ingestion.pipeline import Ingestor
from ingestion.publisher import Publisher
from ingestion.server import IngestionServicer
from ingestion.tests.fakes import FakeProducer, FakeRedis
from ingestion.tests.support import driver_ping, new_id
from ingestion.validation import ValidationLimits

WINDOW, CHUNK = 3, 2


@pytest.fixture
async def service() -> AsyncIterator[
    tuple[ingestion_pb2_grpc.IngestionServiceStub, FakeProducer, FakeRedis, InFlightBudget]
]:
    producer, redis = FakeProducer(mode="hold"), FakeRedis()
    budget = InFlightBudget(100)
    servicer = IngestionServicer(
        ingestor=Ingestor(
            publisher=Publisher(producer, Topics("d", "k", "o"), replica="t"),
            dedup=DedupStore(redis, ttl_seconds=60, pending_ttl_seconds=30),  # type: ignore[arg-type]
            limits=ValidationLimits(),
        ),
        budget=budget,
        max_batch=10,
        publish_timeout_seconds=10,
        stream_window=WINDOW,
    )
    server = grpc.aio.server()
    servicer.register(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield ingestion_pb2_grpc.IngestionServiceStub(channel), producer, redis, budget
    finally:
        await channel.close()
        await server.stop(0)


async def _until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while True:
            if condition():
                return
            await asyncio.sleep(0.01)


async def test_stream_reads_at_most_window_chunks_ahead_of_its_answers(service: tuple) -> None:  # type: ignore[type-arg]
    stub, producer, _, budget = service
    call = stub.StreamEvents(timeout=20)
    for sequence in range(10):
        events = [driver_ping(new_id("drv")) for _ in range(CHUNK)]
        await call.write(ingestion_pb2.PublishEventsRequest(events=events, sequence=sequence))
    await _until(lambda: len(producer.records) == WINDOW * CHUNK)
    await asyncio.sleep(0.3)  # room to misbehave: nothing more may be read while no answer went out
    assert len(producer.records) == WINDOW * CHUNK
    assert budget.in_use == WINDOW * CHUNK

    async def acker() -> None:
        while True:
            producer.ack_all()
            await asyncio.sleep(0.005)

    acking = asyncio.create_task(acker())
    try:
        await call.done_writing()
        answers = [answer async for answer in call]
    finally:
        acking.cancel()
    assert [a.sequence for a in answers] == list(range(10))
    assert all(a.accepted == CHUNK for a in answers)
    assert budget.in_use == 0


async def test_cancelled_stream_returns_its_budget_and_releases_its_claims(service: tuple) -> None:  # type: ignore[type-arg]
    stub, producer, redis, budget = service
    call = stub.StreamEvents(timeout=20)
    await call.write(
        ingestion_pb2.PublishEventsRequest(events=[driver_ping(new_id("drv")) for _ in range(CHUNK)])
    )
    await _until(lambda: len(producer.records) == CHUNK)
    assert budget.in_use == CHUNK
    assert len(redis.data) == CHUNK
    call.cancel()
    await _until(lambda: budget.in_use == 0 and not redis.data)
    assert all(record.future.cancelled() for record in producer.records)
