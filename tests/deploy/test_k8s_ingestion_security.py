"""Ingestion's authentication and TLS in the chart: on in the production values (tokens and certificate
from existing Secrets, mounted read-only; probes on the plaintext health port), off by default and in dev,
and misconfiguration refused at render time."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import PurePosixPath
from typing import Any

import helm_python as helm
import pytest

Render = Callable[..., dict[str, Any]]
SECURITY_ENV = {
    "INGESTION_AUTH_REQUIRED",
    "INGESTION_AUTH_TOKENS_FILE",
    "GRPC_TLS_CERT_FILE",
    "GRPC_TLS_KEY_FILE",
    "GRPC_HEALTH_PORT",
}


def _ingestion(rendered: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    deployment = next(
        m
        for m in rendered["manifests"]
        if m["kind"] == "Deployment" and m["metadata"]["name"] == "eta-platform-ingestion"
    )
    pod = deployment["spec"]["template"]["spec"]
    return pod, pod["containers"][0]


def _mounted_file(pod: dict[str, Any], container: dict[str, Any], path: str) -> tuple[str, str]:
    """(Secret name, key) behind a file path inside the container; fails if nothing is mounted there."""
    volumes = {v["name"]: v for v in pod["volumes"]}
    for mount in container["volumeMounts"]:
        if PurePosixPath(path).parent == PurePosixPath(mount["mountPath"]):
            assert mount["readOnly"] is True
            secret = volumes[mount["name"]]["secret"]
            keys = {item["path"]: item["key"] for item in secret["items"]}
            return secret["secretName"], keys[PurePosixPath(path).name]
    raise AssertionError(f"nothing mounted for {path}")


def test_production_ingestion_requires_tokens_over_tls(render: Render) -> None:
    rendered = render("production")
    pod, container = _ingestion(rendered)
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["INGESTION_AUTH_REQUIRED"] == "true"
    assert _mounted_file(pod, container, env["INGESTION_AUTH_TOKENS_FILE"]) == (
        "eta-platform-ingestion-auth",
        "tokens",
    )
    assert _mounted_file(pod, container, env["GRPC_TLS_CERT_FILE"]) == (
        "eta-platform-ingestion-tls",
        "tls.crt",
    )
    assert _mounted_file(pod, container, env["GRPC_TLS_KEY_FILE"]) == (
        "eta-platform-ingestion-tls",
        "tls.key",
    )

    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["health"] == int(env["GRPC_HEALTH_PORT"]) == 50061
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == ports["health"]
    service = next(
        m
        for m in rendered["manifests"]
        if m["kind"] == "Service" and m["metadata"]["name"] == "eta-platform-ingestion"
    )
    assert {p["name"] for p in service["spec"]["ports"]} == {"grpc", "metrics"}  # health stays pod-local
    assert not [m for m in rendered["manifests"] if m["kind"] == "Secret"], "tokens never come from values"


@pytest.mark.parametrize("value_set", ["default", "dev"])
def test_security_is_off_by_default_and_in_dev(render: Render, value_set: str) -> None:
    pod, container = _ingestion(render(value_set))
    assert not SECURITY_ENV & {e["name"] for e in container["env"]}
    assert [v["name"] for v in pod["volumes"]] == ["tmp"]
    assert container["readinessProbe"]["grpc"]["port"] == 50051


def test_notes_show_how_to_call_the_secured_port(render: Render) -> None:
    notes = render("production")["notes"]
    assert "grpcurl -cacert ca.crt -servername eta-platform-ingestion localhost:50051 list" in notes
    assert '-H "authorization: Bearer $TOKEN"' in notes
    assert "grpcurl -plaintext localhost:50051" not in notes


def test_optional_auth_renders_required_false(render: Render) -> None:
    values = {
        "components": {"ingestion": {"auth": {"enabled": True, "required": False, "existingSecret": "t"}}}
    }
    _, container = _ingestion(render("default", values))
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["INGESTION_AUTH_REQUIRED"] == "false"
    assert "GRPC_TLS_CERT_FILE" not in env


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"components": {"ingestion": {"auth": {"enabled": True}}}}, "auth.existingSecret is required"),
        ({"components": {"ingestion": {"tls": {"enabled": True}}}}, "tls.existingSecret"),
        (
            {
                "components": {
                    "ingestion": {"tls": {"enabled": True, "existingSecret": "t", "healthPort": 9101}}
                }
            },
            "healthPort must differ",
        ),
        (
            {
                "components": {
                    "prediction": {
                        "tls": {"enabled": True, "existingSecret": "t", "healthPort": 50062},
                    }
                }
            },
            "only supported by the ingestion component",
        ),
    ],
)
def test_misconfigured_security_is_refused(chart: helm.Chart, values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm.HelmError, match=message):
        chart.render(values=values, name="eta-platform", namespace="eta")


@pytest.mark.parametrize(
    "bad_values",
    [
        {"components": {"ingestion": {"auth": {"enabled": True, "token": "s3cret"}}}},  # no tokens in values
        {"components": {"ingestion": {"tls": {"enabled": "yes"}}}},
        {"components": {"ingestion": {"tls": {"healthPort": 70000}}}},
        {"components": {"ingestion": {"auth": {"existingSecret": "Not_A_Name"}}}},
    ],
)
def test_values_schema_rejects_bad_security_values(chart: helm.Chart, bad_values: dict[str, Any]) -> None:
    with pytest.raises(helm.HelmValuesError):
        chart.validate_schema(bad_values)
