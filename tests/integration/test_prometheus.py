"""The monitoring against the running services: their /metrics offer every metric the rules and the
dashboard name, and a real Prometheus (when installed) scrapes them, loads the rules and answers PromQL."""

from __future__ import annotations

import asyncio
import json
import math
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from pathlib import Path
from typing import Any

import grpc
import pytest

from devstack.infra import ChildProcess, start_prometheus
from devstack.stack import LocalStack
from eta.v1 import eta_pb2, eta_pb2_grpc, ingestion_pb2, ingestion_pb2_grpc
from tests.deploy.test_monitoring import (
    EXTERNAL_METRICS,
    dashboard_exprs,
    exposed_names,
    rule_groups,
    unexported,
)
from tests.integration.helpers import BERLIN, NEARBY, driver_online, new_id, placed

pytestmark = pytest.mark.integration
PROMETHEUS = shutil.which("prometheus")
NO_PROMETHEUS = "prometheus not installed (Debian/Ubuntu: apt-get install prometheus; .ci/run installs it)"
# Dashboard panels (title [refId]) that have data once events and predictions went through.
FED_BY_TRAFFIC = (
    "Serving model [A]",
    "Freshness p99 (ingest ack → visible) [A]",
    "Degraded predictions [A]",
    "Targets up [A]",
    "Freshness: ingestion ack → feature visible in Redis [B]",
    "Consumer backlog growth (accepted by ingestion − consumed by aggregators) [A]",
    "Records consumed by topic and outcome [A]",
    "Per hop, p99 [A]",
    "Per hop, p99 [B]",
    "Per hop, p99 [F]",
    "Per hop, p99 [G]",
    "Prediction calls/s by method and code [A]",
    "Ingestion events/s by status [A]",
    "Feature quality share [A]",
    "Restaurant reads: ready row vs exact fallback [A]",
    "Model version per replica [A]",
)
FRESHNESS_P99 = (
    "histogram_quantile(0.99, sum by (le) (rate(eta_aggregator_ingest_to_visible_seconds_bucket[30s])))"
)


@pytest.fixture(scope="module", autouse=True)
def _say_why_prometheus_test_skips() -> None:
    """`pytest -q` hides skip reasons; a warning shows up in its summary."""
    if PROMETHEUS is None:
        warnings.warn(f"tests/integration/test_prometheus.py: {NO_PROMETHEUS}", stacklevel=1)


def _get(url: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as response:  # http://127.0.0.1 only
        body: bytes = response.read()
    return body.decode()


def _scrape(stack: LocalStack, service: str) -> str:
    return _get(f"http://127.0.0.1:{stack.ports.metrics[service]}/metrics")


async def _traffic(channels: dict[str, grpc.aio.Channel], seconds: float) -> int:
    """Publishes small batches and asks for ETAs for ``seconds``; returns the events accepted."""
    ingest = ingestion_pb2_grpc.IngestionServiceStub(channels["ingestion"])
    eta = eta_pb2_grpc.EtaServiceStub(channels["prediction"])
    restaurant = new_id("rest")
    accepted = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        events = [placed(restaurant) for _ in range(5)] + [driver_online(new_id("drv"))]
        reply = await ingest.PublishEvents(ingestion_pb2.PublishEventsRequest(events=events), timeout=10)
        accepted += reply.accepted
        await eta.PredictEta(
            eta_pb2.PredictEtaRequest(
                restaurant_id=restaurant, restaurant_location=BERLIN, customer_location=NEARBY
            ),
            timeout=5,
        )
        await asyncio.sleep(0.2)
    return accepted


async def test_services_export_every_metric_the_rules_and_dashboard_name(
    stack: LocalStack, channels: dict[str, grpc.aio.Channel]
) -> None:
    assert await _traffic(channels, 1.0) > 0
    expositions = {
        service: await asyncio.to_thread(_scrape, stack, service) for service in stack.ports.metrics
    }
    for service, text in expositions.items():
        assert f"eta_{service}_" in text, service
    exposed = set().union(*(exposed_names(text) for text in expositions.values()))
    missing = unexported(exposed)
    assert missing == {}, (
        f"named by rules/dashboard, exported by no service (allow-listed: {EXTERNAL_METRICS})"
    )


def _query(prometheus: ChildProcess, promql: str) -> list[dict[str, Any]]:
    url = f"{prometheus.url}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    try:
        answer = json.loads(_get(url))
    except urllib.error.HTTPError as exc:  # 400 bad_data / 422 execution error, with the reason
        raise AssertionError(f"{promql}: HTTP {exc.code} {exc.read().decode()}") from exc
    assert answer["status"] == "success", answer
    result: list[dict[str, Any]] = answer["data"]["result"]
    return result


async def _poll(check: Any, *, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = await asyncio.to_thread(check)
        if last:
            return last
        await asyncio.sleep(1.0)
    raise AssertionError(f"{what} not seen within {timeout:.0f}s; last: {last!r}")


@pytest.mark.skipif(PROMETHEUS is None, reason=NO_PROMETHEUS)
async def test_prometheus_scrapes_the_services_and_answers_the_freshness_quantile(
    stack: LocalStack, channels: dict[str, grpc.aio.Channel], tmp_path: Path
) -> None:
    targets = {f"eta-{name}": port for name, port in stack.ports.metrics.items()}
    prometheus = await asyncio.to_thread(
        start_prometheus, tmp_path / "prometheus", tmp_path / "logs", targets, scrape_seconds=1.0
    )
    try:

        def targets_up() -> bool:
            answer = json.loads(_get(f"{prometheus.url}/api/v1/targets"))["data"]["activeTargets"]
            return {t["labels"]["job"] for t in answer if t["health"] == "up"} == set(targets)

        await _poll(targets_up, timeout=30, what="all three targets up")
        traffic = asyncio.create_task(_traffic(channels, 12.0))

        def freshness() -> float | None:
            result = _query(prometheus, FRESHNESS_P99)
            value = float(result[0]["value"][1]) if result else math.nan
            return value if math.isfinite(value) else None

        p99 = await _poll(freshness, timeout=45, what="a finite freshness p99")
        assert 0 < p99 < 60

        # the recording rule from deploy/monitoring/rules.yaml, evaluated by this Prometheus (NaN while the
        # 5-minute window holds only scrapes from before the traffic)
        def recorded() -> float | None:
            result = _query(prometheus, "eta:freshness_seconds:p99_5m")
            value = float(result[0]["value"][1]) if result else math.nan
            return value if math.isfinite(value) else None

        assert 0 < await _poll(recorded, timeout=30, what="the recorded freshness p99") < 60
        assert await traffic > 0

        rules = json.loads(_get(f"{prometheus.url}/api/v1/rules"))["data"]["groups"]
        assert sorted(g["name"] for g in rules) == sorted(g["name"] for g in rule_groups())
        assert all(r["health"] == "ok" for g in rules for r in g["rules"]), rules
        # Every dashboard query evaluates without error (vector matching is only checked at evaluation),
        # and the panels the traffic above feeds show data.
        answered = {title: bool(_query(prometheus, expr)) for title, expr in dashboard_exprs().items()}
        for title in FED_BY_TRAFFIC:
            assert answered[title], f"no data for {title!r} ({dashboard_exprs()[title]})"
        # up is 1 for each service: the availability alert stays quiet
        up = _query(prometheus, 'up{job=~".*(ingestion|aggregator|prediction).*"}')
        assert sorted(float(s["value"][1]) for s in up) == [1.0, 1.0, 1.0]
    finally:
        await asyncio.to_thread(prometheus.stop)
