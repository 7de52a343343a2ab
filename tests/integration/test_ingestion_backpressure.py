"""Backpressure: a bounded in-flight budget. What does not fit is refused at once with RESOURCE_EXHAUSTED
(and a retry push-back hint) instead of being queued in memory; admitted work is still answered honestly.

Own stack: ingestion with a tiny budget (2 full batches) behind a Kafka-protocol proxy; killing the proxy
makes the broker unreachable, so admitted events stay in flight until the publish timeout.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import grpc
import pytest

from devstack.stack import LocalStack, ServicePorts
from eta.v1 import ingestion_pb2, ingestion_pb2_grpc
from ingestion.tests.support import KafkaProxy, driver_ping, new_id, scrape
from tests.integration.conftest import poll_until

pytestmark = pytest.mark.integration
Result = ingestion_pb2.EventResult
BATCH = 50
BUDGET = 2 * BATCH
IN_FLIGHT = "eta_ingestion_in_flight_events"
REFUSED = 'eta_ingestion_calls_refused_total{code="resource_exhausted"}'


@pytest.fixture(scope="module")
def busy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalStack, KafkaProxy]]:
    workdir = tmp_path_factory.mktemp("ingestion-backpressure")
    stack = LocalStack(workdir, ports=ServicePorts.free(), use_env_endpoints=False)
    proxy: KafkaProxy | None = None
    try:
        stack.start_infra()
        proxy = KafkaProxy(stack.kafka, stack.log_dir)
        proxy.start()
        stack.start_service(
            "ingestion",
            extra_env={
                "KAFKA_BOOTSTRAP_SERVERS": proxy.address,
                "INGESTION_MAX_BATCH": str(BATCH),
                "INGESTION_MAX_IN_FLIGHT_EVENTS": str(BUDGET),
                "INGESTION_PUBLISH_TIMEOUT_SECONDS": "2",
                "SHUTDOWN_GRACE_SECONDS": "1",
            },
        )
        yield stack, proxy
    finally:
        if proxy is not None:
            proxy.stop()
        stack.stop()


def _batch() -> ingestion_pb2.PublishEventsRequest:
    return ingestion_pb2.PublishEventsRequest(events=[driver_ping(new_id("drv")) for _ in range(BATCH)])


async def _metrics(stack: LocalStack) -> dict[str, float]:
    return await asyncio.to_thread(scrape, stack.ports.metrics["ingestion"])


async def test_calls_beyond_the_budget_are_refused_not_queued(busy: tuple[LocalStack, KafkaProxy]) -> None:
    stack, proxy = busy
    async with grpc.aio.insecure_channel(stack.target("ingestion")) as channel:
        stub = ingestion_pb2_grpc.IngestionServiceStub(channel)
        assert (await stub.PublishEvents(_batch(), timeout=10)).accepted == BATCH  # producer connected
        refused_before = (await _metrics(stack)).get(REFUSED, 0.0)
        proxy.kill()
        try:
            calls = [stub.PublishEvents(_batch(), timeout=10) for _ in range(8)]
            # While the admitted calls wait for acks that cannot come, the budget is full, not more.
            seen = await poll_until(lambda: _metrics(stack), lambda m: m[IN_FLIGHT] == BUDGET)
            assert seen["eta_ingestion_in_flight_limit"] == BUDGET
            outcomes = await asyncio.gather(*calls, return_exceptions=True)
        finally:
            proxy.start()

        answered = [o for o in outcomes if isinstance(o, ingestion_pb2.PublishEventsResponse)]
        refused = [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
        assert len(answered) == BUDGET // BATCH
        assert len(refused) == len(calls) - len(answered)
        for reply in answered:  # admitted, but the broker never acknowledged: retryable, not accepted
            assert reply.unavailable == BATCH
        for error in refused:
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "in-flight budget exhausted" in (error.details() or "")
            assert dict(error.trailing_metadata() or ())["grpc-retry-pushback-ms"] == "200"

        after = await _metrics(stack)
        assert after[IN_FLIGHT] == 0
        assert after[REFUSED] - refused_before == len(refused)
        # The budget is free again: the same events go through once the broker is reachable.
        reply = await poll_until(
            lambda: stub.PublishEvents(_batch(), timeout=10), lambda r: r.accepted == BATCH, timeout=30
        )
        assert reply.accepted == BATCH


async def test_stream_over_budget_is_answered_then_ends_resource_exhausted(
    busy: tuple[LocalStack, KafkaProxy],
) -> None:
    """Chunks beyond the budget end the stream with RESOURCE_EXHAUSTED, but only after every chunk read
    before was answered, so the client knows exactly which chunks to resend."""
    stack, proxy = busy
    async with grpc.aio.insecure_channel(stack.target("ingestion")) as channel:
        stub = ingestion_pb2_grpc.IngestionServiceStub(channel)
        assert (await stub.PublishEvents(_batch(), timeout=10)).accepted == BATCH
        proxy.kill()
        try:
            stream = stub.StreamEvents(timeout=20)
            for sequence in range(3):
                request = _batch()
                request.sequence = sequence
                await stream.write(request)
            answers = [answer async for answer in _answers(stream)]
            code = await stream.code()
        finally:
            proxy.start()
    assert [a.sequence for a in answers] == [0, 1]
    assert all(r.status == Result.UNAVAILABLE for a in answers for r in a.results)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "chunk 2 (sequence 2)" in (await stream.details() or "")


async def _answers(stream: grpc.aio.StreamStreamCall) -> AsyncIterator[ingestion_pb2.PublishEventsResponse]:
    try:
        async for answer in stream:
            yield answer
    except grpc.aio.AioRpcError:
        return
