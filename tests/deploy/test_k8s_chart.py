"""The Helm chart renders, lints strictly and produces schema-valid Kubernetes objects for every value set."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import helm_python as helm
import kubernetes_validate
import pytest

Manifest = dict[str, Any]
Render = Callable[..., dict[str, Any]]

# Kubernetes schema versions shipped by kubernetes-validate that we check against (the chart's
# kubeVersion floor is 1.27; native gRPC probes are GA since 1.27).
KUBE_VERSIONS = ["1.30.0", "1.33.0"]
# CRD-backed kinds kubernetes-validate has no schema for; checked structurally below.
CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}
COMPONENTS = ("ingestion", "aggregator", "prediction")
# Every optional feature on at once, to validate the objects that are off by default.
EVERYTHING_ON: dict[str, Any] = {
    "networkPolicy": {"enabled": True},
    "serviceMonitor": {"enabled": True},
    "topologySpread": {"enabled": True},
    "kafka": {"createTopics": {"enabled": True}},
    "trainer": {"cronJob": {"enabled": True}, "trainOnInstall": {"enabled": True}},
    "simulator": {"live": {"enabled": True}, "seed": {"enabled": True}},
    "components": {name: {"autoscaling": {"enabled": True}, "pdb": {"enabled": True}} for name in COMPONENTS},
    "redis": {"existingSecret": "redis-credentials"},
    "imagePullSecrets": [{"name": "registry"}],
}


def _kinds(manifests: list[Manifest]) -> dict[tuple[str, str], Manifest]:
    return {(m["kind"], m["metadata"]["name"]): m for m in manifests}


# --------------------------------------------------------------------------------------------- lint ---


@pytest.mark.parametrize("value_set_file", [None, "values-dev.yaml", "values-production.yaml"])
def test_helm_lint_strict_is_clean(chart_dir: Path, value_set_file: str | None) -> None:
    values = helm.values_from_yaml((chart_dir / value_set_file).read_text()) if value_set_file else None
    report = helm.lint(chart_dir, values, strict=True, namespace="eta", kube_version="v1.33.0")
    assert report["total_charts_linted"] == 1
    assert report["errors"] == []
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert problems == [], problems


def test_helm_lint_catches_schema_violations(chart_dir: Path) -> None:
    """Guards the lint test itself: a bad value must be reported, so a clean report means something."""
    report = helm.lint(chart_dir, {"components": {"ingestion": {"grpcPort": "not-a-port"}}}, strict=True)
    assert report["errors"] or any(m["severity"] >= 3 for m in report["messages"])


def test_chart_metadata(chart: helm.Chart) -> None:
    meta = chart.metadata
    assert meta["apiVersion"] == "v2"
    assert meta["name"] == "eta-platform"
    assert meta["type"] == "application"
    assert chart.schema is not None, "values.schema.json must ship with the chart"


# ---------------------------------------------------------------------------------- values schema ---


def test_value_files_satisfy_values_schema(
    chart: helm.Chart, value_file_values: dict[str, dict[str, Any]]
) -> None:
    for values in value_file_values.values():
        chart.validate_schema(values)


@pytest.mark.parametrize(
    "bad_values",
    [
        {"componnets": {}},  # typo at the top level
        {"components": {"ingestion": {"grpcPort": 70000}}},
        {"extraEnv": {"DATABASE_URL": "postgresql://u:p@h/db"}},  # secrets never go to a ConfigMap
        {"components": {"prediction": {"env": {"DATABASE_URL": "postgresql://u:p@h/db"}}}},
        {"redis": {"url": "redis://:hunter2@redis:6379/0"}},  # credentials belong in redis.existingSecret
        {"podSecurityContext": {"runAsNonRoot": False}},
        {"logLevel": "LOUD"},
    ],
)
def test_values_schema_rejects_bad_values(chart: helm.Chart, bad_values: dict[str, Any]) -> None:
    with pytest.raises(helm.HelmValuesError):
        chart.validate_schema(bad_values)


@pytest.mark.parametrize(
    ("bad_values", "message"),
    [
        ({"terminationGracePeriodSeconds": 10, "shutdownGraceSeconds": 10}, "terminationGracePeriodSeconds"),
        ({"components": {"aggregator": {"replicas": 5}}, "kafka": {"partitions": 3}}, "kafka.partitions"),
        (
            {"simulator": {"live": {"enabled": True}}, "components": {"ingestion": {"enabled": False}}},
            "ingestion",
        ),
    ],
)
def test_templates_reject_inconsistent_values(
    chart: helm.Chart, bad_values: dict[str, Any], message: str
) -> None:
    with pytest.raises(helm.HelmError, match=message):
        chart.render(values=bad_values, name="eta-platform", namespace="eta")


# ------------------------------------------------------------------------------ Kubernetes schemas ---


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("overrides", [None, EVERYTHING_ON], ids=["as-is", "everything-on"])
def test_manifests_are_valid_kubernetes_objects(
    render: Render,
    value_set: str,
    kube_version: str,
    overrides: dict[str, Any] | None,
    strip_private: Callable[[Manifest], Manifest],
) -> None:
    manifests = render(value_set, overrides)["manifests"]
    assert manifests
    validated = 0
    for doc in manifests:
        clean = strip_private(doc)
        if clean["kind"] == "ServiceMonitor":
            assert clean["apiVersion"] == "monitoring.coreos.com/v1"
            assert clean["spec"]["selector"]["matchLabels"]
            assert all(ep["port"] == "metrics" for ep in clean["spec"]["endpoints"])
            continue
        if clean["kind"] == "PrometheusRule":
            assert clean["apiVersion"] == "monitoring.coreos.com/v1"
            groups = clean["spec"]["groups"]
            assert groups
            assert all(group["rules"] for group in groups)
            continue
        kubernetes_validate.validate(clean, kube_version, strict=True)
        validated += 1
    assert validated >= 10


def test_rendered_names_are_unique_per_kind(rendered: dict[str, Any]) -> None:
    seen = [(m["kind"], m["metadata"]["name"]) for m in rendered["manifests"]]
    assert len(seen) == len(set(seen))


# ---------------------------------------------------------------------------------- what renders ---


def test_default_values_render_services_only(render: Render) -> None:
    objects = _kinds(render("default")["manifests"])
    for name in COMPONENTS:
        assert ("Deployment", f"eta-platform-{name}") in objects
        assert ("Service", f"eta-platform-{name}") in objects
        assert ("PodDisruptionBudget", f"eta-platform-{name}") in objects
    assert ("Job", "eta-platform-migrate") in objects
    assert ("ConfigMap", "eta-platform-config") in objects
    # Off by default.
    for kind in ("HorizontalPodAutoscaler", "NetworkPolicy", "ServiceMonitor", "CronJob"):
        assert not [k for k in objects if k[0] == kind], kind
    assert ("Deployment", "eta-platform-simulator") not in objects
    assert ("Deployment", "eta-platform-kafka") not in objects


def test_dev_values_bring_infrastructure_simulator_and_first_model(render: Render) -> None:
    dev = render("dev")
    objects = _kinds(dev["manifests"])
    for infra in ("kafka", "redis", "postgres", "jaeger"):
        assert ("Deployment", f"eta-platform-{infra}") in objects
        assert ("Service", f"eta-platform-{infra}") in objects
    kafka = objects[("Deployment", "eta-platform-kafka")]
    kafka_env = {e["name"]: e.get("value") for e in kafka["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert kafka["spec"]["template"]["spec"]["containers"][0]["image"].startswith("apache/kafka:")
    assert kafka_env["KAFKA_PROCESS_ROLES"] == "broker,controller"  # KRaft, no ZooKeeper
    assert kafka_env["KAFKA_ADVERTISED_LISTENERS"] == "PLAINTEXT://eta-platform-kafka:9092"
    jaeger_ports = {p["port"] for p in objects[("Service", "eta-platform-jaeger")]["spec"]["ports"]}
    assert {4317, 16686} <= jaeger_ports
    assert ("Deployment", "eta-platform-simulator") in objects
    assert ("Job", "eta-platform-kafka-topics") in objects
    assert ("Job", "eta-platform-seed") in objects
    assert ("Job", "eta-platform-train-once") in objects


def test_dev_topic_job_creates_the_three_topics(render: Render) -> None:
    job = _kinds(render("dev")["manifests"])[("Job", "eta-platform-kafka-topics")]
    container = job["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["TOPICS"].split() == ["eta.driver-events", "eta.kitchen-events", "eta.order-events"]
    assert env["BOOTSTRAP"] == "eta-platform-kafka:9092"
    assert env["PARTITIONS"] == "3"
    script = container["command"][-1]
    assert "bin=/opt/kafka/bin" in script  # the official image's CLI tools
    assert '"$bin/kafka-topics.sh"' in script
    assert "--create --if-not-exists" in script


def test_dev_endpoints_point_at_in_cluster_services(render: Render) -> None:
    """With devInfra on, every endpoint our services get resolves to a Service of the release and port."""
    dev = render("dev")
    objects = _kinds(dev["manifests"])
    services = {
        name: {p["port"] for p in doc["spec"]["ports"]}
        for (kind, name), doc in objects.items()
        if kind == "Service"
    }
    config = objects[("ConfigMap", "eta-platform-config")]["data"]
    database_url = objects[("Secret", "eta-platform-database")]["stringData"]["DATABASE_URL"]
    endpoints = [
        f"kafka://{config['KAFKA_BOOTSTRAP_SERVERS']}",
        config["REDIS_URL"],
        config["OTEL_EXPORTER_OTLP_ENDPOINT"],
        database_url,
    ]
    for endpoint in endpoints:
        parts = urlsplit(endpoint)
        assert parts.hostname in services, endpoint
        assert parts.port in services[parts.hostname], endpoint
    assert urlsplit(config["OTEL_EXPORTER_OTLP_ENDPOINT"]).port == 4317  # OTLP over gRPC


def test_production_uses_external_endpoints_and_existing_secret(render: Render, workloads_of: Any) -> None:
    prod = render("production")
    objects = _kinds(prod["manifests"])
    assert not [k for k in objects if k[0] == "Secret"], "production must not render a database Secret"
    for infra in ("kafka", "redis", "postgres", "jaeger"):
        assert ("Deployment", f"eta-platform-{infra}") not in objects
    assert ("Deployment", "eta-platform-simulator") not in objects
    config = objects[("ConfigMap", "eta-platform-config")]["data"]
    assert config["KAFKA_BOOTSTRAP_SERVERS"] == prod["values"]["kafka"]["bootstrapServers"]
    assert config["OTEL_EXPORTER_OTLP_ENDPOINT"] == prod["values"]["telemetry"]["otlpEndpoint"]
    for workload in workloads_of(prod["manifests"]):
        for container in workload["containers"]:
            for env in container.get("env", []):
                if env["name"] == "DATABASE_URL":
                    ref = env["valueFrom"]["secretKeyRef"]
                    assert ref == {"name": "eta-platform-database", "key": "DATABASE_URL"}
    autoscaled = {
        m["spec"]["scaleTargetRef"]["name"]
        for m in prod["manifests"]
        if m["kind"] == "HorizontalPodAutoscaler"
    }
    assert autoscaled == {"eta-platform-ingestion", "eta-platform-prediction"}
    for name in ("eta-platform-ingestion", "eta-platform-prediction"):
        assert "replicas" not in objects[("Deployment", name)]["spec"], "HPA owns replicas"
    assert {m["metadata"]["name"] for m in prod["manifests"] if m["kind"] == "NetworkPolicy"} == {
        f"eta-platform-{c}" for c in COMPONENTS
    }
    assert len([m for m in prod["manifests"] if m["kind"] == "ServiceMonitor"]) == 3
    assert ("CronJob", "eta-platform-trainer") in objects


def test_existing_secret_replaces_chart_secret(render: Render, workloads_of: Any) -> None:
    out = render("default", {"database": {"existingSecret": "db-creds", "existingSecretKey": "url"}})
    assert not [m for m in out["manifests"] if m["kind"] == "Secret"]
    refs = [
        env["valueFrom"]["secretKeyRef"]
        for w in workloads_of(out["manifests"])
        for c in w["containers"]
        for env in c.get("env", [])
        if env["name"] == "DATABASE_URL"
    ]
    assert refs
    assert all(ref == {"name": "db-creds", "key": "url"} for ref in refs)


def test_redis_existing_secret_keeps_redis_url_out_of_the_configmap(
    render: Render, workloads_of: Any
) -> None:
    out = render("default", {"redis": {"existingSecret": "redis-creds"}})
    config = _kinds(out["manifests"])[("ConfigMap", "eta-platform-config")]["data"]
    assert "REDIS_URL" not in config
    for workload in workloads_of(out["manifests"]):
        for container in workload["containers"]:
            if container["_init"]:
                continue
            redis = [e for e in container.get("env", []) if e["name"] == "REDIS_URL"]
            assert redis == [
                {
                    "name": "REDIS_URL",
                    "valueFrom": {"secretKeyRef": {"name": "redis-creds", "key": "REDIS_URL"}},
                }
            ], workload["name"]


def test_component_loop_is_data_driven(render: Render) -> None:
    """A new entry under `components:` yields its own Deployment + Service with no template change."""
    extra = {
        "components": {
            "routing": {
                "enabled": True,
                "command": ["eta-prediction"],
                "args": [],
                "otelServiceName": "eta-routing",
                "replicas": 1,
                "grpcPort": 50060,
                "metricsPort": 9110,
                "database": False,
                "env": {},
                "resources": {"requests": {"cpu": "10m", "memory": "32Mi"}, "limits": {"memory": "64Mi"}},
                "autoscaling": {
                    "enabled": False,
                    "minReplicas": 1,
                    "maxReplicas": 2,
                    "targetCPUUtilizationPercentage": 80,
                },
                "pdb": {"enabled": False, "maxUnavailable": 1},
                "service": {"type": "ClusterIP"},
            },
            "aggregator": {"enabled": False},
        }
    }
    objects = _kinds(render("default", extra)["manifests"])
    assert ("Deployment", "eta-platform-routing") in objects
    assert objects[("Service", "eta-platform-routing")]["spec"]["ports"][0]["port"] == 50060
    assert ("Deployment", "eta-platform-aggregator") not in objects
    assert ("Service", "eta-platform-aggregator") not in objects


# ------------------------------------------------------------------------------------------ hooks ---


def _hook(doc: Manifest) -> tuple[set[str], int]:
    annotations = doc["metadata"]["annotations"]
    return set(annotations["helm.sh/hook"].split(",")), int(annotations.get("helm.sh/hook-weight", "0"))


def test_migrations_run_before_the_release_with_external_database(render: Render) -> None:
    for value_set in ("default", "production"):
        objects = _kinds(render(value_set)["manifests"])
        job = objects[("Job", "eta-platform-migrate")]
        events, _ = _hook(job)
        assert events == {"pre-install", "pre-upgrade"}
        assert job["spec"]["template"]["spec"]["containers"][0]["command"] == ["eta-migrate"]
        # A pre-install Job cannot read a ConfigMap that does not exist yet: configuration is inlined.
        assert "envFrom" not in job["spec"]["template"]["spec"]["containers"][0]
    # The chart-made Secret must exist before the pre-install Job that reads it.
    secret = _kinds(render("default")["manifests"])[("Secret", "eta-platform-database")]
    events, weight = _hook(secret)
    assert events == {"pre-install", "pre-upgrade"}
    assert weight < _hook(_kinds(render("default")["manifests"])[("Job", "eta-platform-migrate")])[1]


def test_dev_hooks_run_after_infrastructure_in_order(render: Render) -> None:
    objects = _kinds(render("dev")["manifests"])
    migrate = _hook(objects[("Job", "eta-platform-migrate")])
    topics = _hook(objects[("Job", "eta-platform-kafka-topics")])
    seed = _hook(objects[("Job", "eta-platform-seed")])
    train = _hook(objects[("Job", "eta-platform-train-once")])
    for events, _ in (migrate, topics, seed, train):
        assert "post-install" in events
    assert migrate[1] < seed[1] < train[1]
    assert topics[1] < seed[1]
    train_container = objects[("Job", "eta-platform-train-once")]["spec"]["template"]["spec"]["containers"][0]
    assert train_container["command"] == ["eta-trainer"]
    assert "--force-promote" in train_container["args"]
    seed_container = objects[("Job", "eta-platform-seed")]["spec"]["template"]["spec"]["containers"][0]
    assert seed_container["command"] == ["eta-simulator"]
    assert seed_container["args"][:2] == ["seed", "--days"]
    # Dev Secret is an ordinary release object (no hook): it is removed by `helm uninstall`.
    assert "helm.sh/hook" not in objects[("Secret", "eta-platform-database")]["metadata"]["annotations"]


def test_simulator_targets_the_ingestion_service(render: Render) -> None:
    objects = _kinds(render("dev")["manifests"])
    container = objects[("Deployment", "eta-platform-simulator")]["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["eta-simulator"]
    assert container["args"][:3] == ["live", "--target", "eta-platform-ingestion:50051"]


# ------------------------------------------------------------------------------------------ NOTES ---


def test_notes_explain_port_forward_and_grpcurl(render: Render) -> None:
    notes = render("dev")["notes"]
    assert "kubectl --namespace eta port-forward svc/eta-platform-prediction 50053:50053" in notes
    assert "eta.v1.EtaService/PredictEta" in notes
    assert "eta.v1.IngestionService/PublishEvents" in notes
    assert "eta.v1.FeatureService/GetRestaurantFeatures" in notes
    assert '"restaurant_location"' in notes
    assert '"customer_location"' in notes
    assert "16686:16686" in notes
    prod_notes = render("production")["notes"]
    assert "16686" not in prod_notes
    assert "postgresql://" not in prod_notes
