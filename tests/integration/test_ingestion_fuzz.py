"""Property-based: whatever arrives — random events, nearly valid ones, raw garbage bytes, valid requests
with bytes flipped — the service does not crash, every reply is well-formed and tells the truth, and
nothing invalid reaches a topic.

Own stack (broker, Redis, ingestion), so the topics hold only what this module sent and can be checked
record by record.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devstack.stack import LocalStack, ServicePorts
from eta.v1 import events_pb2, ingestion_pb2, ingestion_pb2_grpc
from eta_common.kafka import event_kind, record_key
from eta_common.timeutil import now_ms
from ingestion.tests.strategies import mangled, requests
from ingestion.tests.support import TOPICS, event_id, read_topics
from ingestion.validation import ValidationLimits, validate_event

pytestmark = pytest.mark.integration
Result = ingestion_pb2.EventResult
LIMITS = ValidationLimits()  # the service runs with the default limits
EXAMPLES = 600
METHOD = "/eta.v1.IngestionService/PublishEvents"


@pytest.fixture(scope="module")
def fuzz_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    stack = LocalStack(
        tmp_path_factory.mktemp("ingestion-fuzz"), ports=ServicePorts.free(), use_env_endpoints=False
    )
    try:
        stack.start_infra()
        stack.start_service("ingestion", extra_env={"LOG_LEVEL": "WARNING"})
        yield stack
    finally:
        stack.stop()


@dataclass
class Ledger:
    """What the service said: the events it ACCEPTED (by event_id) and how many replies were checked."""

    accepted: dict[str, bytes] = field(default_factory=dict)
    unavailable: set[str] = field(default_factory=set)  # not acknowledged in time (may still be on a topic)
    requests: int = 0
    events: int = 0
    raw: int = 0
    refused: int = 0


def _check_reply(
    events: list[events_pb2.Event], reply: ingestion_pb2.PublishEventsResponse, ledger: Ledger, sent_ms: int
) -> None:
    """One result per event, in order, and each status the right one for that event."""
    assert len(reply.results) == len(events)
    seen_here: dict[str, int] = {}
    for i, (event, result) in enumerate(zip(events, reply.results, strict=True)):
        assert result.index == i
        assert result.event_id == event_id(event)
        expected = validate_event(event, now_ms=sent_ms, limits=LIMITS)
        if expected:
            assert result.status == Result.REJECTED, (event, result)
            assert [(v.field, v.description) for v in result.violations] == expected
            assert all(v.field and v.description for v in result.violations)
            continue
        assert not result.violations
        if result.status == Result.ACCEPTED:
            assert result.event_id not in ledger.accepted
            assert result.event_id not in seen_here
            clean = events_pb2.Event()
            clean.CopyFrom(event)
            clean.DiscardUnknownFields()
            ledger.accepted[result.event_id] = clean.SerializeToString()
            seen_here[result.event_id] = i
        elif result.status == Result.UNAVAILABLE:  # honest, though not expected on an idle machine
            ledger.unavailable.add(result.event_id)
        else:  # a resend of an accepted id: earlier in this request or in an earlier request
            assert result.status == Result.DUPLICATE, (event, result)
            assert result.event_id in ledger.accepted
    counts = [r.status for r in reply.results]
    assert (reply.accepted, reply.duplicates, reply.rejected, reply.unavailable) == tuple(
        counts.count(s) for s in (Result.ACCEPTED, Result.DUPLICATE, Result.REJECTED, Result.UNAVAILABLE)
    )


def _fuzz(target: str, ledger: Ledger) -> None:
    channel = grpc.insecure_channel(target)
    stub = ingestion_pb2_grpc.IngestionServiceStub(channel)
    raw_call = channel.unary_unary(
        METHOD, response_deserializer=ingestion_pb2.PublishEventsResponse.FromString
    )

    def now_s() -> int:
        return int(time.time())

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(
        request=requests(now_s, LIMITS),
        how=st.sampled_from(["message", "message", "garbage", "mangled"]),
        data=st.data(),
    )
    def send(request: ingestion_pb2.PublishEventsRequest, how: str, data: st.DataObject) -> None:
        ledger.requests += 1
        sent_ms = now_ms()
        if how == "message":
            reply = stub.PublishEvents(request, timeout=10)
            ledger.events += len(request.events)
            _check_reply(list(request.events), reply, ledger, sent_ms)
            return
        ledger.raw += 1
        raw = (
            data.draw(st.binary(max_size=400))
            if how == "garbage"
            else mangled(request.SerializeToString(), data)
        )
        try:
            parsed: ingestion_pb2.PublishEventsRequest | None = ingestion_pb2.PublishEventsRequest.FromString(
                raw
            )
        except Exception:
            parsed = None
        error: grpc.RpcError | None = None
        try:
            reply = raw_call(raw, timeout=10)
        except grpc.RpcError as exc:
            error = exc
        if error is not None:
            assert parsed is None, "a decodable request was refused"
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
            status = rpc_status.from_call(error)
            assert status is not None
            details = error_details_pb2.BadRequest()
            assert status.details[0].Unpack(details)
            assert [v.field for v in details.field_violations] == ["request"]
            ledger.refused += 1
            return
        assert parsed is not None, "undecodable bytes were answered as a request"
        parsed.DiscardUnknownFields()
        ledger.events += len(parsed.events)
        _check_reply(list(parsed.events), reply, ledger, sent_ms)

    try:
        send()
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        channel.close()


async def test_random_and_malformed_requests_never_let_invalid_events_through(fuzz_stack: LocalStack) -> None:
    ledger = Ledger()
    await asyncio.to_thread(_fuzz, fuzz_stack.target("ingestion"), ledger)
    # thousands of messages, a good share of each outcome (so every branch above was exercised)
    counts = (ledger.events, ledger.raw, ledger.refused, len(ledger.accepted))
    assert ledger.events > 2000, counts
    assert ledger.raw > 60, counts
    assert ledger.refused > 30, counts
    assert len(ledger.accepted) > 200, counts

    records = await read_topics(fuzz_stack.kafka, TOPICS)
    on_topic = {record.event_id() for record in records}
    assert set(ledger.accepted) <= on_topic  # everything accepted is there
    assert on_topic <= set(ledger.accepted) | ledger.unavailable  # and nothing that was refused
    for record in records:
        envelope = record.envelope()
        event = envelope.event
        assert validate_event(event, now_ms=record.ingest_ms(), limits=LIMITS) == []
        if record.event_id() in ledger.accepted:
            assert event.SerializeToString() == ledger.accepted[record.event_id()]
        assert record.topic == f"eta.{event_kind(event)}-events"
        assert record.key == record_key(event)
        assert dict(record.headers).get("traceparent")
