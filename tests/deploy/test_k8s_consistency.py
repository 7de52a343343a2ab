"""The chart agrees with the code: ports, entrypoints and every environment variable name it sets."""

from __future__ import annotations

import ast
import re
import tomllib
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk import environment_variables as otel_sdk_env

Render = Callable[..., dict[str, Any]]
Workloads = Callable[[list[dict[str, Any]]], list[dict[str, Any]]]

REPO_ROOT = Path(__file__).resolve().parents[2]
SERVICES = REPO_ROOT / "services"
# The contract between the code and the deployment (see docs/kubernetes.md).
CONTRACT_PORTS = {
    "ingestion": (50051, 9101),
    "aggregator": (50052, 9102),
    "prediction": (50053, 9103),
}
ENTRYPOINTS = {
    "eta-ingestion",
    "eta-aggregator",
    "eta-prediction",
    "eta-migrate",
    "eta-trainer",
    "eta-simulator",
}
# Set only to be expanded as $(NAME) into another variable of the same container (downward API).
DOWNWARD_API_ONLY = {"K8S_POD_NAME", "K8S_NAMESPACE"}


@cache
def _python_sources(package: str | None = None) -> str:
    """All hand-written Python under services/ (or one package of it); generated code excluded."""
    root = SERVICES / package if package else SERVICES
    files = [p for p in sorted(root.rglob("*.py")) if "eta" not in p.relative_to(SERVICES).parts[:1]]
    return "\n".join(p.read_text(encoding="utf-8") for p in files)


def _code_reads(name: str, package: str | None = None) -> bool:
    return re.search(rf"""["']{re.escape(name)}["']""", _python_sources(package)) is not None


def _module_int_constant(path: Path, name: str) -> int:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target, value = node.targets[0], node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            target, value = node.target, node.value
        else:
            continue
        if isinstance(target, ast.Name) and target.id == name:
            assert isinstance(value, ast.Constant)
            assert isinstance(value.value, int)
            return value.value
    raise AssertionError(f"{name} not found in {path}")


def _our_containers(
    rendered: dict[str, Any], workloads_of: Workloads
) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    repo = rendered["values"]["image"]["repository"]
    return [
        (w, c)
        for w in workloads_of(rendered["manifests"])
        for c in w["containers"]
        if c["image"].startswith(f"{repo}:") and not c["_init"]
    ]


def _env_names(container: dict[str, Any], manifests: list[dict[str, Any]]) -> dict[str, str]:
    """Every variable a container gets -> its literal value (or "" when from a reference)."""
    configmaps = {m["metadata"]["name"]: m["data"] for m in manifests if m["kind"] == "ConfigMap"}
    names: dict[str, str] = {}
    for source in container.get("envFrom", []):
        names.update(configmaps[source["configMapRef"]["name"]])
    for env in container.get("env", []):
        names[env["name"]] = env.get("value", "")
    return names


# ------------------------------------------------------------------------------------------ ports ---


@pytest.mark.parametrize("component", sorted(CONTRACT_PORTS))
def test_ports_match_the_contract_and_the_code_defaults(
    render: Render, value_set: str, component: str
) -> None:
    grpc_port, metrics_port = CONTRACT_PORTS[component]
    values = render(value_set)["values"]["components"][component]
    assert (values["grpcPort"], values["metricsPort"]) == (grpc_port, metrics_port)
    config = SERVICES / component / "config.py"
    assert _module_int_constant(config, "DEFAULT_GRPC_PORT") == grpc_port
    assert _module_int_constant(config, "DEFAULT_METRICS_PORT") == metrics_port
    manifests = render(value_set)["manifests"]
    svc = next(
        m
        for m in manifests
        if m["kind"] == "Service" and m["metadata"]["name"] == f"eta-platform-{component}"
    )
    assert {p["name"]: p["port"] for p in svc["spec"]["ports"]} == {
        "grpc": grpc_port,
        "metrics": metrics_port,
    }
    deployment = next(
        m
        for m in manifests
        if m["kind"] == "Deployment" and m["metadata"]["name"] == f"eta-platform-{component}"
    )
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["GRPC_PORT"] == str(grpc_port)
    assert env["METRICS_PORT"] == str(metrics_port)


# ------------------------------------------------------------------------------------ entrypoints ---


