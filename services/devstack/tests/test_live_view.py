"""The live view's warning for a dispatch backlog that keeps growing, and its notice line."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from devstack import live_view
from devstack.live_view import BacklogTrend, LiveView, Restaurant
from eta.v1 import eta_pb2, eta_pb2_grpc, features_pb2
from eta_common import features as F


def _feed(trend: BacklogTrend, values: list[float], every_s: float = 3.0) -> None:
    for i, value in enumerate(values):
        trend.add(i * every_s, value)


def test_a_steadily_growing_backlog_warns() -> None:
    trend = BacklogTrend()
    _feed(trend, [10 + 0.1 * i for i in range(60)])  # +2/min over 3 min
    warning = trend.warning()
    assert warning is not None
    assert (
        "dispatch backlog keeps growing: 10 → 16 orders waiting for a driver in 3 min (+2.0/min)" in warning
    )


@pytest.mark.parametrize(
    "values",
    [
        [5.0] * 80,  # steady
        [3.0, 4.0, 2.0, 5.0, 3.0, 6.0, 2.0, 4.0] * 10,  # noisy, no trend
        [10 + 0.1 * i for i in range(30)],  # growing, but only for 90 s so far
        [10 + 0.01 * i for i in range(100)],  # creeping (+0.2/min)
        [10 + 0.2 * i for i in range(50)] + [20 - 0.3 * i for i in range(30)],  # a peak that passed
    ],
)
def test_no_warning_without_a_sustained_rise(values: list[float]) -> None:
    trend = BacklogTrend()
    _feed(trend, values)
    assert trend.warning() is None


def test_only_the_window_counts_and_unknown_values_are_skipped() -> None:
    trend = BacklogTrend(window_s=120.0, min_span_s=60.0)
    _feed(trend, [100 - i for i in range(60)] + [float("nan")] * 5)  # falling, then unknown
    assert trend.warning() is None
    for i in range(60):  # then 3 min of growth: the fall has left the 2-min window
        trend.add(200 + i * 3.0, 40 + i * 0.2)
    assert trend.warning() is not None


class Fake(eta_pb2_grpc.EtaServiceServicer):
    def __init__(self) -> None:
        self.backlog = 0.0

    async def PredictEta(
        self, request: eta_pb2.PredictEtaRequest, context: Any
    ) -> eta_pb2.PredictEtaResponse:
        return eta_pb2.PredictEtaResponse(
            restaurant_id=request.restaurant_id,
            eta_minutes=30.0,
            eta_low_minutes=20.0,
            eta_high_minutes=45.0,
            model_version="heuristic-v0",
            features=[
                features_pb2.FeatureValue(name=F.ORDERS_WAITING_FOR_DRIVER, value=self.backlog, present=True)
            ],
        )

    async def PredictEtaBatch(
        self, request: eta_pb2.PredictEtaBatchRequest, context: Any
    ) -> eta_pb2.PredictEtaBatchResponse:
        return eta_pb2.PredictEtaBatchResponse()


@pytest.fixture
async def target() -> AsyncIterator[tuple[str, Fake]]:
    fake = Fake()
    server = grpc.aio.server()
    eta_pb2_grpc.add_EtaServiceServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}", fake
    finally:
        await server.stop(0)


async def test_the_view_shows_the_notice_and_warns_on_a_growing_backlog(
    target: tuple[str, Fake], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def restaurants(_url: str, _limit: int) -> list[Restaurant]:
        return [Restaurant("rst-000", 52.52, 13.40), Restaurant("rst-001", 52.53, 13.41)]

    async def customer(_url: str) -> str:
        return "cust-00001"

    monkeypatch.setattr(live_view, "discover_restaurants", restaurants)
    monkeypatch.setattr(live_view, "discover_customer", customer)
    address, fake = target
    now = {"t": 0.0}
    notice = "model not promoted (fails the promotion gate: …): the heuristic answers"
    view = LiveView(address, "redis://unused", tmp_path, notice=notice, clock=lambda: now["t"])
    try:
        screen = await view.render("header")
        assert screen.splitlines()[:2] == ["header | model heuristic-v0", notice]
        assert "dispatch backlog" not in screen
        for step in range(1, 80):  # 3-second refreshes, the backlog +1 every 30 s
            now["t"] = step * 3.0
            fake.backlog = step // 10
            screen = await view.render("header")
        assert "WARNING: the city's dispatch backlog keeps growing: 0 → 7 orders" in screen
    finally:
        await view.close()
