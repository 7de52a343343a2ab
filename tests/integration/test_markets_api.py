"""market_id through the real processes: ingestion publishes it (the archive keeps it per event) and
rejects a malformed one on its field while batch-mates go through; PredictEta, PredictEtaBatch and
GetRestaurantFeatures refuse a malformed one with INVALID_ARGUMENT naming the field; and a request in the
old shape (no market_id on the wire) is answered exactly like one naming the default market."""

from __future__ import annotations

import uuid
from typing import Any, cast

import asyncpg
import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from devstack.stack import LocalStack
from eta.v1 import eta_pb2, eta_pb2_grpc, features_pb2, features_pb2_grpc, ingestion_pb2, ingestion_pb2_grpc
from eta_common.markets import DEFAULT_MARKET
from tests.integration.conftest import poll_until
from tests.integration.helpers import BERLIN, NEARBY, driver_online, new_id, placed

pytestmark = pytest.mark.integration
Result = ingestion_pb2.EventResult


def _violations(exc: grpc.aio.AioRpcError) -> list[str]:
    status = rpc_status.from_call(cast(Any, exc))
    assert status is not None
    out: list[str] = []
    for detail in status.details:
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad):
            out.extend(v.field for v in bad.field_violations)
    return out


async def test_events_carry_their_market_to_the_archive(
    channels: dict[str, grpc.aio.Channel], stack: LocalStack
) -> None:
    market = f"m-{uuid.uuid4().hex[:8]}"
    restaurant = new_id("rest")
    good = placed(restaurant)
    good.order.market_id = market
    driver = driver_online(new_id("drv"))
    driver.driver.market_id = market
    old_shape = placed(restaurant)  # no market_id: the default market
    bad = placed(restaurant)
    bad.order.market_id = "no:colons"
    stub = ingestion_pb2_grpc.IngestionServiceStub(channels["ingestion"])
    reply = await stub.PublishEvents(
        ingestion_pb2.PublishEventsRequest(events=[good, driver, old_shape, bad]), timeout=10
    )
    assert [r.status for r in reply.results] == [Result.ACCEPTED] * 3 + [Result.REJECTED]
    assert [v.field for v in reply.results[3].violations] == ["order.market_id"]
    ids = [good.order.event_id, driver.driver.event_id, old_shape.order.event_id]
    conn = await asyncpg.connect(stack.database_url)
    try:
        rows = await poll_until(
            lambda: conn.fetch(
                "SELECT event_id, market_id FROM events WHERE event_id = ANY($1::text[])", ids
            ),
            lambda found: len(found) == 3,
            timeout=30,
        )
    finally:
        await conn.close()
    archived = {r["event_id"]: r["market_id"] for r in rows}
    assert archived == {ids[0]: market, ids[1]: market, ids[2]: None}


async def test_a_malformed_market_is_invalid_argument_on_its_field(
    channels: dict[str, grpc.aio.Channel],
) -> None:
    eta = eta_pb2_grpc.EtaServiceStub(channels["prediction"])
    features = features_pb2_grpc.FeatureServiceStub(channels["aggregator"])
    calls: list[Any] = [
        eta.PredictEta(
            eta_pb2.PredictEtaRequest(
                restaurant_id="r", restaurant_location=BERLIN, customer_location=NEARBY, market_id="a b"
            ),
            timeout=5,
        ),
        eta.PredictEtaBatch(
            eta_pb2.PredictEtaBatchRequest(
                customer_location=NEARBY,
                restaurants=[eta_pb2.RestaurantLocation(restaurant_id="r", location=BERLIN)],
                market_id="{x}",
            ),
            timeout=5,
        ),
        features.GetRestaurantFeatures(
            features_pb2.GetRestaurantFeaturesRequest(restaurant_id="r", market_id="x" * 65), timeout=5
        ),
    ]
    for call in calls:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "market_id" in _violations(caught.value)


async def test_an_old_shaped_request_gets_the_same_answer(channels: dict[str, grpc.aio.Channel]) -> None:
    restaurant = new_id("rest")
    stub = ingestion_pb2_grpc.IngestionServiceStub(channels["ingestion"])
    reply = await stub.PublishEvents(
        ingestion_pb2.PublishEventsRequest(events=[placed(restaurant, ago_ms=i * 20_000) for i in range(4)]),
        timeout=10,
    )
    assert reply.accepted == 4
    features = features_pb2_grpc.FeatureServiceStub(channels["aggregator"])
    await poll_until(
        lambda: features.GetRestaurantFeatures(
            features_pb2.GetRestaurantFeaturesRequest(restaurant_id=restaurant), timeout=5
        ),
        lambda r: any(f.name == "num_orders_last_30_min" and f.value == 4 for f in r.features),
    )
    # the bytes a client built before markets sends: the same message without field 6
    old = eta_pb2.PredictEtaRequest(
        restaurant_id=restaurant, restaurant_location=BERLIN, customer_location=NEARBY, request_id="q"
    )
    raw = channels["prediction"].unary_unary(
        "/eta.v1.EtaService/PredictEta",
        request_serializer=None,
        response_deserializer=eta_pb2.PredictEtaResponse.FromString,
    )
    answers = []
    for market in (None, DEFAULT_MARKET, None):
        if market is None:
            answers.append(await raw(old.SerializeToString(), timeout=5))
        else:
            new = eta_pb2.PredictEtaRequest()
            new.CopyFrom(old)
            new.market_id = market
            answers.append(await raw(new.SerializeToString(), timeout=5))

    def essence(reply: eta_pb2.PredictEtaResponse) -> tuple[Any, ...]:
        values = tuple((f.name, f.value, f.present) for f in reply.features)
        return (reply.eta_minutes, reply.eta_low_minutes, reply.eta_high_minutes, reply.model_version, values)

    assert essence(answers[0]) == essence(answers[1]) == essence(answers[2])
