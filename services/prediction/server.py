"""EtaService: features in one Redis round trip, the model in-process, a range with provenance.

Both RPCs share one path: validate → time budget from the client's deadline → read the online features of
every restaurant in one pipeline (:mod:`prediction.reader`, never an error) → add the request-time
features → score all rows with the model in one call on this thread → per row: quality from each
feature's presence and age against its staleness budget → reply, metrics, and a row per prediction for
the prediction log (queued, written in the background).
"""

from __future__ import annotations

import itertools
import logging
import math
import random
import secrets
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn, TypeAlias

import grpc
import numpy as np
from opentelemetry import trace

from eta.v1 import eta_pb2, eta_pb2_grpc
from eta_common import features as F
from eta_common.customer_features import CUSTOMER_FEATURE_NAMES
from eta_common.feature_block import ONLINE_NAMES, FeatureBlock, FeatureColumns, Rows
from eta_common.geo import check_point, valid_point
from eta_common.grpc_errors import abort_bad_request
from eta_common.markets import check_market, market_or_default
from eta_common.timeutil import now_ms
from prediction import metrics
from prediction.config import ONLINE_FEATURES
from prediction.feature_wire import EtaRowsWire, FeatureWire
from prediction.inference import ServingModel
from prediction.models import ModelHolder
from prediction.prediction_log import LoggedPrediction, PredictionLog
from prediction.reader import FeatureReader

__all__ = ["EtaServicer", "RequestIds"]

log = logging.getLogger(__name__)
tracer = trace.get_tracer("eta.prediction")
Quality = eta_pb2.PredictEtaResponse.FeatureQuality
QualityValue: TypeAlias = eta_pb2.PredictEtaResponse.FeatureQuality.ValueType
Degradation = eta_pb2.Degradation
DegradationValue: TypeAlias = eta_pb2.Degradation.ValueType
Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"
_Ranges: TypeAlias = tuple[list[float], list[float], list[float]]  # points, lows, highs in minutes

_K = len(F.FEATURE_NAMES)
_ONLINE_IDX = [F.FEATURE_NAMES.index(name) for name in ONLINE_FEATURES]
_DISTANCE_IDX = F.FEATURE_NAMES.index(F.DISTANCE_KM)
_HOUR_IDX = F.FEATURE_NAMES.index(F.HOUR_OF_WEEK)
_ONLINE_SET = frozenset(ONLINE_FEATURES)
_ONLINE_NAME_IDX = list(zip(ONLINE_FEATURES, _ONLINE_IDX, strict=True))
# Features the aggregator keeps from the event stream: exact as of the last instant every aggregator was
# caught up, so their age is measured from the later of their last change and that instant (a quiet
# restaurant's unchanged count is current, not stale). The supply count has its own as-of time, and the
# customer features their hourly refresh.
_STREAM_FED = frozenset(
    name for name in ONLINE_FEATURES if name not in (F.FREE_DRIVERS_NEARBY, *CUSTOMER_FEATURE_NAMES)
)
# Time kept for scoring and replying per restaurant of a batch, on top of PREDICTION_DEADLINE_RESERVE_MS.
RESERVE_PER_ROW_SECONDS = 0.00005
# plain ints: attribute access on a protobuf enum wrapper is a Python __getattr__ call, per row
COMPLETE, STALE, MISSING = Quality.COMPLETE, Quality.STALE, Quality.MISSING
_QUALITY_NAMES = {q: Quality.Name(q) for q in (COMPLETE, STALE, MISSING)}
_FEATURES_WIRE = FeatureWire(eta_pb2.PredictEtaResponse.FEATURES_FIELD_NUMBER)
_ETA_ROWS_WIRE = EtaRowsWire()  # PredictEtaBatchResponse.etas


def _valid_restaurants(
    restaurants: Sequence[eta_pb2.RestaurantLocation], violations: list[tuple[str, str]]
) -> list[tuple[str, tuple[float, float]]]:
    """A feed's (id, (lat, lng)) in one pass over the messages, each field read once; a restaurant with
    no id or a location :func:`valid_point` refuses gets the full checks, which name its bad fields in
    ``violations``."""
    wanted = []
    for i, item in enumerate(restaurants):
        restaurant_id = item.restaurant_id
        if item.HasField("location"):
            location = item.location
            lat, lng = location.lat, location.lng
            if restaurant_id and valid_point(lat, lng):
                wanted.append((restaurant_id, (lat, lng)))
                continue
        if not restaurant_id:
            violations.append((f"restaurants[{i}].restaurant_id", "required"))
        check_point(
            violations, f"restaurants[{i}].location", item.HasField("location"), item.location, required=True
        )
    return wanted


