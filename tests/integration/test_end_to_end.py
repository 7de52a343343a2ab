"""Walking-skeleton acceptance: events in through gRPC → Kafka → aggregator → Redis → FeatureService and
PredictEta; bad events rejected with reasons while their batch-mates go through; traces cross Kafka."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from eta.v1 import (
    eta_pb2,
    eta_pb2_grpc,
    events_pb2,
    features_pb2,
    features_pb2_grpc,
    ingestion_pb2,
    ingestion_pb2_grpc,
)
from tests.integration.conftest import poll_until
from tests.integration.helpers import BERLIN, NEARBY, driver_online, new_id, placed

pytestmark = pytest.mark.integration
Result = ingestion_pb2.EventResult


def _feature(response: Any, name: str) -> features_pb2.FeatureValue:
    matches = [f for f in response.features if f.name == name]
    assert matches, f"feature {name} missing from {response}"
    feature: features_pb2.FeatureValue = matches[0]
    return feature


async def _publish(
    channels: dict[str, grpc.aio.Channel], events: list[events_pb2.Event]
) -> ingestion_pb2.PublishEventsResponse:
    stub = ingestion_pb2_grpc.IngestionServiceStub(channels["ingestion"])
    reply: ingestion_pb2.PublishEventsResponse = await stub.PublishEvents(
        ingestion_pb2.PublishEventsRequest(events=events), timeout=10
    )
    return reply


async def test_orders_flow_to_features_and_prediction(channels: dict[str, grpc.aio.Channel]) -> None:
    restaurant = new_id("rest")
    # spread over the last 3 minutes (within the allowed lateness of 5 minutes)
    events = [placed(restaurant, ago_ms=i * 30_000) for i in range(7)]
    events.append(driver_online(new_id("drv")))
    reply = await _publish(channels, events)
    assert reply.accepted == 8, reply
    assert [r.status for r in reply.results] == [Result.ACCEPTED] * 8

    features = features_pb2_grpc.FeatureServiceStub(channels["aggregator"])
    request = features_pb2.GetRestaurantFeaturesRequest(restaurant_id=restaurant)
    got = await poll_until(
        lambda: features.GetRestaurantFeatures(request, timeout=5),
        lambda r: _feature(r, "num_orders_last_30_min").value == 7,
    )
    value = _feature(got, "num_orders_last_30_min")
    assert value.present
    assert 0 <= value.age_seconds < 30
    assert _feature(got, "num_orders_last_10_min").value == 7

    eta = eta_pb2_grpc.EtaServiceStub(channels["prediction"])
    prediction = await eta.PredictEta(
        eta_pb2.PredictEtaRequest(
            restaurant_id=restaurant, restaurant_location=BERLIN, customer_location=NEARBY
        ),
        timeout=5,
    )
    assert _feature(prediction, "num_orders_last_30_min").value == 7
    assert prediction.eta_low_minutes <= prediction.eta_minutes <= prediction.eta_high_minutes
    assert prediction.eta_minutes > 0
    assert prediction.model_version


async def test_duplicate_event_id_is_answered_duplicate_and_counted_once(
    channels: dict[str, grpc.aio.Channel],
) -> None:
    restaurant = new_id("rest")
    event = placed(restaurant)
    first = await _publish(channels, [event])
    second = await _publish(channels, [event])
    assert first.results[0].status == Result.ACCEPTED
    assert second.results[0].status == Result.DUPLICATE
    features = features_pb2_grpc.FeatureServiceStub(channels["aggregator"])
    request = features_pb2.GetRestaurantFeaturesRequest(restaurant_id=restaurant)
    got = await poll_until(
        lambda: features.GetRestaurantFeatures(request, timeout=5),
        lambda r: _feature(r, "num_orders_last_30_min").present,
    )
    assert _feature(got, "num_orders_last_30_min").value == 1


async def test_bad_events_rejected_with_reasons_and_good_neighbour_goes_through(
    channels: dict[str, grpc.aio.Channel],
) -> None:
    restaurant = new_id("rest")
    missing_id = placed(restaurant, event_id="x")
    missing_id.order.event_id = ""
    impossible = placed(restaurant)
    impossible.order.customer_location.lat = 123.0
    good = placed(restaurant)
    reply = await _publish(channels, [missing_id, good, impossible])

    assert [r.status for r in reply.results] == [Result.REJECTED, Result.ACCEPTED, Result.REJECTED]
    assert (reply.accepted, reply.rejected) == (1, 2)
    assert {(v.field, v.description) for v in reply.results[0].violations} == {("order.event_id", "required")}
    assert [v.field for v in reply.results[2].violations] == ["order.customer_location.lat"]
    assert "[-90, 90]" in reply.results[2].violations[0].description

    features = features_pb2_grpc.FeatureServiceStub(channels["aggregator"])
    request = features_pb2.GetRestaurantFeaturesRequest(restaurant_id=restaurant)
    got = await poll_until(
        lambda: features.GetRestaurantFeatures(request, timeout=5),
        lambda r: _feature(r, "num_orders_last_30_min").present,
    )
    assert _feature(got, "num_orders_last_30_min").value == 1


async def test_oversized_batch_fails_with_bad_request_details(channels: dict[str, grpc.aio.Channel]) -> None:
    events = [placed(new_id("rest")) for _ in range(501)]
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await _publish(channels, events)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = rpc_status.from_call(info.value)
    assert status is not None
    bad_request = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(bad_request)
    assert bad_request.field_violations[0].field == "events"


async def test_predict_eta_rejects_impossible_location(channels: dict[str, grpc.aio.Channel]) -> None:
    eta = eta_pb2_grpc.EtaServiceStub(channels["prediction"])
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await eta.PredictEta(
            eta_pb2.PredictEtaRequest(
                restaurant_id="r",
                restaurant_location=BERLIN,
                customer_location=events_pb2.GeoPoint(lat=10, lng=500),
            ),
            timeout=5,
        )
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "customer_location.lng" in (info.value.details() or "")


async def test_one_trace_crosses_kafka_to_the_redis_write(
    channels: dict[str, grpc.aio.Channel], spans_of: Callable[[], list[dict[str, Any]]]
) -> None:
    restaurant = new_id("rest")
    event = placed(restaurant)
    reply = await _publish(channels, [event])
    assert reply.accepted == 1
    event_id = event.order.event_id

    def journey(spans: list[dict[str, Any]]) -> dict[str, dict[str, Any]] | None:
        by_id = {s["span_id"]: s for s in spans}
        producers = [
            s
            for s in spans
            if s["kind"] == "PRODUCER" and s["attributes"].get("messaging.message.id") == event_id
        ]
        consumers = [
            s
            for s in spans
            if s["kind"] == "CONSUMER" and s["attributes"].get("messaging.message.id") == event_id
        ]
        if not producers or not consumers:
            return None
        redis_writes = [
            s
            for s in spans
            if s["name"] == "redis apply features" and s["parent_span_id"] == consumers[0]["span_id"]
        ]
        if not redis_writes:
            return None
        return {
            "server": by_id.get(producers[0]["parent_span_id"] or "", {}),
            "produce": producers[0],
            "process": consumers[0],
            "redis": redis_writes[0],
        }

    hops = await poll_until(lambda: journey(spans_of()), lambda j: j is not None and bool(j["server"]))
    assert hops["server"]["name"] == "eta.v1.IngestionService/PublishEvents"
    assert hops["server"]["kind"] == "SERVER"
    assert hops["server"]["service"] == "eta-ingestion"
    assert hops["produce"]["parent_span_id"] == hops["server"]["span_id"]
    assert hops["process"]["parent_span_id"] == hops["produce"]["span_id"]
    assert hops["process"]["service"] == "eta-aggregator"
    assert hops["redis"]["parent_span_id"] == hops["process"]["span_id"]
    assert len({hop["trace_id"] for hop in hops.values()}) == 1
    assert hops["produce"]["attributes"]["messaging.destination.name"] == "eta.order-events"
    assert hops["process"]["attributes"]["messaging.destination.name"] == "eta.order-events"
    assert hops["redis"]["attributes"]["db.system"] == "redis"


async def test_prediction_trace_has_redis_read_and_inference(
    channels: dict[str, grpc.aio.Channel], spans_of: Callable[[], list[dict[str, Any]]]
) -> None:
    restaurant = new_id("rest")
    eta = eta_pb2_grpc.EtaServiceStub(channels["prediction"])
    await eta.PredictEta(
        eta_pb2.PredictEtaRequest(
            restaurant_id=restaurant, restaurant_location=BERLIN, customer_location=NEARBY
        ),
        timeout=5,
    )

    def find(spans: list[dict[str, Any]]) -> tuple[dict[str, Any], list[dict[str, Any]]] | None:
        servers = [s for s in spans if s["name"] == "eta.v1.EtaService/PredictEta" and s["kind"] == "SERVER"]
        for server in servers:
            children = [s for s in spans if s["parent_span_id"] == server["span_id"]]
            if {"redis read features", "model inference"} <= {c["name"] for c in children}:
                return server, children
        return None

    server, children = await poll_until(lambda: find(spans_of()), lambda found: found is not None)
    assert all(child["trace_id"] == server["trace_id"] for child in children)
    redis_read = next(c for c in children if c["name"] == "redis read features")
    assert redis_read["attributes"]["db.system"] == "redis"
