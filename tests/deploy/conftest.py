"""Offline checks of the Kubernetes deployment: Helm chart, skaffold.yaml, Dockerfile.

No cluster, Docker engine or skaffold binary is needed: the chart is rendered and linted with the official
Helm library (``helm_python``, Helm v4 through its C ABI), manifests are validated against the Kubernetes
OpenAPI schemas shipped by ``kubernetes_validate``.

Fixtures return plain data (dicts and lists) so test modules need nothing from this file but fixtures.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
CHART_DIR = REPO_ROOT / "deploy" / "helm" / "eta-platform"
RELEASE = "eta-platform"
NAMESPACE = "eta"
# The value sets a user can pick; "default" is values.yaml alone.
VALUE_FILES: dict[str, str | None] = {
    "default": None,
    "dev": "values-dev.yaml",
    "production": "values-production.yaml",
}
POD_TEMPLATE_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob"}

Manifest = dict[str, Any]
Render = Callable[..., dict[str, Any]]


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _pod_spec(doc: Manifest) -> dict[str, Any] | None:
    kind = doc["kind"]
    if kind == "CronJob":
        spec: dict[str, Any] = doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]
        return spec
    if kind in POD_TEMPLATE_KINDS:
        template_spec: dict[str, Any] = doc["spec"]["template"]["spec"]
        return template_spec
    return None


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def chart_dir() -> Path:
    return CHART_DIR


@pytest.fixture(scope="session")
def chart() -> Iterator[helm.Chart]:
    loaded = helm.Chart.load(CHART_DIR)
    try:
        yield loaded
    finally:
        loaded.close()


@pytest.fixture(scope="session")
def value_file_values() -> dict[str, dict[str, Any]]:
    """The user-supplied values of each value set (before chart defaults are merged in)."""
    out: dict[str, dict[str, Any]] = {}
    for name, filename in VALUE_FILES.items():
        out[name] = helm.values_from_yaml((CHART_DIR / filename).read_text()) if filename else {}
    return out


@pytest.fixture(scope="session")
def render(chart: helm.Chart, value_file_values: dict[str, dict[str, Any]]) -> Render:
    """``render(value_set, overrides=None, is_upgrade=False)`` -> {"values", "manifests", "notes", "files"}.

    ``values`` are the merged values (chart defaults + value file + overrides); ``manifests`` every
    rendered Kubernetes object (hooks included) in template order.
    """
    cache: dict[str, dict[str, Any]] = {}

    def _render(
        value_set: str, overrides: dict[str, Any] | None = None, *, is_upgrade: bool = False
    ) -> dict[str, Any]:
        key = f"{value_set}|{overrides!r}|{is_upgrade}"
        if key in cache:
            return cache[key]
        values = _deep_merge(value_file_values[value_set], overrides or {})
        files = chart.render(
            values=values,
            name=RELEASE,
            namespace=NAMESPACE,
            is_install=not is_upgrade,
            is_upgrade=is_upgrade,
        )
        manifests: list[Manifest] = []
        notes = ""
        for path in sorted(files):
            if path.endswith("NOTES.txt"):
                notes = files[path]
                continue
            for doc in yaml.safe_load_all(files[path]):
                if doc:
                    doc.setdefault("metadata", {}).setdefault("annotations", {})
                    doc["_template"] = path
                    manifests.append(doc)
        result = {
            "values": chart.merge_values(values),
            "manifests": manifests,
            "notes": notes,
            "files": files,
        }
        cache[key] = result
        return result

    return _render


@pytest.fixture(scope="session", params=sorted(VALUE_FILES))
def value_set(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


@pytest.fixture(scope="session")
def rendered(render: Render, value_set: str) -> dict[str, Any]:
    return render(value_set)


@pytest.fixture(scope="session")
def workloads_of() -> Callable[[list[Manifest]], list[dict[str, Any]]]:
    """Turns manifests into ``[{"kind", "name", "doc", "pod", "containers", "hook"}]`` for every pod template.

    ``containers`` includes init containers (each tagged with ``"_init": True``).
    """

    def _workloads(manifests: list[Manifest]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for doc in manifests:
            pod = _pod_spec(doc)
            if pod is None:
                continue
            containers = [dict(c, _init=False) for c in pod.get("containers", [])]
            containers += [dict(c, _init=True) for c in pod.get("initContainers", [])]
            out.append(
                {
                    "kind": doc["kind"],
                    "name": doc["metadata"]["name"],
                    "doc": doc,
                    "pod": pod,
                    "containers": containers,
                    "hook": doc["metadata"]["annotations"].get("helm.sh/hook", ""),
                }
            )
        return out

    return _workloads


@pytest.fixture(scope="session")
def strip_private() -> Callable[[Manifest], Manifest]:
    """Drops the test-only keys (``_template``) before a manifest is validated."""

    def _strip(doc: Manifest) -> Manifest:
        clean = {k: v for k, v in doc.items() if not k.startswith("_")}
        if not clean["metadata"].get("annotations"):
            clean["metadata"] = {k: v for k, v in clean["metadata"].items() if k != "annotations"}
        return clean

    return _strip
