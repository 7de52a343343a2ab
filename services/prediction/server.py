"""EtaService servicer: one Redis round trip for the features, in-process LightGBM, a range."""

from __future__ import annotations

import logging
import time
from typing import Any

import grpc
import numpy as np
from opentelemetry import trace
from opentelemetry.trace import SpanKind
from redis.exceptions import RedisError

from eta.v1 import eta_pb2, eta_pb2_grpc
from eta_common import features as F
from eta_common.feature_proto import to_feature_values
from eta_common.geo import check_point
from eta_common.grpc_errors import abort_bad_request
from eta_common.online_store import FeatureReading, OnlineStore, RestaurantFeatures
from eta_common.timeutil import now_ms
from prediction import metrics
from prediction.models import ModelHolder

log = logging.getLogger(__name__)
tracer = trace.get_tracer("eta.prediction")
Quality = eta_pb2.PredictEtaResponse.FeatureQuality


class EtaServicer(eta_pb2_grpc.EtaServiceServicer):
    def __init__(self, store: OnlineStore, models: ModelHolder, *, staleness_budget_seconds: float) -> None:
        self._store = store
        self._models = models
        self._budget = staleness_budget_seconds

    async def PredictEta(
        self, request: eta_pb2.PredictEtaRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> eta_pb2.PredictEtaResponse:
        violations: list[tuple[str, str]] = []
        if not request.restaurant_id:
            violations.append(("restaurant_id", "required"))
        check_point(
            violations,
            "restaurant_location",
            request.HasField("restaurant_location"),
            request.restaurant_location,
            required=True,
        )
        check_point(
            violations,
            "customer_location",
            request.HasField("customer_location"),
            request.customer_location,
            required=True,
        )
        if violations:
            await abort_bad_request(context, violations)
        now = now_ms()
        rloc = (request.restaurant_location.lat, request.restaurant_location.lng)
        snapshot = await self._read_features(request.restaurant_id, rloc, now)
        snapshot.readings[F.DISTANCE_KM] = FeatureReading(
            F.DISTANCE_KM,
            F.haversine_km(*rloc, request.customer_location.lat, request.customer_location.lng),
            True,
        )
        snapshot.readings[F.HOUR_OF_WEEK] = FeatureReading(F.HOUR_OF_WEEK, float(F.hour_of_week(now)), True)
        model = self._models.current
        started = time.perf_counter()
        with tracer.start_as_current_span("model inference", attributes={"eta.model.version": model.version}):
            row = np.array([snapshot.vector(model.feature_names)], dtype=np.float64)
            point, low, high = model.predict(row)
        metrics.LATENCY.labels("inference").observe(time.perf_counter() - started)
        quality = self._quality(snapshot, now)
        metrics.QUALITY.labels(Quality.Name(quality)).inc()
        trace.get_current_span().set_attributes(
            {"eta.model.version": model.version, "eta.feature_quality": Quality.Name(quality)}
        )
        return eta_pb2.PredictEtaResponse(
            restaurant_id=request.restaurant_id,
            eta_minutes=float(point[0]),
            eta_low_minutes=float(low[0]),
            eta_high_minutes=float(high[0]),
            model_version=model.version,
            feature_quality=quality,
            features=to_feature_values((snapshot.readings[name] for name in model.feature_names), now),
        )

    async def _read_features(
        self, restaurant_id: str, location: tuple[float, float], now: int
    ) -> RestaurantFeatures:
        started = time.perf_counter()
        with tracer.start_as_current_span(
            "redis read features",
            kind=SpanKind.CLIENT,
            attributes={"db.system": "redis", "db.operation.name": "pipeline"},
        ) as span:
            try:
                snapshot = await self._store.read_restaurant(restaurant_id, now_ms=now, location=location)
            except (RedisError, OSError) as exc:
                # Degrade, don't fail: answer from defaults and flag MISSING.
                metrics.FALLBACKS.labels("redis_unavailable").inc()
                span.record_exception(exc)
                log.warning("online store unavailable; using feature defaults", extra={"error": str(exc)})
                snapshot = RestaurantFeatures(restaurant_id, now, location=location)
                for name, default in F.DEFAULTS.items():
                    snapshot.readings[name] = FeatureReading(name, default, False)
                return snapshot
            for reading in snapshot.readings.values():
                age = reading.age_seconds(now)
                if age is not None:
                    span.set_attribute(f"eta.feature_age_s.{reading.name}", age)
                    metrics.FEATURE_AGE.labels(reading.name).observe(age)
        metrics.LATENCY.labels("redis_read").observe(time.perf_counter() - started)
        return snapshot

    def _quality(
        self, snapshot: RestaurantFeatures, now: int
    ) -> eta_pb2.PredictEtaResponse.FeatureQuality.ValueType:
        quality: eta_pb2.PredictEtaResponse.FeatureQuality.ValueType = Quality.COMPLETE
        for reading in snapshot.readings.values():
            if not reading.present:
                return Quality.MISSING
            age = reading.age_seconds(now)
            if age is not None and age > self._budget:
                quality = Quality.STALE
        return quality
