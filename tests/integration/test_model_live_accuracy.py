"""Live accuracy: delivered orders joined to the ETA served at checkout (prediction log in PostgreSQL).

1. The join rules on a hand-made history: the last prediction served up to PLACED + grace is the
   checkout ETA (later "tracking" ETAs are not), orders without a prediction count as delivered but not
   joined, the window is by delivery time; MAE / coverage / bias per model version and overall; gauges.
2. The live path: the simulator's live city asks the real prediction service for each order's ETA right
   before placing it (request_id = order id), the service logs what it served, the city's events are
   archived as the aggregator would, and ``live_accuracy`` / ``eta-trainer accuracy`` join every delivered
   order to its checkout ETA; the live oracle lands in ``simulation_oracle``.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from typing import Any

import asyncpg
import grpc
import pytest
from prometheus_client import CollectorRegistry

from devstack.stack import LocalStack
from eta.v1 import events_pb2, ingestion_pb2
from eta_common.db.archive import ArchivedEvent, archive_events
from eta_common.db.migrate import apply_migrations
from eta_common.live_accuracy import AccuracyGauges, live_accuracy
from eta_common.timeutil import datetime_from_ms, now_ms
from simulator.city import CityConfig, GeoPoint
from simulator.live import run_live
from simulator.messages import OrderType, event_ms, order_event
from tests.integration.conftest import own_stack
from trainer.__main__ import main as trainer_main

pytestmark = pytest.mark.integration
MIN = 60_000
HERE = GeoPoint(52.52, 13.40)


@pytest.fixture(scope="module")
def accuracy_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    env = {"LOG_FORMAT": "json", "OTEL_TRACES_SAMPLER": "always_off", "PREDICTION_LOG_FLUSH_MS": "100"}
    with own_stack(
        tmp_path_factory,
        "accuracy",
        services=("prediction",),
        extra_env=env,
        prepare=lambda s: asyncio.run(apply_migrations(s.database_url)),
    ) as local:
        yield local


@pytest.fixture
async def conn(accuracy_stack: LocalStack) -> AsyncIterator[asyncpg.Connection]:
    c = await asyncpg.connect(accuracy_stack.database_url)
    try:
        yield c
    finally:
        await c.close()


async def _order(conn: asyncpg.Connection, oid: str, placed: int, delivered: int | None) -> None:
    events = [
        ArchivedEvent(
            order_event(
                f"{oid}-p",
                placed,
                oid,
                "acc-r",
                OrderType.Value("PLACED"),
                customer_id="c",
                restaurant_at=HERE,
                customer_at=HERE,
            ),
            placed + 100,
        )
    ]
    if delivered is not None:
        events.append(
            ArchivedEvent(
                order_event(f"{oid}-d", delivered, oid, "acc-r", OrderType.Value("DELIVERED")), delivered
            )
        )
    await archive_events(conn, events)


async def _served(
    conn: asyncpg.Connection, oid: str, at: int, eta: float, low: float, high: float, version: str
) -> None:
    await conn.execute(
        "INSERT INTO predictions (served_at, request_id, restaurant_id, model_version, eta_minutes, "
        "eta_low_minutes, eta_high_minutes, feature_quality, features) "
        "VALUES ($1, $2, 'acc-r', $3, $4, $5, $6, 'COMPLETE', '{}'::jsonb)",
        datetime_from_ms(at),
        oid,
        version,
        eta,
        low,
        high,
    )


async def test_join_rules_rolling_figures_and_gauges(conn: asyncpg.Connection) -> None:
    n = 1_700_000_000_000  # "now" of this history (2023), far from the live test's orders
    await _order(conn, "o1", n - 50 * MIN, n - 10 * MIN)  # 40 min
    await _served(conn, "o1", n - 50 * MIN - 5_000, 35, 30, 45, "v1")  # checkout: error 5, inside
    await _served(conn, "o1", n - 30 * MIN, 40, 39, 41, "v1")  # tracking ETA after placement: ignored
    await _order(conn, "o2", n - 45 * MIN, n - 5 * MIN)  # 40 min
    await _served(conn, "o2", n - 45 * MIN - MIN, 20, 15, 25, "v1")  # superseded
    await _served(conn, "o2", n - 45 * MIN + 2_000, 50, 45, 55, "v2")  # within the grace: error 10, outside
    await _order(conn, "o3", n - 40 * MIN, n - 2 * MIN)  # delivered, never predicted
    await _order(conn, "o4", n - 120 * MIN, n - 70 * MIN)  # delivered before the window
    await _served(conn, "o4", n - 120 * MIN, 1, 0, 2, "v1")
    await _order(conn, "o5", n - 30 * MIN, None)  # not delivered yet
    await _served(conn, "o5", n - 30 * MIN, 1, 0, 2, "v1")
    await _order(conn, "o6", n - 35 * MIN, n - MIN)  # 34 min
    await _served(conn, "o6", n - 35 * MIN, 30, 25, 40, "v2")  # error 4, inside

    result = await live_accuracy(conn, window_minutes=60, until_ms=n)
    assert (result.delivered, result.joined) == (4, 3)
    assert result.overall is not None
    assert result.overall.mae == pytest.approx((5 + 10 + 4) / 3)
    assert result.overall.coverage == pytest.approx(2 / 3)
    assert result.overall.bias == pytest.approx((-5 + 10 - 4) / 3)
    assert result.overall.p90_abs_error == pytest.approx(10)
    by_version = {v.model_version: v for v in result.by_version}
    assert (by_version["v1"].orders, by_version["v1"].mae, by_version["v1"].coverage) == (1, 5, 1)
    assert (by_version["v2"].orders, by_version["v2"].mae, by_version["v2"].coverage) == (2, 7, 0.5)
    assert result.by_quality == {"COMPLETE": 3}
    assert "v2" in result.render()
    # a shorter window (delivered in the last 4 min) holds o3 and o6 only
    short = await live_accuracy(conn, window_minutes=4, until_ms=n)
    assert (short.delivered, short.joined) == (2, 1)

    registry = CollectorRegistry()
    gauges = AccuracyGauges(registry)
    gauges.update(result)
    assert registry.get_sample_value("eta_live_mae_minutes", {"model_version": "all"}) == pytest.approx(
        19 / 3
    )
    assert registry.get_sample_value("eta_live_interval_coverage_ratio", {"model_version": "v2"}) == 0.5
    assert registry.get_sample_value("eta_live_joined_orders", {"model_version": "v1"}) == 1
    assert registry.get_sample_value("eta_live_delivered_orders") == 4
    gauges.update(short)  # versions no longer in the window disappear
    assert registry.get_sample_value("eta_live_joined_orders", {"model_version": "v1"}) is None


class AcceptAll:
    """A stand-in ingestion service that accepts everything and remembers when it got each event."""

    def __init__(self) -> None:
        self.received: list[ArchivedEvent] = []

    async def PublishEvents(self, request: Any, context: Any) -> ingestion_pb2.PublishEventsResponse:
        ingest = now_ms()
        response = ingestion_pb2.PublishEventsResponse()
        for i, event in enumerate(request.events):
            self.received.append(ArchivedEvent(event, ingest))
            payload = getattr(event, event.WhichOneof("payload"))
            response.results.add(
                index=i, event_id=payload.event_id, status=ingestion_pb2.EventResult.ACCEPTED
            )
        return response


async def test_live_city_asks_for_etas_at_checkout_and_accuracy_joins_them(
    accuracy_stack: LocalStack, conn: asyncpg.Connection, capsys: pytest.CaptureFixture[str]
) -> None:
    servicer = AcceptAll()
    server = grpc.aio.server()
    handler = grpc.unary_unary_rpc_method_handler(
        servicer.PublishEvents,
        request_deserializer=ingestion_pb2.PublishEventsRequest.FromString,
        response_serializer=ingestion_pb2.PublishEventsResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("eta.v1.IngestionService", {"PublishEvents": handler}),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    started = now_ms()
    try:
        stats = await run_live(
            f"127.0.0.1:{port}",
            CityConfig(demand_multiplier=3.0, drivers=80),
            speed=100.0,
            stop=asyncio.Event(),
            duration_seconds=30.0,
            flush_interval_s=0.05,
            eta_target=accuracy_stack.target("prediction"),
            oracle_database_url=accuracy_stack.database_url,
        )
    finally:
        await server.stop(0)
    assert stats.orders_placed > 20
    assert stats.orders_delivered > 5
    assert stats.eta_calls == stats.orders_placed
    assert stats.eta_errors == 0
    assert stats.oracle_written == stats.orders_delivered
    await archive_events(conn, servicer.received)  # what the aggregator would have archived

    placed = {
        e.event.order.order_id: e
        for e in servicer.received
        if e.event.WhichOneof("payload") == "order" and e.event.order.type == events_pb2.OrderEvent.PLACED
    }
    delivered = {
        e.event.order.order_id
        for e in servicer.received
        if e.event.WhichOneof("payload") == "order" and e.event.order.type == events_pb2.OrderEvent.DELIVERED
    }
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # the service writes its log in the background
        logged = await conn.fetch(
            "SELECT request_id, served_at FROM predictions WHERE request_id LIKE 'ord-%'"
        )
        if len(logged) >= len(placed):
            break
        await asyncio.sleep(0.2)
    assert {r["request_id"] for r in logged} == set(placed)
    for r in logged:  # asked right before placing: served within a second of the PLACED event time
        placed_ms = event_ms(placed[r["request_id"]].event)
        assert abs(r["served_at"] - datetime_from_ms(placed_ms)) < timedelta(seconds=1)
        assert r["served_at"] <= datetime_from_ms(placed[r["request_id"]].ingest_ms)  # ETA first, then PLACED

    window = (now_ms() - started) / MIN + 1
    result = await live_accuracy(conn, window_minutes=window)
    assert result.delivered == result.joined == len(delivered) == stats.orders_delivered
    assert result.overall is not None
    assert [v.model_version for v in result.by_version] == ["heuristic-v0"]
    oracle = await conn.fetch("SELECT order_id, source FROM simulation_oracle WHERE source = 'live'")
    assert {r["order_id"] for r in oracle} == delivered

    argv = [
        "accuracy",
        "--database-url",
        accuracy_stack.database_url,
        "--since-minutes",
        str(window),
        "--json",
    ]
    with pytest.raises(SystemExit) as exit_info:  # the CLI runs its own event loop: in a thread
        await asyncio.to_thread(trainer_main, argv)
    assert exit_info.value.code == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["joined"] == result.joined
    assert printed["overall"]["mae"] == pytest.approx(result.overall.mae)
