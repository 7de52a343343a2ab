"""Policy checks on every rendered workload: hardening, probes, resources, labels, secrets."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import kubernetes_validate
import pytest

Manifest = dict[str, Any]
Workloads = Callable[[list[Manifest]], list[dict[str, Any]]]

STANDARD_LABELS = (
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/version",
    "app.kubernetes.io/component",
    "app.kubernetes.io/part-of",
    "app.kubernetes.io/managed-by",
    "helm.sh/chart",
)
# Anything that looks like a credential or a connection string with one.
SECRET_LOOKING = re.compile(r"(?i)(postgres(ql)?://|password|passwd|secret|://[^/\s]*:[^/\s]*@)")


def _ours(container: dict[str, Any], image_repository: str) -> bool:
    image: str = container["image"]
    return image.startswith(f"{image_repository}:") or image.startswith(f"{image_repository}@")


def _everything_on() -> dict[str, Any]:
    return {
        "networkPolicy": {"enabled": True},
        "trainer": {"cronJob": {"enabled": True}, "trainOnInstall": {"enabled": True}},
        "simulator": {"live": {"enabled": True}, "seed": {"enabled": True}},
        "kafka": {"createTopics": {"enabled": True}},
    }


@pytest.fixture(scope="module", params=["as-is", "everything-on"])
def policy_render(
    request: pytest.FixtureRequest, render: Callable[..., dict[str, Any]], value_set: str
) -> Any:
    overrides = _everything_on() if request.param == "everything-on" else None
    return render(value_set, overrides)


def test_kubernetes_validate_is_strict() -> None:
    """Guards the schema test: an unknown field must be rejected."""
    bad = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "x"},
        "data": {"A": "b"},
        "dataa": {},
    }
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, "1.33.0", strict=True)


def test_every_pod_is_hardened(policy_render: dict[str, Any], workloads_of: Workloads) -> None:
    workloads = workloads_of(policy_render["manifests"])
    assert workloads
    for w in workloads:
        pod = w["pod"]
        pod_sc = pod.get("securityContext", {})
        assert pod_sc.get("seccompProfile", {}).get("type") == "RuntimeDefault", w["name"]
        assert pod.get("automountServiceAccountToken") is False, w["name"]
        assert pod.get("enableServiceLinks") is False, w["name"]
        for c in w["containers"]:
            sc = c.get("securityContext", {})
            where = f"{w['kind']}/{w['name']}/{c['name']}"
            assert sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True, where
            assert int(sc.get("runAsUser", pod_sc.get("runAsUser", 0))) > 0, where
            assert sc.get("allowPrivilegeEscalation") is False, where
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], where
            assert not sc.get("capabilities", {}).get("add"), where
            assert sc.get("privileged", False) is False, where


def test_our_containers_have_read_only_root_and_writable_tmp(
    policy_render: dict[str, Any], workloads_of: Workloads
) -> None:
    repo = policy_render["values"]["image"]["repository"]
    checked = 0
    for w in workloads_of(policy_render["manifests"]):
        volumes = {v["name"]: v for v in w["pod"].get("volumes", [])}
        for c in w["containers"]:
            if not _ours(c, repo):
                continue
            checked += 1
            where = f"{w['name']}/{c['name']}"
            assert c["securityContext"]["readOnlyRootFilesystem"] is True, where
            if c["_init"]:
                continue
            mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
            assert "/tmp" in mounts, where
            assert "emptyDir" in volumes[mounts["/tmp"]], where
    assert checked >= 3


def test_numeric_non_root_user_matches_the_image(
    policy_render: dict[str, Any], workloads_of: Workloads
) -> None:
    repo = policy_render["values"]["image"]["repository"]
    for w in workloads_of(policy_render["manifests"]):
        if any(_ours(c, repo) for c in w["containers"]):
            assert w["pod"]["securityContext"]["runAsUser"] == 10001, w["name"]
            assert w["pod"]["securityContext"]["runAsGroup"] == 10001, w["name"]


def test_every_container_has_resources(policy_render: dict[str, Any], workloads_of: Workloads) -> None:
    for w in workloads_of(policy_render["manifests"]):
        for c in w["containers"]:
            where = f"{w['name']}/{c['name']}"
            resources = c.get("resources", {})
            assert resources.get("requests", {}).get("cpu"), where
            assert resources.get("requests", {}).get("memory"), where
            assert resources.get("limits", {}).get("memory"), where


def test_servers_have_probes_and_batch_pods_do_not_need_them(
    policy_render: dict[str, Any], workloads_of: Workloads
) -> None:
    servers = 0
    for w in workloads_of(policy_render["manifests"]):
        for c in w["containers"]:
            if c["_init"]:
                continue
            ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
            where = f"{w['name']}/{c['name']}"
            if "grpc" in ports:
                servers += 1
                assert w["kind"] == "Deployment", where
                # With TLS on the gRPC port the probes use the plaintext, health-only port (kubelet gRPC
                # probes cannot do TLS).
                probe_port = ports.get("health", ports["grpc"])
                for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                    assert c[probe]["grpc"]["port"] == probe_port, f"{where} {probe}"
                    assert c[probe]["grpc"].get("service", "") == "", f"{where} {probe}"
            elif ports:
                # Dev infrastructure servers.
                assert "readinessProbe" in c, where
                assert "livenessProbe" in c, where
            else:
                # Jobs, CronJobs and the simulator are clients: no port, nothing to probe.
                assert w["kind"] in {"Job", "CronJob"} or w["name"].endswith("-simulator"), where
    assert servers >= 3


def test_graceful_shutdown_fits_in_the_termination_grace_period(
    policy_render: dict[str, Any], workloads_of: Workloads
) -> None:
    config = next(m for m in policy_render["manifests"] if m["kind"] == "ConfigMap")
    shutdown_grace = float(config["data"]["SHUTDOWN_GRACE_SECONDS"])
    for w in workloads_of(policy_render["manifests"]):
        if w["kind"] == "Deployment" and any(
            p["name"] == "grpc" for p in w["containers"][0].get("ports", [])
        ):
            assert w["pod"]["terminationGracePeriodSeconds"] > shutdown_grace, w["name"]


def test_standard_labels_everywhere(policy_render: dict[str, Any], workloads_of: Workloads) -> None:
    for doc in policy_render["manifests"]:
        labels = doc["metadata"].get("labels", {})
        for label in STANDARD_LABELS:
            assert labels.get(label), f"{doc['kind']}/{doc['metadata']['name']} lacks {label}"
        assert labels["app.kubernetes.io/instance"] == "eta-platform"
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
    for w in workloads_of(policy_render["manifests"]):
        template_labels = (
            w["doc"]["spec"]["jobTemplate"]["spec"]["template"]["metadata"]["labels"]
            if w["kind"] == "CronJob"
            else w["doc"]["spec"]["template"]["metadata"]["labels"]
        )
        if w["kind"] == "Deployment":
            selector = w["doc"]["spec"]["selector"]["matchLabels"]
            assert selector.items() <= template_labels.items(), w["name"]
            assert "app.kubernetes.io/version" not in selector, "selectors must survive upgrades"


def test_each_service_selects_exactly_one_deployment(policy_render: dict[str, Any]) -> None:
    manifests = policy_render["manifests"]
    deployments = [m for m in manifests if m["kind"] == "Deployment"]
    for svc in (m for m in manifests if m["kind"] == "Service"):
        selector = svc["spec"]["selector"].items()
        matches = [d for d in deployments if selector <= d["spec"]["template"]["metadata"]["labels"].items()]
        assert len(matches) == 1, svc["metadata"]["name"]
        container_ports = {
            p["name"] for c in matches[0]["spec"]["template"]["spec"]["containers"] for p in c["ports"]
        }
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in container_ports, svc["metadata"]["name"]


def test_no_secret_in_configmaps_or_plain_env(policy_render: dict[str, Any], workloads_of: Workloads) -> None:
    for cm in (m for m in policy_render["manifests"] if m["kind"] == "ConfigMap"):
        assert "DATABASE_URL" not in cm["data"]
        for key, value in cm["data"].items():
            assert not SECRET_LOOKING.search(value), f"{cm['metadata']['name']}.{key}"
    for w in workloads_of(policy_render["manifests"]):
        for c in w["containers"]:
            for env in c.get("env", []):
                where = f"{w['name']}/{c['name']}/{env['name']}"
                if env["name"] in {"DATABASE_URL", "POSTGRES_PASSWORD"}:
                    assert "secretKeyRef" in env["valueFrom"], where
                    assert "value" not in env, where
                elif "value" in env:
                    assert not SECRET_LOOKING.search(env["value"]), where
            for source in c.get("envFrom", []):
                assert "configMapRef" in source or "secretRef" in source


def test_images_are_pinned(policy_render: dict[str, Any], workloads_of: Workloads) -> None:
    for w in workloads_of(policy_render["manifests"]):
        for c in w["containers"]:
            image: str = c["image"]
            name, _, tag = image.rpartition(":")
            assert name, image
            assert tag, image
            assert tag != "latest", image
            assert c.get("imagePullPolicy") in {"IfNotPresent", "Always"}, image


def test_pdbs_never_block_a_drain_of_single_replicas(policy_render: dict[str, Any]) -> None:
    for pdb in (m for m in policy_render["manifests"] if m["kind"] == "PodDisruptionBudget"):
        assert "minAvailable" not in pdb["spec"]
        assert pdb["spec"]["maxUnavailable"] >= 1