class RequestIds:
    """``p-<random>-<n>``: unique across replicas (random prefix per process) and cheap."""

    def __init__(self, prefix: str | None = None) -> None:
        self._prefix = prefix or f"p-{secrets.token_hex(4)}-"
        self._counter = itertools.count(1)

    def next(self) -> str:
        return f"{self._prefix}{next(self._counter)}"


@dataclass(slots=True)
class _Rows:
    """The scored restaurants of a call: the read block with the request-time features filled in, and
    each row's feature ages, stale and missing features, and quality."""

    block: FeatureBlock
    values: Rows  # the block's rows (canonical layout): the model's input
    ages: Rows  # seconds since the store changed the feature; NaN = unknown
    stale: list[list[str]]
    missing: list[list[str]]
    quality: list[QualityValue]

    def __len__(self) -> int:
        return len(self.quality)


@dataclass(slots=True)
class _BatchRows:
    """:class:`_Rows` of a batch as arrays (rows × canonical columns): the same values, ages, stale and
    missing features and quality, computed column-wise. Per restaurant and feature, the list path's
    Python loop costs ~0.5 µs; a 50-row feed has 550 of them, and the reply and metrics 1,300 more."""

    block: FeatureColumns
    values: np.ndarray  # the model's input, request-time features filled in
    ages: np.ndarray  # NaN = unknown
    present: np.ndarray  # bool: the store had a value
    stale_mask: np.ndarray  # rows × online features (spec order)
    missing_mask: np.ndarray
    stale: list[list[str]]
    missing: list[list[str]]
    quality: list[QualityValue]

    def __len__(self) -> int:
        return len(self.quality)


