"""GetRestaurantFeatures: a malformed market_id is INVALID_ARGUMENT on its field, before the store is read;
an absent one (old-shaped request) is served as before."""

from __future__ import annotations

from typing import Any, cast

import grpc
import pytest

from aggregator.feature_service import FeatureServicer
from eta.v1 import features_pb2
from eta_common.online_store import OnlineStore, RestaurantFeatures
from eta_common.tests.servicer_context import Aborted, Context


class Store:
    def __init__(self) -> None:
        self.reads: list[str] = []

    async def read_restaurant(self, restaurant_id: str, *, now_ms: int, **_: Any) -> RestaurantFeatures:
        self.reads.append(restaurant_id)
        return RestaurantFeatures(restaurant_id, now_ms, {})


@pytest.mark.parametrize("market", ["x" * 65, "a:b", "{a}", "a b"])
async def test_bad_market_is_invalid_argument(market: str) -> None:
    store = Store()
    servicer = FeatureServicer(cast(OnlineStore, store))
    context = Context()
    request = features_pb2.GetRestaurantFeaturesRequest(restaurant_id="r1", market_id=market)
    with pytest.raises(Aborted):
        await servicer.GetRestaurantFeatures(request, cast(Any, context))
    assert context.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "market_id: must be 1..64 characters" in context.details
    assert store.reads == []


@pytest.mark.parametrize("market", ["", "berlin"])
async def test_absent_or_good_market_is_served(market: str) -> None:
    store = Store()
    servicer = FeatureServicer(cast(OnlineStore, store))
    request = features_pb2.GetRestaurantFeaturesRequest(restaurant_id="r1", market_id=market)
    reply = await servicer.GetRestaurantFeatures(request, cast(Any, Context()))
    assert reply.restaurant_id == "r1"
    assert store.reads == ["r1"]