def test_chart_commands_are_console_scripts(render: Render, workloads_of: Workloads) -> None:
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    scripts = set(pyproject["project"]["scripts"])
    assert scripts >= ENTRYPOINTS
    everything = {
        "trainer": {"cronJob": {"enabled": True}, "trainOnInstall": {"enabled": True}},
        "simulator": {"live": {"enabled": True}, "seed": {"enabled": True}},
    }
    used: set[str] = set()
    for value_set in ("default", "dev", "production"):
        rendered = render(value_set, everything)
        for _, container in _our_containers(rendered, workloads_of):
            used.add(container["command"][0])
    assert used == ENTRYPOINTS


def test_each_component_runs_its_own_entrypoint_and_service_name(render: Render) -> None:
    for name in CONTRACT_PORTS:
        deployment = next(
            m
            for m in render("default")["manifests"]
            if m["kind"] == "Deployment" and m["metadata"]["name"] == f"eta-platform-{name}"
        )
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        assert container["command"] == [f"eta-{name}"]
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["OTEL_SERVICE_NAME"] == f"eta-{name}"


# -------------------------------------------------------------------------------------- env names ---


def test_services_directory_has_code_to_check_against() -> None:
    assert (SERVICES / "eta_common" / "config.py").is_file(), "the env-var checks below need the service code"


def test_every_env_var_the_chart_sets_is_read_by_the_code(
    rendered: dict[str, Any], workloads_of: Workloads
) -> None:
    """No drift between the names Helm sets and the names Python reads (services/ or the OTel SDK)."""
    sdk_vars = {name for name in dir(otel_sdk_env) if name.startswith("OTEL_")}
    pairs = _our_containers(rendered, workloads_of)
    assert pairs
    unknown: set[str] = set()
    for workload, container in pairs:
        env = _env_names(container, rendered["manifests"])
        for name in env:
            if name in DOWNWARD_API_ONLY:
                assert any(f"$({name})" in value for value in env.values()), (
                    f"{name} is set but never expanded"
                )
            elif not (_code_reads(name) or name in sdk_vars):
                unknown.add(f"{workload['name']}: {name}")
    assert not unknown, f"set by the chart but read nowhere in services/: {sorted(unknown)}"


@pytest.mark.parametrize("component", sorted(CONTRACT_PORTS))
def test_component_specific_env_is_read_by_that_component(render: Render, component: str) -> None:
    values = render("default")["values"]["components"][component]
    assert values["env"], component
    for name in values["env"]:
        assert _code_reads(name, component), f"{name} is not read in services/{component}/"


@pytest.mark.parametrize("component", sorted(CONTRACT_PORTS))
def test_database_url_goes_only_where_the_code_uses_the_database(render: Render, component: str) -> None:
    values = render("default")["values"]["components"][component]
    sources = _python_sources(component)
    uses_database = "DatabaseSettings" in sources or _code_reads("DATABASE_URL", component)
    assert values["database"] is uses_database, (
        f"components.{component}.database={values['database']} but the code "
        f"{'does' if uses_database else 'does not'} read DATABASE_URL"
    )


def test_topic_names_match_the_code(render: Render) -> None:
    values = render("default")["values"]["kafka"]
    assert values["topicPrefix"] == "eta."
    kafka_module = _python_sources("eta_common")
    for topic in values["topics"]:
        assert topic in kafka_module, f"topic {topic!r} not named in services/eta_common"


def test_trainer_env_and_flags_are_known_to_the_trainer(render: Render, workloads_of: Workloads) -> None:
    values = render("dev")["values"]["trainer"]
    for name in values["env"]:
        assert _code_reads(name, "trainer"), f"{name} is not read in services/trainer/"
    for flag in values["trainOnInstall"]["args"] + values["cronJob"]["args"]:
        if flag.startswith("--"):
            assert _code_reads(flag, "trainer"), f"eta-trainer has no {flag} option"
    job = next(w for w in workloads_of(render("dev")["manifests"]) if w["name"] == "eta-platform-train-once")
    env = {e["name"]: e.get("value") for e in job["containers"][0]["env"]}
    assert env["TRAINER_HISTORY_DAYS"] == values["env"]["TRAINER_HISTORY_DAYS"]
    assert env["KAFKA_BOOTSTRAP_SERVERS"]  # batch pods get the shared configuration inline
