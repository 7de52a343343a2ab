"""market_id on PredictEta / PredictEtaBatch: optional (an old-shaped request, without the field, is
served exactly as before), INVALID_ARGUMENT with a field violation on ``market_id`` when malformed."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from eta.v1 import eta_pb2
from eta_common.markets import MARKET_ID_REASON
from eta_common.tests.servicer_context import Aborted, Context
from prediction.inference import ServingModel
from prediction.models import load_model
from prediction.tests.support import synthetic_bundle
from prediction.tests.test_servicer import CUSTOMER, RESTAURANT, fresh, make, single


@pytest.fixture(scope="module")
def model() -> ServingModel:
    return load_model("v-test", synthetic_bundle(rows=1500, rounds=25))


@pytest.fixture(autouse=True)
def frozen_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    from prediction.tests.test_servicer import NOW

    monkeypatch.setattr("prediction.server.now_ms", lambda: NOW)


def _batch(market_id: str = "") -> eta_pb2.PredictEtaBatchRequest:
    return eta_pb2.PredictEtaBatchRequest(
        customer_location=CUSTOMER,
        restaurants=[eta_pb2.RestaurantLocation(restaurant_id=r, location=RESTAURANT) for r in ("a", "b")],
        request_id="q",
        market_id=market_id,
    )


@pytest.mark.parametrize("market", ["x" * 65, "drv:{x}", "ber lin", "berlin\n", "münchen"])
async def test_bad_market_is_invalid_argument_on_its_field(model: ServingModel, market: str) -> None:
    servicer, reader, _ = make(model)
    calls: list[tuple[Any, Any]] = [
        (servicer.PredictEta, eta_pb2.PredictEtaRequest(**_single_fields(), market_id=market)),
        (servicer.PredictEtaBatch, _batch(market)),
    ]
    for call, request in calls:
        context = Context()
        with pytest.raises(Aborted):
            await call(request, cast(Any, context))
        assert context.code == grpc.StatusCode.INVALID_ARGUMENT
        assert f"market_id: {MARKET_ID_REASON}" in context.details
    assert reader.budgets == []  # refused before touching the store


def _single_fields() -> dict[str, Any]:
    request = single(request_id="q")
    return {
        "restaurant_id": request.restaurant_id,
        "restaurant_location": request.restaurant_location,
        "customer_location": request.customer_location,
        "request_id": request.request_id,
    }


def _pre_market_class(name: str) -> Any:
    """The message class a client built before markets has: the committed API baseline
    (protos/baseline/eta-v1.binpb) with every market_id field taken out — fields 1..5 exactly as before."""
    image = Path(__file__).resolve().parents[3] / "protos" / "baseline" / "eta-v1.binpb"
    files = descriptor_pb2.FileDescriptorSet.FromString(image.read_bytes())
    pool = descriptor_pool.DescriptorPool()
    for file in files.file:
        for message in file.message_type:
            kept = [f for f in message.field if f.name != "market_id"]
            del message.field[:]
            message.field.extend(kept)
        pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(name))


async def test_old_shaped_requests_get_the_same_answer(model: ServingModel) -> None:
    """Requests serialized by a client built without market_id decode with an empty one and are answered
    exactly like requests naming the default market."""
    old_single = _pre_market_class("eta.v1.PredictEtaRequest")
    assert "market_id" not in old_single.DESCRIPTOR.fields_by_name
    servicer, reader, _ = make(model)
    reader.readings["r1"] = fresh()
    fields = _single_fields()
    old_bytes = old_single(
        restaurant_id=fields["restaurant_id"],
        restaurant_location={"lat": RESTAURANT.lat, "lng": RESTAURANT.lng},
        customer_location={"lat": CUSTOMER.lat, "lng": CUSTOMER.lng},
        request_id="q",
    ).SerializeToString()
    old = eta_pb2.PredictEtaRequest.FromString(old_bytes)
    assert old.market_id == ""
    a = await servicer.PredictEta(old, cast(Any, Context()))
    b = await servicer.PredictEta(
        eta_pb2.PredictEtaRequest(**fields, market_id="default"), cast(Any, Context())
    )
    assert a == b
    old_batch = _pre_market_class("eta.v1.PredictEtaBatchRequest")
    batch_bytes = old_batch(
        customer_location={"lat": CUSTOMER.lat, "lng": CUSTOMER.lng},
        restaurants=[
            {"restaurant_id": r, "location": {"lat": RESTAURANT.lat, "lng": RESTAURANT.lng}}
            for r in ("a", "b")
        ],
        request_id="q",
    ).SerializeToString()
    batch_old = await servicer.PredictEtaBatch(
        eta_pb2.PredictEtaBatchRequest.FromString(batch_bytes), cast(Any, Context())
    )
    batch_new = await servicer.PredictEtaBatch(_batch("default"), cast(Any, Context()))
    assert batch_old == batch_new
    assert batch_old == await servicer.PredictEtaBatch(_batch(), cast(Any, Context()))
