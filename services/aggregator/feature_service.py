"""FeatureService: read a restaurant's online features with their age (debugging, dashboards, the app)."""

from __future__ import annotations

from typing import Any

import grpc

from eta.v1 import features_pb2, features_pb2_grpc
from eta_common.feature_proto import to_feature_values
from eta_common.grpc_errors import abort_bad_request
from eta_common.markets import check_market, market_or_default
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
        violations: list[tuple[str, str]] = []
        check_market(violations, request.market_id)
        if violations:
            await abort_bad_request(context, violations)
        now = now_ms()
        as_of = ms_from_timestamp(request.as_of) if request.HasField("as_of") else now
        snapshot = await self._store.read_restaurant(
            request.restaurant_id, now_ms=as_of, market=market_or_default(request.market_id)
        )
        return features_pb2.GetRestaurantFeaturesResponse(
            restaurant_id=request.restaurant_id,
            features=to_feature_values(snapshot.readings.values(), now),
        )
