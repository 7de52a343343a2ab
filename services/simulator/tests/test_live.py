from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from eta.v1 import eta_pb2, events_pb2, ingestion_pb2, ingestion_pb2_grpc
from eta_common.timeutil import now_ms
from ingestion.validation import ValidationLimits, event_id_of, validate_event
from simulator.city import CityConfig
from simulator.live import LiveStats, run_live
from simulator.messages import event_ms
from simulator.publisher import EventPublisher

Result = ingestion_pb2.EventResult


class FakeIngestion:
    """Validates and deduplicates like the real service; can fail calls or answer UNAVAILABLE."""

    def __init__(self) -> None:
        self.seen: set[str] = set()
        self.accepted: list[events_pb2.Event] = []
        self.calls = 0
        self.fail_calls = 0  # abort this many calls with UNAVAILABLE
        self.unavailable_once: set[str] = set()  # answer UNAVAILABLE the first time these ids come
        self.metadata: list[dict[str, str]] = []
        self.received_ids: list[str] = []
        self.batch_sizes: list[int] = []

    async def PublishEvents(self, request: Any, context: Any) -> ingestion_pb2.PublishEventsResponse:
        self.calls += 1
        self.metadata.append({k: v for k, v in context.invocation_metadata() if isinstance(v, str)})
        if self.fail_calls > 0:
            self.fail_calls -= 1
            await context.abort(grpc.StatusCode.UNAVAILABLE, "broker down")
        self.batch_sizes.append(len(request.events))
        now = now_ms()
        response = ingestion_pb2.PublishEventsResponse()
        for i, event in enumerate(request.events):
            eid = event_id_of(event)
            self.received_ids.append(eid)
            result = response.results.add(index=i, event_id=eid)
            violations = validate_event(event, now_ms=now, limits=ValidationLimits())
            if violations:
                result.status = Result.REJECTED
                for f, d in violations:
                    result.violations.add(field=f, description=d)
            elif eid in self.unavailable_once:
                self.unavailable_once.discard(eid)
                result.status = Result.UNAVAILABLE
            elif eid in self.seen:
                result.status = Result.DUPLICATE
            else:
                self.seen.add(eid)
                self.accepted.append(event)
                result.status = Result.ACCEPTED
        return response