class EtaServicer(eta_pb2_grpc.EtaServiceServicer):
    def __init__(
        self,
        reader: FeatureReader,
        models: ModelHolder,
        *,
        budgets: Mapping[str, float],
        max_batch: int = 100,
        deadline_reserve_seconds: float = 0.002,
        prediction_log: PredictionLog | None = None,
        request_ids: RequestIds | None = None,
        feed_log_sample: float = 1.0,
    ) -> None:
        self._reader = reader
        self._models = models
        # (name, position in the canonical row, staleness budget, stream-fed) per online feature
        self._online_spec = [
            (name, k, budgets[name], name in _STREAM_FED)
            for name, k in zip(ONLINE_NAMES, _ONLINE_IDX, strict=True)
        ]
        # the same, column-wise (for :meth:`_batch_rows`): online columns, budgets, stream-fed mask
        self._online_columns = np.array([k for _, k, _, _ in self._online_spec], dtype=np.intp)
        self._online_budgets = np.array([budget for _, _, budget, _ in self._online_spec], dtype=np.float64)
        self._online_fed = np.array([fed for _, _, _, fed in self._online_spec], dtype=bool)
        self._feature_bits = 1 << np.arange(len(self._online_spec), dtype=np.int64)
        self._names_by_bits: dict[int, list[str]] = {0: []}
        self._max_batch = max_batch
        self._reserve = deadline_reserve_seconds
        self._log = prediction_log
        self._feed_log_sample = feed_log_sample
        self._ids = request_ids or RequestIds()
        self._quality_counters = {q: metrics.QUALITY.labels(name) for q, name in _QUALITY_NAMES.items()}
        self._stale_counters = {name: metrics.STALE_FEATURES.labels(name) for name in ONLINE_NAMES}
        self._missing_counters = {name: metrics.MISSING_FEATURES.labels(name) for name in ONLINE_NAMES}
        self._heuristic_fallbacks = metrics.FALLBACKS.labels("heuristic_model")
        # the same counters in spec order (the batch path counts column-wise)
        self._stale_list = [self._stale_counters[name] for name, _, _, _ in self._online_spec]
        self._missing_list = [self._missing_counters[name] for name, _, _, _ in self._online_spec]

    def can_answer(self) -> bool:
        """False only when no model can answer at all (no registry model and the heuristic disabled)."""
        return self._models.current is not None

    # --- RPCs -----------------------------------------------------------------------------------------

    async def PredictEta(
        self, request: eta_pb2.PredictEtaRequest, context: Context
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
        check_market(violations, request.market_id)
        if violations:
            await abort_bad_request(context, violations)
        budget = await self._time_budget(context, "PredictEta", 1)
        model = await self._model(context, "PredictEta")
        now = now_ms()
        rloc = (request.restaurant_location.lat, request.restaurant_location.lng)
        market = market_or_default(request.market_id)
        block, degradation = await self._reader.read(
            [(request.restaurant_id, rloc)],
            now_ms=now,
            budget_seconds=budget,
            market=market,
            customer_id=request.customer_id,
        )
        customer = (request.customer_location.lat, request.customer_location.lng)
        rows = self._rows(block, customer, now)
        model, (points, lows, highs), degradations = await self._score(
            context, "PredictEta", model, rows, degradation
        )
        quality = rows.quality[0]
        request_id = request.request_id or self._ids.next()
        reply = eta_pb2.PredictEtaResponse(
            restaurant_id=request.restaurant_id,
            eta_minutes=points[0],
            eta_low_minutes=lows[0],
            eta_high_minutes=highs[0],
            model_version=model.version,
            feature_quality=quality,
            stale_features=rows.stale[0],
            missing_features=rows.missing[0],
            degradations=degradations,
            request_id=request_id,
        )
        self._add_feature_values(reply, model, rows)
        self._account(model, rows, points, lows, highs, request_id, now, request.customer_id, market=market)
        span = trace.get_current_span()
        if span.is_recording():
            span.set_attributes(
                {
                    "eta.model.version": model.version,
                    "eta.feature_quality": _QUALITY_NAMES[quality],
                    "eta.request_id": request_id,
                }
            )
        return reply

    async def PredictEtaBatch(
        self, request: eta_pb2.PredictEtaBatchRequest, context: Context
    ) -> eta_pb2.PredictEtaBatchResponse:
        restaurants = request.restaurants
        violations: list[tuple[str, str]] = []
        wanted: list[tuple[str, tuple[float, float]]] = []
        check_point(
            violations,
            "customer_location",
            request.HasField("customer_location"),
            request.customer_location,
            required=True,
        )
        if not restaurants:
            violations.append(("restaurants", "at least one restaurant is required"))
        elif len(restaurants) > self._max_batch:
            violations.append(
                ("restaurants", f"at most {self._max_batch} restaurants per call, got {len(restaurants)}")
            )
        else:
            wanted = _valid_restaurants(restaurants, violations)
        check_market(violations, request.market_id)
        if violations:
            await abort_bad_request(context, violations)
        metrics.BATCH_SIZE.observe(len(restaurants))
        budget = await self._time_budget(context, "PredictEtaBatch", len(restaurants))
        model = await self._model(context, "PredictEtaBatch")
        now = now_ms()
        market = market_or_default(request.market_id)
        block, degradation = await self._reader.read_columns(
            wanted, now_ms=now, budget_seconds=budget, customer_id=request.customer_id, market=market
        )
        customer = (request.customer_location.lat, request.customer_location.lng)
        rows = self._batch_rows(block, customer, now)
        model, (points, lows, highs), degradations = await self._score(
            context, "PredictEtaBatch", model, rows, degradation
        )
        request_id = request.request_id or self._ids.next()
        columns = model.columns
        # the model's inputs and their ages: NaN (missing / unknown) as 0 on the wire
        inputs, ages = rows.values[:, columns], rows.ages[:, columns]
        wire_values = np.where(np.isnan(inputs), 0.0, inputs)
        wire_ages = np.where(np.isnan(ages), 0.0, ages)
        ids, qualities, stale, missing = block.restaurant_ids, rows.quality, rows.stale, rows.missing
        reply = eta_pb2.PredictEtaBatchResponse(
            request_id=request_id,
            model_version=model.version,
            feature_names=model.feature_names,
            degradations=degradations,
        )
        reply.MergeFromString(
            _ETA_ROWS_WIRE.encode(ids, points, lows, highs, qualities, wire_values, wire_ages, stale, missing)
        )
        logged = self._feed_log_sample >= 1.0 or random.random() < self._feed_log_sample
        self._account_batch(
            model, rows, points, lows, highs, request_id, now, request.customer_id, log=logged, market=market
        )
        span = trace.get_current_span()
        if span.is_recording():
            span.set_attributes(
                {
                    "eta.model.version": model.version,
                    "eta.request_id": request_id,
                    "eta.logged": logged,
                    "eta.restaurants": len(rows),
                    "eta.rows_stale": qualities.count(STALE),
                    "eta.rows_missing": qualities.count(MISSING),
                }
            )
        return reply

    # --- steps ----------------------------------------------------------------------------------------

    async def _time_budget(self, context: Context, method: str, rows: int) -> float | None:
        """Seconds the feature read may take, from the client's deadline (None: no deadline)."""
        remaining = context.time_remaining()
        if remaining is None:
            return None
        reserve = self._reserve + rows * RESERVE_PER_ROW_SECONDS
        if remaining <= reserve:
            metrics.REJECTED.labels(method, "deadline").inc()
            await _abort(
                context,
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"{remaining * 1000:.2f} ms left of the deadline, {reserve * 1000:.2f} ms needed to answer "
                "(PREDICTION_DEADLINE_RESERVE_MS)",
            )
        return float(remaining - reserve)

    async def _model(self, context: Context, method: str) -> ServingModel:
        model = self._models.current
        if model is None:
            metrics.REJECTED.labels(method, "no_model").inc()
            await _abort(
                context,
                grpc.StatusCode.UNAVAILABLE,
                "no model loaded yet and the heuristic fallback is disabled (PREDICTION_HEURISTIC_FALLBACK); "
                "waiting for a promoted model in the registry",
            )
        return model

    def _rows(self, block: FeatureBlock, customer: tuple[float, float], now: int) -> _Rows:
        """Add the request-time features, then per row: each online feature's age, whether it is missing
        (the store has nothing for it; a windowed mean with no sample in its window is present, with the
        value NaN the model was trained with) or stale (older than its budget), and the quality."""
        hour = float(F.hour_of_week(now))
        clat, clng = customer
        spec = self._online_spec
        haversine, isnan, nan = F.haversine_km, math.isnan, math.nan
        all_ages: Rows = []
        all_stale: list[list[str]] = []
        all_missing: list[list[str]] = []
        quality: list[QualityValue] = []
        current = block.current_ms  # NaN (unknown) compares False
        for values, present, updated, location in zip(
            block.values, block.present, block.updated_ms, block.locations, strict=True
        ):
            ages = [nan] * _K
            stale: list[str] = []
            missing: list[str] = []
            for name, k, budget, stream_fed in spec:
                changed = updated[k]
                if stream_fed and current > changed:
                    changed = current  # unchanged since, and the store was current then
                if not isnan(changed):  # known
                    age = ages[k] = max(0.0, (now - changed) / 1000.0)
                    if not present[k]:
                        missing.append(name)
                    elif age > budget:
                        stale.append(name)
                elif not present[k]:
                    missing.append(name)
            values[_DISTANCE_IDX] = (
                haversine(location[0], location[1], clat, clng) if location is not None else nan
            )
            values[_HOUR_IDX] = hour
            ages[_DISTANCE_IDX] = ages[_HOUR_IDX] = 0.0
            all_ages.append(ages)
            all_stale.append(stale)
            all_missing.append(missing)
            quality.append(MISSING if missing else (STALE if stale else COMPLETE))
        return _Rows(block, block.values, all_ages, all_stale, all_missing, quality)

    def _named_features(self, bits: int) -> list[str]:
        """The online features whose bit is set (spec order), one shared list per set: read-only."""
        names = self._names_by_bits.get(bits)
        if names is None:
            names = self._names_by_bits[bits] = [
                name for j, (name, _, _, _) in enumerate(self._online_spec) if bits >> j & 1
            ]
        return names

    def _batch_rows(self, block: FeatureColumns, customer: tuple[float, float], now: int) -> _BatchRows:
        """:meth:`_rows`, column-wise: the same rules, the same values (the distance row by row with the
        same function as the offline builder, so online = offline to the bit)."""
        n = len(block)
        cols = self._online_columns
        values, present = block.values, block.present  # the block's own arrays: filled in place
        changed = block.updated_ms[:, cols]
        current = block.current_ms
        if not math.isnan(current):  # unchanged since, and the store was current then
            changed = np.where(self._online_fed & (current > changed), current, changed)
        known = ~np.isnan(changed)
        online_present = present[:, cols]
        online_ages = np.maximum(0.0, (now - changed) / 1000.0)  # NaN (unknown) stays NaN
        missing_mask = ~online_present
        with np.errstate(invalid="ignore"):  # NaN > budget is False, as in the list path
            stale_mask = known & online_present & (online_ages > self._online_budgets)
        ages = np.full((n, _K), math.nan)
        ages[:, cols] = online_ages
        ages[:, _DISTANCE_IDX] = ages[:, _HOUR_IDX] = 0.0
        clat, clng = customer
        haversine, nan = F.haversine_km, math.nan
        values[:, _DISTANCE_IDX] = [
            haversine(location[0], location[1], clat, clng) if location is not None else nan
            for location in block.locations
        ]
        values[:, _HOUR_IDX] = float(F.hour_of_week(now))
        any_missing, any_stale = missing_mask.any(axis=1), stale_mask.any(axis=1)
        named = self._named_features
        stale = [named(code) for code in (stale_mask @ self._feature_bits).tolist()]
        missing = [named(code) for code in (missing_mask @ self._feature_bits).tolist()]
        quality: list[QualityValue] = np.where(
            any_missing, MISSING, np.where(any_stale, STALE, COMPLETE)
        ).tolist()
        return _BatchRows(block, values, ages, present, stale_mask, missing_mask, stale, missing, quality)

    async def _score(
        self,
        context: Context,
        method: str,
        model: ServingModel,
        rows: _Rows | _BatchRows,
        degradation: DegradationValue | None,
    ) -> tuple[ServingModel, _Ranges, list[DegradationValue]]:
        """Score every row in one call (one row without numpy). If the model fails, the heuristic answers
        (if allowed), else the call is UNAVAILABLE with the reason."""
        degradations = [] if degradation is None else [degradation]
        started = time.perf_counter()
        span = (
            tracer.start_span(
                "model inference", attributes={"eta.model.version": model.version, "eta.rows": len(rows)}
            )
            if trace.get_current_span().is_recording()
            else None
        )
        try:
            result = _predict(model, rows)
        except Exception as exc:  # a broken model must not fail the call while a fallback exists
            heuristic = self._models.heuristic
            if heuristic is None or model is heuristic:
                log.exception("model failed", extra={"model_version": model.version})
                metrics.REJECTED.labels(method, "model_error").inc()
                await _abort(context, grpc.StatusCode.UNAVAILABLE, f"model {model.version} failed: {exc!r}")
            log.exception(
                "model failed; answering with the heuristic", extra={"model_version": model.version}
            )
            metrics.FALLBACKS.labels("model_error").inc(len(rows))
            if span is not None:
                span.record_exception(exc)
            model, result = heuristic, _predict(heuristic, rows)
        finally:
            if span is not None:
                span.end()
        metrics.STAGE_INFERENCE.observe(time.perf_counter() - started)
        if model.is_heuristic:
            degradations.append(Degradation.HEURISTIC_MODEL)
            self._heuristic_fallbacks.inc(len(rows))
        return model, result, degradations

    @staticmethod
    def _add_feature_values(reply: eta_pb2.PredictEtaResponse, model: ServingModel, rows: _Rows) -> None:
        """Row 0's model features as ``FeatureValue`` (same rules as ``eta_common.feature_proto``),
        encoded to wire bytes (:mod:`prediction.feature_wire`) and merged into the reply in one parse."""
        block = rows.block
        values, present, ages = rows.values[0], block.present[0], rows.ages[0]
        updated_row, event_row = block.updated_ms[0], block.event_ms[0]
        wire = _FEATURES_WIRE
        parts = [
            wire.online(
                name,
                values[column],
                present[column],
                ages[column],
                updated_row[column],
                event_row[column],
            )
            if name in _ONLINE_SET
            else wire.request_time(name, values[column])  # always present, age 0
            for name, column in zip(model.feature_names, model.columns, strict=True)
        ]
        reply.MergeFromString(b"".join(parts))

    def _account(
        self,
        model: ServingModel,
        rows: _Rows,
        points: list[float],
        lows: list[float],
        highs: list[float],
        request_id: str,
        now: int,
        customer_id: str = "",
        *,
        log: bool = True,
        market: str = "",
    ) -> None:
        """Metrics for every row (counters summed first: one ``inc`` per label and call, as each takes a
        lock), and the prediction log unless this call was not drawn (``log``)."""
        qualities = rows.quality
        for quality, counter in self._quality_counters.items():
            n = qualities.count(quality)
            if n:
                counter.inc(n)
        observed: list[list[float | None]] = []
        stale: Counter[str] = Counter()
        missing: Counter[str] = Counter()
        nan_to_none = _nan_to_none
        for ages, row_stale, row_missing in zip(rows.ages, rows.stale, rows.missing, strict=True):
            if row_stale:
                stale.update(row_stale)
            if not row_missing:
                observed.append([nan_to_none(ages[k]) for k in _ONLINE_IDX])
            else:  # a missing feature has no age to report
                missing.update(row_missing)
                observed.append(
                    [None if name in row_missing else nan_to_none(ages[k]) for name, k in _ONLINE_NAME_IDX]
                )
        for name, n in stale.items():
            self._stale_counters[name].inc(n)
        for name, n in missing.items():
            self._missing_counters[name].inc(n)
        metrics.FEATURE_AGE.observe_rows(observed)
        plog = self._log
        if plog is None or not log:
            return
        inputs = [[values[c] for c in model.columns] for values in rows.values]
        ranges = (points, lows, highs)
        _log_rows(plog, model, rows.block, inputs, qualities, ranges, request_id, now, customer_id, market)

    def _account_batch(
        self,
        model: ServingModel,
        rows: _BatchRows,
        points: list[float],
        lows: list[float],
        highs: list[float],
        request_id: str,
        now: int,
        customer_id: str,
        *,
        log: bool,
        market: str,
    ) -> None:
        """:meth:`_account` of a batch, column-wise: the same counters, ages and log rows."""
        qualities = rows.quality
        for quality, counter in self._quality_counters.items():
            n = qualities.count(quality)
            if n:
                counter.inc(n)
        for counters, mask in ((self._stale_list, rows.stale_mask), (self._missing_list, rows.missing_mask)):
            for counter, n in zip(counters, mask.sum(axis=0).tolist(), strict=True):
                if n:
                    counter.inc(n)
        # a missing feature has no age to report, nor has an unknown one (NaN)
        metrics.FEATURE_AGE.observe_array(rows.ages[:, _ONLINE_IDX], rows.present[:, _ONLINE_IDX])
        plog = self._log
        if plog is None or not log:
            return
        inputs = rows.values[:, model.columns].tolist()
        ranges = (points, lows, highs)
        _log_rows(plog, model, rows.block, inputs, qualities, ranges, request_id, now, customer_id, market)


def _log_rows(
    plog: PredictionLog,
    model: ServingModel,
    block: FeatureBlock | FeatureColumns,
    inputs: Sequence[Sequence[float]],
    qualities: Sequence[QualityValue],
    ranges: _Ranges,
    request_id: str,
    now: int,
    customer_id: str,
    market: str,
) -> None:
    """One prediction-log row per restaurant: the model's inputs (its column order) and the answer."""
    names, version, ids = model.feature_names, model.version, block.restaurant_ids
    points, lows, highs = ranges
    as_of = block.supply_as_of_ms or [math.nan] * len(qualities)
    for i, quality in enumerate(qualities):
        plog.add(
            LoggedPrediction(
                now,
                request_id,
                ids[i],
                version,
                points[i],
                lows[i],
                highs[i],
                _QUALITY_NAMES[quality],
                names,
                inputs[i],
                customer_id,
                as_of[i],
                market,
            )
        )


def _nan_to_none(x: float) -> float | None:
    return None if math.isnan(x) else x


def _predict(model: ServingModel, rows: _Rows | _BatchRows) -> _Ranges:
    if isinstance(rows, _BatchRows):
        point_b, low_b, high_b = model.predict(rows.values)
        return point_b.tolist(), low_b.tolist(), high_b.tolist()
    if len(rows) == 1:
        point, low, high = model.predict_one(rows.values[0])
        return [point], [low], [high]
    point_a, low_a, high_a = model.predict(np.array(rows.values, dtype=np.float64))
    return point_a.tolist(), low_a.tolist(), high_a.tolist()


async def _abort(context: Context, code: grpc.StatusCode, details: str) -> NoReturn:
    await context.abort(code, details)
    raise AssertionError("unreachable")  # abort raises
