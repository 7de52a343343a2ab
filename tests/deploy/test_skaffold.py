"""skaffold.yaml is valid for skaffold/v4beta14 and agrees with the chart it deploys.

The schema checks need the skaffold JSON schema (``SKAFFOLD_SCHEMA`` or ``../shared/schemas/``); see
``_schema_path``.
"""

from __future__ import annotations

import copy
import json
import os
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

Render = Callable[..., dict[str, Any]]

REPO_ROOT = Path(__file__).resolve().parents[2]
SCHEMA_NAME = "skaffold-v4beta14.json"
# Where the schema comes from (GoogleContainerTools/skaffold, Apache-2.0).
SCHEMA_URL = (
    "https://raw.githubusercontent.com/GoogleContainerTools/skaffold/main/"
    "docs-v2/content/en/schemas/v4beta14.json"
)


class SkaffoldSchemaUnavailable(UserWarning):
    """Shown in the warnings summary of a run without the schema, so the skip is never silent."""


def _schema_path() -> Path:
    """Where the skaffold JSON schema is.

    ``SKAFFOLD_SCHEMA`` (a file path) wins, and when it is set the file must exist: CI (``.ci/run``) sets
    it, so there a missing schema fails. Without it, ``../shared/schemas/`` beside the clone is used when
    present; a fresh clone with neither skips the two schema tests with the reason (never fails).
    """
    configured = os.environ.get("SKAFFOLD_SCHEMA")
    if configured:
        path = Path(configured)
        if not path.is_file():
            pytest.fail(f"SKAFFOLD_SCHEMA={configured} is not a file (unset it to skip the schema tests)")
        return path
    beside = REPO_ROOT.parent / "shared" / "schemas" / SCHEMA_NAME
    if beside.is_file():
        return beside
    reason = (
        f"skaffold JSON schema not available (no SKAFFOLD_SCHEMA, no {beside}): schema validation of "
        f"skaffold.yaml skipped; to run it, download {SCHEMA_URL} and set SKAFFOLD_SCHEMA to the file"
    )
    warnings.warn(SkaffoldSchemaUnavailable(reason), stacklevel=2)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def skaffold_schema() -> dict[str, Any]:
    schema: dict[str, Any] = json.loads(_schema_path().read_text(encoding="utf-8"))
    return schema


@pytest.fixture(scope="module")
def skaffold() -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load((REPO_ROOT / "skaffold.yaml").read_text(encoding="utf-8"))
    return config


@pytest.fixture(scope="module")
def release(skaffold: dict[str, Any]) -> dict[str, Any]:
    releases = skaffold["deploy"]["helm"]["releases"]
    assert len(releases) == 1
    first: dict[str, Any] = releases[0]
    return first


def _validator(schema: dict[str, Any]) -> jsonschema.protocols.Validator:
    validator_class = jsonschema.validators.validator_for(schema)
    validator_class.check_schema(schema)
    validator: jsonschema.protocols.Validator = validator_class(schema)
    return validator


def test_skaffold_yaml_matches_the_v4beta14_schema(
    skaffold: dict[str, Any], skaffold_schema: dict[str, Any]
) -> None:
    assert skaffold["apiVersion"] == "skaffold/v4beta14"
    assert skaffold["kind"] == "Config"
    errors = sorted(_validator(skaffold_schema).iter_errors(skaffold), key=lambda e: list(e.path))
    assert not errors, [f"{list(e.path)}: {e.message}" for e in errors]


def test_schema_check_rejects_a_typo(skaffold: dict[str, Any], skaffold_schema: dict[str, Any]) -> None:
    """Guards the test above: the schema is strict enough to catch a misspelt field."""
    broken = copy.deepcopy(skaffold)
    broken["deploy"]["helm"]["releases"][0]["chartpath"] = broken["deploy"]["helm"]["releases"][0].pop(
        "chartPath"
    )
    assert list(_validator(skaffold_schema).iter_errors(broken))


def test_one_artifact_built_from_the_root_dockerfile(skaffold: dict[str, Any], render: Render) -> None:
    artifacts = skaffold["build"]["artifacts"]
    assert len(artifacts) == 1
    artifact = artifacts[0]
    assert artifact["image"] == "eta-platform"
    assert artifact.get("context", ".") == "."
    assert artifact["docker"]["dockerfile"] == "Dockerfile"
    assert (REPO_ROOT / artifact["docker"]["dockerfile"]).is_file()
    for value_set in ("default", "dev"):
        assert render(value_set)["values"]["image"]["repository"] == artifact["image"]