@pytest.fixture
async def ingestion() -> AsyncIterator[tuple[FakeIngestion, str]]:
    servicer = FakeIngestion()
    server = grpc.aio.server()
    publish = grpc.unary_unary_rpc_method_handler(
        servicer.PublishEvents,
        request_deserializer=ingestion_pb2.PublishEventsRequest.FromString,
        response_serializer=ingestion_pb2.PublishEventsResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("eta.v1.IngestionService", {"PublishEvents": publish}),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield servicer, f"127.0.0.1:{port}"
    finally:
        await server.stop(0)


def _events(n: int, *, valid: bool = True) -> list[events_pb2.Event]:
    from simulator.city import GeoPoint
    from simulator.messages import DriverType, driver_event

    ms = now_ms()
    at = GeoPoint(52.52, 13.4) if valid else GeoPoint(0.0, 0.0)
    return [
        driver_event(f"t-{valid}-{i}", ms, f"drv-{i}", DriverType.Value("LOCATION"), at) for i in range(n)
    ]


async def test_publisher_batches_and_retries_unavailable_with_the_same_event_id(
    ingestion: tuple[FakeIngestion, str],
) -> None:
    servicer, target = ingestion
    events = _events(450)
    servicer.unavailable_once = {event_id_of(e) for e in events[::10]}
    async with grpc.aio.insecure_channel(target) as channel:
        publisher = EventPublisher(
            ingestion_pb2_grpc.IngestionServiceStub(channel), max_batch=200, flush_interval_s=0.02
        )
        publisher.start()
        for e in events:
            publisher.add(e)
        stats = await publisher.close(drain_timeout_s=10)
    assert stats.accepted == 450
    assert stats.rejected == 0
    assert stats.dropped == 0
    assert stats.unavailable == 45
    assert stats.sent == 495
    assert {event_id_of(e) for e in servicer.accepted} == {event_id_of(e) for e in events}
    assert sorted(servicer.received_ids) == sorted(
        [event_id_of(e) for e in events] + [event_id_of(e) for e in events[::10]]
    )
    assert max(servicer.batch_sizes) == 200
    assert len(servicer.batch_sizes) >= 3


async def test_publisher_retries_failed_calls_and_counts_rejections(
    ingestion: tuple[FakeIngestion, str],
) -> None:
    servicer, target = ingestion
    servicer.fail_calls = 2
    good, bad = _events(30), _events(5, valid=False)
    calls: list[int] = []
    async with grpc.aio.insecure_channel(target) as channel:
        publisher = EventPublisher(
            ingestion_pb2_grpc.IngestionServiceStub(channel),
            flush_interval_s=0.02,
            on_call=lambda s: calls.append(s.accepted),
        )
        publisher.start()
        for e in good + bad:
            publisher.add(e)
        stats = await publisher.close(drain_timeout_s=10)
    assert stats.call_errors == 2
    assert stats.accepted == 30
    assert stats.rejected == 5
    assert stats.duplicates == 0
    assert calls
    assert calls[-1] == 30


async def test_publisher_counts_what_it_could_not_send(ingestion: tuple[FakeIngestion, str]) -> None:
    servicer, target = ingestion
    servicer.fail_calls = 1000
    async with grpc.aio.insecure_channel(target) as channel:
        publisher = EventPublisher(ingestion_pb2_grpc.IngestionServiceStub(channel), flush_interval_s=0.02)
        publisher.start()
        for e in _events(10):
            publisher.add(e)
        stats = await publisher.close(drain_timeout_s=0.5)
    assert stats.accepted == 0
    assert stats.dropped == 10
    assert stats.call_errors >= 1


# The default city places roughly 40-60 orders an hour (by the hour of day; its floor at night), so a
# test that simulates 100 s (2 s at ×50) or 4 min of warm-up could see none, depending on when it runs
# (a run after midnight UTC did). 20× the demand makes an order certain in those windows at any hour.
BUSY_CITY = CityConfig(demand_multiplier=20.0)


async def test_run_live_sends_a_valid_city_and_stops_after_the_duration(
    ingestion: tuple[FakeIngestion, str],
) -> None:
    servicer, target = ingestion
    seen: list[LiveStats] = []
    started = now_ms()
    stats = await run_live(
        target,
        BUSY_CITY,
        speed=50.0,
        stop=asyncio.Event(),
        duration_seconds=2.0,
        stats_callback=seen.append,
        flush_interval_s=0.05,
        summary_interval_s=0.5,
    )
    finished = now_ms()
    assert 1.9 <= stats.elapsed_seconds < 6
    assert stats.rejected == 0
    assert stats.dropped == 0
    assert stats.failed == 0
    assert stats.accepted == stats.generated == len(servicer.accepted) > 100
    assert stats.orders_placed > 0
    kinds = {
        (e.WhichOneof("payload"), getattr(e, str(e.WhichOneof("payload"))).type) for e in servicer.accepted
    }
    assert ("kitchen", events_pb2.KitchenEvent.OPENED) in kinds
    assert ("driver", events_pb2.DriverEvent.ONLINE) in kinds
    assert ("order", events_pb2.OrderEvent.PLACED) in kinds
    # event times are wall-clock "now", never in the future
    assert all(started - 1000 <= event_ms(e) <= finished for e in servicer.accepted)
    assert seen
    assert seen[-1] == stats


async def test_run_live_stops_when_asked_and_sends_the_token(ingestion: tuple[FakeIngestion, str]) -> None:
    servicer, target = ingestion
    stop = asyncio.Event()
    asyncio.get_running_loop().call_later(0.5, stop.set)
    token = "simulator-token-0123456789"
    stats = await asyncio.wait_for(
        run_live(target, CityConfig(), speed=1.0, stop=stop, token=token), timeout=10
    )
    assert stats.elapsed_seconds < 3
    assert stats.accepted == stats.generated >= 20  # kitchens open and drivers come online right away
    assert servicer.metadata
    assert all(m.get("authorization") == f"Bearer {token}" for m in servicer.metadata)


async def test_run_live_warmup_sends_the_recent_past_first(ingestion: tuple[FakeIngestion, str]) -> None:
    servicer, target = ingestion
    started = now_ms()
    stats = await run_live(
        target, BUSY_CITY, speed=1.0, stop=asyncio.Event(), duration_seconds=0.5, warmup_minutes=4.0
    )
    assert stats.rejected == 0
    assert stats.orders_placed > 0
    assert min(event_ms(e) for e in servicer.accepted) < started - 3 * 60_000


class FakeEta:
    """Answers PredictEta and records, per request, how many PLACED events ingestion had already got."""

    def __init__(self, ingestion: FakeIngestion, *, fail: bool = False) -> None:
        self.ingestion = ingestion
        self.fail = fail
        self.requests: list[tuple[eta_pb2.PredictEtaRequest, set[str]]] = []

    async def PredictEta(self, request: Any, context: Any) -> eta_pb2.PredictEtaResponse:
        placed = {
            e.order.order_id
            for e in self.ingestion.accepted
            if e.WhichOneof("payload") == "order" and e.order.type == events_pb2.OrderEvent.PLACED
        }
        self.requests.append((request, placed))
        if self.fail:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "no model")
        return eta_pb2.PredictEtaResponse(
            restaurant_id=request.restaurant_id, eta_minutes=30, eta_low_minutes=20, eta_high_minutes=40,
            model_version="v-test", request_id=request.request_id,
        )  # fmt: skip


async def _eta_server(servicer: FakeEta) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server()
    handler = grpc.unary_unary_rpc_method_handler(
        servicer.PredictEta,
        request_deserializer=eta_pb2.PredictEtaRequest.FromString,
        response_serializer=eta_pb2.PredictEtaResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("eta.v1.EtaService", {"PredictEta": handler}),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


@pytest.mark.parametrize("fail", [False, True])
async def test_run_live_asks_for_the_eta_of_each_order_before_placing_it(
    ingestion: tuple[FakeIngestion, str], fail: bool
) -> None:
    servicer, target = ingestion
    eta = FakeEta(servicer, fail=fail)
    server, eta_target = await _eta_server(eta)
    try:
        stats = await run_live(
            target,
            # busy enough at any hour of the (UTC) day for several orders within 2 s of wall time
            CityConfig(demand_multiplier=12.0),
            speed=100.0,
            stop=asyncio.Event(),
            duration_seconds=2.0,
            flush_interval_s=0.02,
            eta_target=eta_target,
        )
    finally:
        await server.stop(0)
    placed = [
        e.order
        for e in servicer.accepted
        if e.WhichOneof("payload") == "order" and e.order.type == events_pb2.OrderEvent.PLACED
    ]
    assert stats.orders_placed == len(placed) > 3
    assert stats.eta_calls == len(eta.requests) == len(placed)
    assert stats.eta_errors == (len(placed) if fail else 0)  # a failed ETA never blocks the order
    by_order = {request.request_id: (request, seen) for request, seen in eta.requests}
    for order in placed:
        request, seen_before = by_order[order.order_id]
        assert order.order_id not in seen_before  # asked before the order reached ingestion
        assert request.restaurant_id == order.restaurant_id
        assert request.restaurant_location == order.restaurant_location
        assert request.customer_location == order.customer_location
