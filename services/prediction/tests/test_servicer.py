"""EtaServicer logic without a network: provenance per feature, staleness by per-feature budgets, missing
values, deadlines, degradations, the batch layout and what goes to the prediction log."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import Any, cast

import grpc
import numpy as np
import pytest

from eta.v1 import eta_pb2, events_pb2
from eta_common import features as F
from eta_common.feature_block import FeatureBlock, FeatureColumns
from eta_common.feature_proto import to_feature_value
from eta_common.online_store import FeatureReading, RestaurantFeatures
from eta_common.tests.servicer_context import Aborted, Context
from prediction.config import DEFAULT_STALENESS_BUDGETS, ONLINE_FEATURES
from prediction.inference import Array, ServingModel
from prediction.models import ModelHolder, load_model
from prediction.prediction_log import LoggedPrediction, PredictionLog
from prediction.reader import FeatureReader, default_features
from prediction.server import EtaServicer, RequestIds
from prediction.tests.support import synthetic_bundle

Quality = eta_pb2.PredictEtaResponse.FeatureQuality
Degradation = eta_pb2.Degradation
NOW = 1_800_000_000_000
RESTAURANT = events_pb2.GeoPoint(lat=52.52, lng=13.40)
CUSTOMER = events_pb2.GeoPoint(lat=52.54, lng=13.43)
BUDGETS = {name: DEFAULT_STALENESS_BUDGETS.get(name, 300.0) for name in ONLINE_FEATURES}


def fresh(age_s: float = 2.0, **values: float) -> dict[str, FeatureReading]:
    updated = NOW - int(age_s * 1000)
    readings = {}
    for name in ONLINE_FEATURES:
        value = values.get(name, 3.0)
        readings[name] = FeatureReading(name, value, not math.isnan(value), updated, updated - 500)
    return readings


class Reader:
    """Stands in for FeatureReader: answers from prepared readings."""

    def __init__(self) -> None:
        self.readings: dict[str, dict[str, FeatureReading]] = {}
        self.degradation: Any = None
        self.budgets: list[float | None] = []
        self.customers: list[str] = []
        self.markets: list[str] = []
        self.current_ms = math.nan

    async def read(
        self,
        requests: Sequence[tuple[str, tuple[float, float]]],
        *,
        now_ms: int,
        budget_seconds: float | None,
        customer_id: str = "",
        market: str = "",
    ) -> tuple[FeatureBlock, Any]:
        self.budgets.append(budget_seconds)
        self.customers.append(customer_id)
        self.markets.append(market)
        if self.degradation is not None:
            return FeatureBlock.from_features(
                [default_features(rid, loc, NOW) for rid, loc in requests]
            ), self.degradation
        block = FeatureBlock.from_features(
            [
                RestaurantFeatures(rid, NOW, dict(self.readings.get(rid, fresh())), loc)
                for rid, loc in requests
            ]
        )
        block.current_ms = self.current_ms
        return block, None

    async def read_columns(self, requests: Any, **kwargs: Any) -> tuple[FeatureColumns, Any]:
        block, degradation = await self.read(requests, **kwargs)
        return FeatureColumns.of_block(block), degradation


class Log:
    def __init__(self) -> None:
        self.rows: list[LoggedPrediction] = []

    def add(self, row: LoggedPrediction) -> None:
        self.rows.append(row)

    def __len__(self) -> int:
        return len(self.rows)


@pytest.fixture(scope="module")
def model() -> ServingModel:
    return load_model("v-test", synthetic_bundle(rows=1500, rounds=25))


@pytest.fixture(autouse=True)
def frozen_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("prediction.server.now_ms", lambda: NOW)


def make(
    model: ServingModel | None, *, heuristic: bool = True, max_batch: int = 100
) -> tuple[EtaServicer, Reader, Log]:
    reader, log = Reader(), Log()
    holder = ModelHolder(heuristic_fallback=heuristic)
    if model is not None:
        holder.install(model)
    servicer = EtaServicer(
        cast(FeatureReader, reader),
        holder,
        budgets=BUDGETS,
        max_batch=max_batch,
        prediction_log=cast(PredictionLog, log),
        request_ids=RequestIds("t-"),
    )
    return servicer, reader, log


def single(restaurant_id: str = "r1", request_id: str = "") -> eta_pb2.PredictEtaRequest:
    return eta_pb2.PredictEtaRequest(
        restaurant_id=restaurant_id,
        restaurant_location=RESTAURANT,
        customer_location=CUSTOMER,
        request_id=request_id,
    )


def canonical_row(reply: eta_pb2.PredictEtaResponse) -> Array:
    values = {f.name: (f.value if f.present else F.DEFAULTS.get(f.name, f.value)) for f in reply.features}
    return np.array([[values[name] for name in F.FEATURE_NAMES]])


async def test_complete_answer_carries_range_version_and_every_feature_with_its_age(
    model: ServingModel,
) -> None:
    servicer, reader, log = make(model)
    reader.readings["r1"] = fresh(age_s=2.0)
    reply = await servicer.PredictEta(single(request_id="order-7"), Context())
    assert reply.model_version == "v-test"
    assert reply.feature_quality == Quality.COMPLETE
    assert (list(reply.stale_features), list(reply.missing_features), list(reply.degradations)) == (
        [],
        [],
        [],
    )
    assert reply.eta_low_minutes <= reply.eta_minutes <= reply.eta_high_minutes
    assert [f.name for f in reply.features] == list(model.feature_names)
    for feature in reply.features:
        if feature.name in ONLINE_FEATURES:  # same message the FeatureService API gives
            assert feature == to_feature_value(reader.readings["r1"][feature.name], NOW)
            assert feature.age_seconds == pytest.approx(2.0)
        else:
            assert feature.present
            assert feature.age_seconds == 0
    distance = next(f.value for f in reply.features if f.name == F.DISTANCE_KM)
    assert distance == pytest.approx(F.haversine_km(52.52, 13.40, 52.54, 13.43))
    # the numbers are the model's, on exactly the features returned
    point, low, high = model.predict(canonical_row(reply))
    assert (reply.eta_minutes, reply.eta_low_minutes, reply.eta_high_minutes) == (point[0], low[0], high[0])
    assert reply.request_id == "order-7"
    assert [(r.request_id, r.restaurant_id, r.model_version, r.quality) for r in log.rows] == [
        ("order-7", "r1", "v-test", "COMPLETE")
    ]


async def test_staleness_is_judged_per_feature_budget(model: ServingModel) -> None:
    servicer, reader, _ = make(model)
    # 700 s old: over the 10-minute window's budget (600 s), within the 30-minute window's (1800 s)
    reader.readings["r1"] = fresh(age_s=700.0)
    reply = await servicer.PredictEta(single(), Context())
    assert reply.feature_quality == Quality.STALE
    assert set(reply.stale_features) == {
        "num_orders_last_10_min",
        "orders_in_kitchen",
        "free_drivers_within_3km",
    }
    assert "num_orders_last_30_min" not in reply.stale_features


async def test_missing_features_use_their_default_and_are_named(model: ServingModel) -> None:
    servicer, reader, log = make(model)
    reader.readings["r1"] = fresh(**{F.MEAN_PREP_MINUTES_60.name: math.nan})
    reply = await servicer.PredictEta(single(), Context())
    assert reply.feature_quality == Quality.MISSING
    assert list(reply.missing_features) == [F.MEAN_PREP_MINUTES_60.name]
    prep = next(f for f in reply.features if f.name == F.MEAN_PREP_MINUTES_60.name)
    assert (prep.present, prep.value) == (False, 0.0)
    logged = dict(zip(log.rows[0].names, log.rows[0].values, strict=True))
    assert math.isnan(logged[F.MEAN_PREP_MINUTES_60.name])  # the model saw NaN (its missing value)


async def test_online_store_failure_is_an_answer_flagged_degraded(model: ServingModel) -> None:
    servicer, reader, _ = make(model)
    reader.degradation = Degradation.ONLINE_STORE_UNAVAILABLE
    reply = await servicer.PredictEta(single(), Context())
    assert list(reply.degradations) == [Degradation.ONLINE_STORE_UNAVAILABLE]
    assert reply.feature_quality == Quality.MISSING
    assert set(reply.missing_features) == set(ONLINE_FEATURES)
    assert reply.eta_minutes > 0


async def test_without_a_registry_model_the_heuristic_answers_and_says_so() -> None:
    servicer, _, _ = make(None)
    reply = await servicer.PredictEta(single(), Context())
    assert reply.model_version == "heuristic-v0"
    assert list(reply.degradations) == [Degradation.HEURISTIC_MODEL]
    assert servicer.can_answer()


async def test_with_no_model_and_no_heuristic_the_call_is_unavailable_with_a_reason() -> None:
    servicer, _, _ = make(None, heuristic=False)
    assert not servicer.can_answer()
    context = Context()
    with pytest.raises(Aborted):
        await servicer.PredictEta(single(), context)
    assert context.code == grpc.StatusCode.UNAVAILABLE
    assert "PREDICTION_HEURISTIC_FALLBACK" in context.details


class Broken(ServingModel):
    version = "v-broken"
    feature_names = tuple(F.FEATURE_NAMES)
    columns = list(range(len(F.FEATURE_NAMES)))

    def predict(self, rows: Array) -> tuple[Array, Array, Array]:
        raise RuntimeError("corrupt trees")


async def test_a_failing_model_falls_back_to_the_heuristic_or_is_unavailable() -> None:
    servicer, _, _ = make(Broken())
    reply = await servicer.PredictEta(single(), Context())
    assert reply.model_version == "heuristic-v0"
    assert Degradation.HEURISTIC_MODEL in reply.degradations
    strict, _, _ = make(Broken(), heuristic=False)
    context = Context()
    with pytest.raises(Aborted):
        await strict.PredictEta(single(), context)
    assert context.code == grpc.StatusCode.UNAVAILABLE
    assert "corrupt trees" in context.details


async def test_deadlines_bound_the_feature_read_and_too_short_ones_are_refused(model: ServingModel) -> None:
    servicer, reader, _ = make(model)
    await servicer.PredictEta(single(), Context(remaining=None))
    await servicer.PredictEta(single(), Context(remaining=0.5))
    assert reader.budgets[0] is None
    assert reader.budgets[1] == pytest.approx(0.5 - 0.002 - 0.00005)
    context = Context(remaining=0.001)
    with pytest.raises(Aborted):
        await servicer.PredictEta(single(), context)
    assert context.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert len(reader.budgets) == 2  # refused before touching Redis


async def test_invalid_requests_name_every_bad_field(model: ServingModel) -> None:
    servicer, _, _ = make(model)
    context = Context()
    request = eta_pb2.PredictEtaRequest(customer_location=events_pb2.GeoPoint(lat=95, lng=0))
    with pytest.raises(Aborted):
        await servicer.PredictEta(request, context)
    assert context.code == grpc.StatusCode.INVALID_ARGUMENT
    for field in ("restaurant_id", "restaurant_location", "customer_location.lat"):
        assert field in context.details


def batch(n: int, request_id: str = "") -> eta_pb2.PredictEtaBatchRequest:
    return eta_pb2.PredictEtaBatchRequest(
        customer_location=CUSTOMER,
        restaurants=[
            eta_pb2.RestaurantLocation(
                restaurant_id=f"r{i}", location=events_pb2.GeoPoint(lat=52.50 + i / 1000, lng=13.40)
            )
            for i in range(n)
        ],
        request_id=request_id,
    )


async def test_batch_answers_every_restaurant_in_order_with_aligned_columns(model: ServingModel) -> None:
    servicer, reader, log = make(model)
    for i in range(30):
        reader.readings[f"r{i}"] = fresh(age_s=1.0, orders_in_kitchen=float(i))
    reader.readings["r3"] = fresh(age_s=4000.0)  # stale but for the day-long mean
    reply = await servicer.PredictEtaBatch(batch(30), Context(remaining=2.0))
    assert [e.restaurant_id for e in reply.etas] == [f"r{i}" for i in range(30)]
    assert list(reply.feature_names) == list(model.feature_names)
    assert reply.model_version == "v-test"
    kitchen = list(reply.feature_names).index(F.ORDERS_IN_KITCHEN)
    assert [e.feature_values[kitchen] for e in reply.etas if e.restaurant_id != "r3"] == [
        float(i) for i in range(30) if i != 3
    ]
    assert reply.etas[0].feature_ages_seconds[kitchen] == pytest.approx(1.0)
    assert reply.etas[3].feature_quality == Quality.STALE
    assert set(reply.etas[3].stale_features) == {name for name in ONLINE_FEATURES if BUDGETS[name] < 4000}
    assert all(e.feature_quality == Quality.COMPLETE for i, e in enumerate(reply.etas) if i != 3)
    # the same numbers as single calls would give
    single_reply = await servicer.PredictEta(
        eta_pb2.PredictEtaRequest(
            restaurant_id="r5",
            restaurant_location=batch(30).restaurants[5].location,
            customer_location=CUSTOMER,
        ),
        Context(),
    )
    assert reply.etas[5].eta_minutes == single_reply.eta_minutes
    # one logged row per restaurant, sharing the (generated) request id
    batch_rows = log.rows[:30]
    assert {r.request_id for r in batch_rows} == {reply.request_id}
    assert reply.request_id.startswith("t-")
    assert [r.restaurant_id for r in batch_rows] == [f"r{i}" for i in range(30)]


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (batch(0), "restaurants"),
        (batch(11), "restaurants"),
        (eta_pb2.PredictEtaBatchRequest(restaurants=batch(2).restaurants), "customer_location"),
    ],
)
async def test_bad_batches_are_refused(
    model: ServingModel, request_: eta_pb2.PredictEtaBatchRequest, field: str
) -> None:
    servicer, _, _ = make(model, max_batch=10)
    context = Context()
    with pytest.raises(Aborted):
        await servicer.PredictEtaBatch(request_, context)
    assert context.code == grpc.StatusCode.INVALID_ARGUMENT
    assert field in context.details


async def test_a_bad_restaurant_in_a_batch_is_pointed_at(model: ServingModel) -> None:
    servicer, _, _ = make(model)
    request = batch(3)
    request.restaurants[1].location.lng = 200
    request.restaurants[2].restaurant_id = ""
    context = Context()
    with pytest.raises(Aborted):
        await servicer.PredictEtaBatch(request, context)
    assert "restaurants[1].location.lng" in context.details
    assert "restaurants[2].restaurant_id" in context.details


async def test_the_customer_reaches_the_read_and_the_log(model: ServingModel) -> None:
    servicer, reader, log = make(model)
    reader.readings["r1"] = fresh()
    request = single(request_id="order-9")
    request.customer_id = "cust-00042"
    await servicer.PredictEta(request, Context())
    batch = eta_pb2.PredictEtaBatchRequest(
        customer_location=CUSTOMER,
        restaurants=[eta_pb2.RestaurantLocation(restaurant_id="r1", location=RESTAURANT)],
        customer_id="cust-00042",
    )
    await servicer.PredictEtaBatch(batch, Context())
    await servicer.PredictEta(single(), Context())  # no customer: none is invented
    assert reader.customers == ["cust-00042", "cust-00042", ""]
    assert [row.customer_id for row in log.rows] == ["cust-00042", "cust-00042", ""]


@pytest.mark.parametrize(
    ("share", "some", "every"), [(0.0, False, False), (0.5, True, False), (1.0, True, True)]
)
async def test_feed_rows_are_logged_for_the_drawn_share_of_calls_and_checkouts_always(
    model: ServingModel, share: float, some: bool, every: bool
) -> None:
    """PREDICTION_LOG_FEED_SAMPLE: a feed (PredictEtaBatch) call logs all its rows or none, drawn per call;
    a checkout (PredictEta) is always logged."""
    servicer, reader, log = make(model)
    servicer._feed_log_sample = share
    for rid in ("a", "b", "c"):
        reader.readings[rid] = fresh()
    request = eta_pb2.PredictEtaBatchRequest(
        customer_location=CUSTOMER,
        restaurants=[eta_pb2.RestaurantLocation(restaurant_id=r, location=RESTAURANT) for r in "abc"],
    )
    for _ in range(40):
        await servicer.PredictEtaBatch(request, cast(Any, Context()))
    logged = len(log)
    assert logged % 3 == 0  # whole calls
    assert (logged > 0) == some
    assert (logged == 120) == every
    reader.readings["r1"] = fresh()
    await servicer.PredictEta(single(), cast(Any, Context()))
    assert len(log) == logged + 1


async def test_read_and_log_in_the_requests_market_or_the_default_one(model: ServingModel) -> None:
    from eta_common.markets import DEFAULT_MARKET

    servicer, reader, log = make(model)
    reader.readings["r1"] = fresh()
    await servicer.PredictEta(single(), cast(Any, Context()))
    named = single()
    named.market_id = "munich"
    await servicer.PredictEta(named, cast(Any, Context()))
    assert reader.markets == [DEFAULT_MARKET, "munich"]
    assert [row.market for row in log.rows] == [DEFAULT_MARKET, "munich"]


async def test_an_unchanged_stream_fed_feature_is_as_old_as_the_last_catch_up(model: ServingModel) -> None:
    """A quiet restaurant's counts last changed hours ago but are exact as of the last time every
    aggregator was caught up: their age is measured from then (not stale); the supply count and the
    customer features keep their own times."""
    servicer, reader, _log = make(model)
    reader.readings["r1"] = fresh(age_s=5 * 3600)
    reader.current_ms = float(NOW - 2_000)
    reply = await servicer.PredictEta(single(), cast(Any, Context()))
    ages = {f.name: f.age_seconds for f in reply.features}
    assert ages[F.NUM_ORDERS_10.name] == 2.0
    assert ages[F.KITCHEN_BUSY] == 2.0
    assert ages[F.FREE_DRIVERS_NEARBY] == 5 * 3600
    assert F.FREE_DRIVERS_NEARBY in reply.stale_features
    assert F.NUM_ORDERS_10.name not in reply.stale_features
    reader.current_ms = math.nan  # unknown: measured from the last change, as before
    reply = await servicer.PredictEta(single(), cast(Any, Context()))
    assert F.NUM_ORDERS_10.name in reply.stale_features


def _random_block(rng: np.random.Generator, n: int, current_ms: float) -> FeatureBlock:
    """Rows with every case the row rules know: fresh, stale, unknown age, not present, NaN values, a
    restaurant without a location."""
    k = len(F.FEATURE_NAMES)
    values = rng.uniform(0, 40, (n, k))
    values[rng.random((n, k)) < 0.1] = math.nan
    present = rng.random((n, k)) > 0.03
    ages_s = rng.choice([0.0, 1.0, 59.0, 61.0, 599.0, 601.0, 1799.0, 1801.0, 4000.0, 90_000.0], (n, k))
    updated = NOW - ages_s * 1000.0
    updated[rng.random((n, k)) < 0.1] = math.nan
    updated[0, :] = NOW + 5_000.0  # a clock a little ahead: age 0, not negative
    locations: list[tuple[float, float] | None] = [
        (52.5 + rng.uniform(-0.05, 0.05), 13.4 + rng.uniform(-0.05, 0.05)) for _ in range(n)
    ]
    locations[1] = None
    block = FeatureBlock(
        [f"r{i}" for i in range(n)],
        locations,
        NOW,
        values.tolist(),
        present.tolist(),
        updated.tolist(),
        (updated - 500.0).tolist(),
        [(None,) * k] * n,
    )
    block.current_ms = current_ms
    return block


@pytest.mark.parametrize("current_ms", [math.nan, float(NOW - 30_000)])
async def test_the_batch_path_computes_what_the_row_by_row_path_does(
    model: ServingModel, current_ms: float
) -> None:
    """PredictEtaBatch works column-wise (arrays), PredictEta row by row: the same values, ages, stale
    and missing features, quality and feature-age observations, to the bit."""
    from prediction.metrics import FeatureAgeHistogram

    servicer, _, _ = make(model)
    rng = np.random.default_rng(5)
    for _ in range(5):
        block = _random_block(rng, 40, current_ms)
        batch = servicer._batch_rows(FeatureColumns.of_block(block), (52.54, 13.43), NOW)
        rows = servicer._rows(block, (52.54, 13.43), NOW)
        np.testing.assert_array_equal(batch.values, np.array(rows.values))
        np.testing.assert_array_equal(batch.ages, np.array(rows.ages))
        assert (batch.stale, batch.missing, batch.quality) == (rows.stale, rows.missing, rows.quality)
        assert {Quality.STALE, Quality.MISSING} <= set(batch.quality)
        for lists, mask in ((rows.stale, batch.stale_mask), (rows.missing, batch.missing_mask)):
            counted = dict(zip(ONLINE_FEATURES, mask.sum(axis=0).tolist(), strict=True))  # the metrics
            assert {k: v for k, v in counted.items() if v} == Counter(n for names in lists for n in names)
        one = FeatureAgeHistogram("a", "a", ONLINE_FEATURES, (0.1, 60, 600), registry=None)
        other = FeatureAgeHistogram("b", "b", ONLINE_FEATURES, (0.1, 60, 600), registry=None)
        online = [F.FEATURE_NAMES.index(name) for name in ONLINE_FEATURES]
        one.observe_rows(
            [
                [
                    None if name in missing or math.isnan(ages[k]) else ages[k]
                    for name, k in zip(ONLINE_FEATURES, online, strict=True)
                ]
                for ages, missing in zip(rows.ages, rows.missing, strict=True)
            ]
        )
        other.observe_array(batch.ages[:, online], batch.present[:, online])
        assert one._counts == other._counts
        assert other._sums == pytest.approx(one._sums)