def test_helm_release_injects_the_built_image(
    skaffold: dict[str, Any], release: dict[str, Any], render: Render
) -> None:
    artifact = skaffold["build"]["artifacts"][0]["image"]
    key = re.sub(r"[-/.]", "_", artifact)  # skaffold's template names replace - / . with _
    templates = release["setValueTemplates"]
    assert templates["image.repository"] == f"{{{{.IMAGE_REPO_{key}}}}}"
    assert templates["image.tag"] == f"{{{{.IMAGE_TAG_{key}}}}}@{{{{.IMAGE_DIGEST_{key}}}}}"
    chart_values = render("default")["values"]
    for dotted in templates:
        node: Any = chart_values
        for part in dotted.split("."):
            assert isinstance(node, dict)
            assert part in node, f"setValueTemplates key {dotted} is not a chart value"
            node = node[part]


def test_helm_release_points_at_the_chart_and_dev_values(release: dict[str, Any]) -> None:
    chart_path = REPO_ROOT / release["chartPath"]
    assert (chart_path / "Chart.yaml").is_file()
    assert yaml.safe_load((chart_path / "Chart.yaml").read_text())["name"] == "eta-platform"
    assert release["valuesFiles"] == ["deploy/helm/eta-platform/values-dev.yaml"]
    for values_file in release["valuesFiles"]:
        assert (REPO_ROOT / values_file).is_file()
    assert release["name"] == "eta-platform"


def test_profiles_for_kind_and_minikube_build_without_pushing(skaffold: dict[str, Any]) -> None:
    profiles = {p["name"]: p for p in skaffold["profiles"]}
    assert {"kind", "minikube"} <= set(profiles)
    for name in ("kind", "minikube"):
        assert profiles[name]["build"]["local"]["push"] is False
    assert re.fullmatch(profiles["kind"]["activation"][0]["kubeContext"], "kind-eta")
    assert re.fullmatch(profiles["minikube"]["activation"][0]["kubeContext"], "minikube")


def test_production_profile_swaps_the_values_file(skaffold: dict[str, Any]) -> None:
    profile = next(p for p in skaffold["profiles"] if p["name"] == "production")
    patch = next(p for p in profile["patches"] if p["path"] == "/deploy/helm/releases/0/valuesFiles")
    assert patch["value"] == ["deploy/helm/eta-platform/values-production.yaml"]


def test_port_forwards_match_chart_services(
    skaffold: dict[str, Any], release: dict[str, Any], render: Render
) -> None:
    dev = render("dev")
    services = {
        m["metadata"]["name"]: {p["port"] for p in m["spec"]["ports"]}
        for m in dev["manifests"]
        if m["kind"] == "Service"
    }
    forwards = skaffold["portForward"]
    assert forwards
    for forward in forwards:
        assert forward["resourceType"] == "service"
        assert forward["namespace"] == release["namespace"]
        assert forward["resourceName"] in services, forward["resourceName"]
        assert forward["port"] in services[forward["resourceName"]], forward
        assert forward["localPort"] == forward["port"]
    by_service = {f["resourceName"]: f["port"] for f in forwards}
    components = dev["values"]["components"]
    assert by_service == {
        "eta-platform-ingestion": components["ingestion"]["grpcPort"],
        "eta-platform-aggregator": components["aggregator"]["grpcPort"],
        "eta-platform-prediction": components["prediction"]["grpcPort"],
        "eta-platform-jaeger": 16686,
    }
    assert sorted(by_service.values()) == [16686, 50051, 50052, 50053]


def test_schema_is_found_beside_the_clone_or_skipped_with_a_reason(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("SKAFFOLD_SCHEMA", raising=False)
    monkeypatch.setattr(f"{__name__}.REPO_ROOT", tmp_path / "clone")
    with (
        pytest.warns(SkaffoldSchemaUnavailable, match="SKAFFOLD_SCHEMA"),
        pytest.raises(pytest.skip.Exception, match="schema not available"),
    ):
        _schema_path()
    beside = tmp_path / "shared" / "schemas" / SCHEMA_NAME
    beside.parent.mkdir(parents=True)
    beside.write_text("{}")
    assert _schema_path() == beside


def test_configured_schema_wins_and_must_exist(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(f"{__name__}.REPO_ROOT", tmp_path / "clone")
    schema_copy = tmp_path / "schema.json"
    monkeypatch.setenv("SKAFFOLD_SCHEMA", str(schema_copy))
    with pytest.raises(pytest.fail.Exception, match="is not a file"):
        _schema_path()
    schema_copy.write_text("{}")
    assert _schema_path() == schema_copy
