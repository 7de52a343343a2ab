"""Idempotency by event_id across ingestion replicas (shared state in Redis): a resend within the dedup
horizon is answered DUPLICATE and not republished, whichever replica gets it; concurrent sends publish
once; the horizon is configuration; a claim left by a replica that died mid-publish expires quickly.

Runs extra ingestion replicas against the session stack's broker and Redis.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from devstack.stack import LocalStack, ServicePorts
from eta.v1 import events_pb2, ingestion_pb2, ingestion_pb2_grpc
from eta_common.redis_client import redis_from_url
from ingestion.dedup import DedupStore
from ingestion.tests.support import event_id, new_id, order_placed, read_topics, statuses
from tests.integration.conftest import poll_until

pytestmark = pytest.mark.integration
Result = ingestion_pb2.EventResult
HORIZON_SECONDS = 1


def _replica(stack: LocalStack, workdir: Path, env: dict[str, str]) -> LocalStack:
    """Another ingestion process on the session stack's broker and Redis."""
    replica = LocalStack(workdir, ports=ServicePorts.free(), use_env_endpoints=False)
    replica.kafka, replica.redis_url, replica.database_url = stack.kafka, stack.redis_url, stack.database_url
    replica.start_service("ingestion", extra_env={"SHUTDOWN_GRACE_SECONDS": "1", **env})
    return replica


@pytest.fixture(scope="module")
def replicas(stack: LocalStack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """Targets: "a" (the session stack's ingestion), "b" (a second replica), "short" (a replica whose dedup
    horizon is HORIZON_SECONDS)."""
    started: list[LocalStack] = []
    try:
        started.append(_replica(stack, tmp_path_factory.mktemp("replica-b"), {}))
        started.append(
            _replica(
                stack,
                tmp_path_factory.mktemp("replica-short"),
                {
                    "INGESTION_DEDUP_TTL_SECONDS": str(HORIZON_SECONDS),
                    "INGESTION_PUBLISH_TIMEOUT_SECONDS": "1",
                },
            )
        )
        yield {
            "a": stack.target("ingestion"),
            "b": started[0].target("ingestion"),
            "short": started[1].target("ingestion"),
        }
    finally:
        for replica in started:
            replica.stop()


async def _send(target: str, *events: events_pb2.Event) -> ingestion_pb2.PublishEventsResponse:
    async with grpc.aio.insecure_channel(target) as channel:
        reply: ingestion_pb2.PublishEventsResponse = await ingestion_pb2_grpc.IngestionServiceStub(
            channel
        ).PublishEvents(ingestion_pb2.PublishEventsRequest(events=list(events)), timeout=10)
        return reply


async def _copies_on_topic(stack: LocalStack, *ids: str) -> Counter[str]:
    records = await read_topics(stack.kafka, ["eta.order-events"])
    wanted = set(ids)
    return Counter(r.event_id() for r in records if r.event_id() in wanted)


async def test_resend_to_another_replica_is_a_duplicate_and_not_republished(
    replicas: dict[str, str], stack: LocalStack
) -> None:
    event = order_placed(new_id("rest"))
    assert statuses(await _send(replicas["a"], event)) == ["ACCEPTED"]
    assert statuses(await _send(replicas["b"], event)) == ["DUPLICATE"]
    assert statuses(await _send(replicas["a"], event)) == ["DUPLICATE"]
    assert await _copies_on_topic(stack, event_id(event)) == {event_id(event): 1}


async def test_concurrent_sends_of_one_event_publish_it_once(
    replicas: dict[str, str], stack: LocalStack
) -> None:
    """Ten sends of the same event, at once, to two replicas: exactly one is ACCEPTED. The others are
    DUPLICATE, or UNAVAILABLE while the first is still being published (never DUPLICATE before the
    first was acknowledged). Once settled, every resend is DUPLICATE."""
    event = order_placed(new_id("rest"))
    replies = await asyncio.gather(*(_send(replicas["ab"[i % 2]], event) for i in range(10)))
    outcome = Counter(status for reply in replies for status in statuses(reply))
    assert outcome["ACCEPTED"] == 1, outcome
    assert set(outcome) <= {"ACCEPTED", "DUPLICATE", "UNAVAILABLE"}
    in_flight = [r.results[0].detail for r in replies if r.results[0].status == Result.UNAVAILABLE]
    assert all("publishing this event_id right now" in detail for detail in in_flight)
    assert statuses(await _send(replicas["b"], event)) == ["DUPLICATE"]
    assert await _copies_on_topic(stack, event_id(event)) == {event_id(event): 1}


async def test_dedup_horizon_is_configurable(replicas: dict[str, str], stack: LocalStack) -> None:
    event = order_placed(new_id("rest"))
    started = time.monotonic()
    assert statuses(await _send(replicas["short"], event)) == ["ACCEPTED"]
    assert statuses(await _send(replicas["short"], event)) == ["DUPLICATE"]
    await poll_until(
        lambda: _send(replicas["short"], event), lambda r: statuses(r) == ["ACCEPTED"], timeout=10
    )
    assert time.monotonic() - started >= HORIZON_SECONDS  # remembered for the whole horizon, not less
    assert await _copies_on_topic(stack, event_id(event)) == {event_id(event): 2}


async def test_claim_of_a_replica_that_died_mid_publish_expires(
    replicas: dict[str, str], stack: LocalStack
) -> None:
    """A replica that claimed an event_id and died before the broker's ack leaves a *pending* claim.
    Retries are answered UNAVAILABLE (not DUPLICATE: nothing was confirmed) until the claim expires,
    after twice the publish timeout plus a margin; then the event is published."""
    event = order_placed(new_id("rest"))
    client = redis_from_url(stack.redis_url)  # one Redis or a Redis Cluster
    try:  # what the dead replica left behind
        await client.set(DedupStore.key(event_id(event)), b"p", px=1500)
    finally:
        await client.aclose()
    reply = await _send(replicas["short"], event)
    assert statuses(reply) == ["UNAVAILABLE"]
    reply = await poll_until(
        lambda: _send(replicas["short"], event), lambda r: statuses(r) != ["UNAVAILABLE"]
    )
    assert statuses(reply) == ["ACCEPTED"]
    assert await _copies_on_topic(stack, event_id(event)) == {event_id(event): 1}
