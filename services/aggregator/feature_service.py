"""FeatureService: read a restaurant's online features with their age (debugging, dashboards, the app)."""

from __future__ import annotations

from typing import Any

import grpc

from eta.v1 import features_pb2, features_pb2_grpc
from eta_common.feature_proto import to_feature_values
from eta_common.grpc_errors import abort_bad_request
from eta_common.markets import MARKET_ID_PATTERN
from eta_common.online_store import OnlineStore
from eta_common.timeutil import ms_from_timestamp, now_ms


class FeatureServicer(features_pb2_grpc.FeatureServiceServicer):
    def __init__(self, store: OnlineStore) -> None:
        self._store = store

    async def GetRestaurantFeatures(
        self, request: features_pb2.GetRestaurantFeaturesRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> features_pb2.GetRestaurantFeaturesResponse:
        if not request.restaurant_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "restaurant_id: required")
        if request.market_id and MARKET_ID_PATTERN.fullmatch(request.market_id) is None:
            await abort_bad_request(
                context,
                [("market_id", "must be 1..64 characters of [A-Za-z0-9_.-] (empty = the default market)")],
            )
        now = now_ms()
        as_of = ms_from_timestamp(request.as_of) if request.HasField("as_of") else now
        snapshot = await self._store.read_restaurant(request.restaurant_id, now_ms=as_of)
        return features_pb2.GetRestaurantFeaturesResponse(
            restaurant_id=request.restaurant_id,
            features=to_feature_values(snapshot.readings.values(), now),
        )
