"""Monitoring as code: the alert/recording rules and the Grafana dashboard, checked by the real tools.

- ``promtool check rules`` on the rules file, ``promtool test rules`` on its unit tests, and every rule has
  a unit test;
- every PromQL expression of the dashboard parses (``promtool check rules`` on a generated rules file holding
  each one as a recording rule) and, with the rules, names only metrics the services export (here: the
  services' registries; ``tests/integration/test_prometheus.py`` scrapes the running services);
- the chart renders both from the one source file (``.Files.Get``), behind values flags;
- tracing: the chart's default and production sampling is a parent-based ratio, dev samples everything.

Without ``promtool`` (Debian package ``prometheus``; ``.ci/run`` installs it) the promtool tests skip with the
reason.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
CHART_DIR = REPO_ROOT / "deploy" / "helm" / "eta-platform"
MONITORING = REPO_ROOT / "deploy" / "monitoring"
RULES = MONITORING / "rules.yaml"
DASHBOARD = MONITORING / "dashboard.json"
RULE_TESTS = MONITORING / "tests" / "rules_test.yaml"
PROMTOOL = shutil.which("promtool")

NO_PROMTOOL = "promtool not installed (Debian/Ubuntu: apt-get install prometheus; .ci/run installs it)"
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason=NO_PROMTOOL)


@pytest.fixture(scope="module", autouse=True)
def _say_why_promtool_tests_skip() -> None:
    """`pytest -q` hides skip reasons; a warning shows up in its summary."""
    if PROMTOOL is None:
        warnings.warn(f"tests/deploy/test_monitoring.py: promtool tests skipped: {NO_PROMTOOL}", stacklevel=1)


# Metrics the rules and the dashboard may name although our services do not export them, and why.
EXTERNAL_METRICS: dict[str, str] = {
    "up": "Prometheus' own per-target scrape health",
    "kube_pod_status_ready": "kube-state-metrics: pod readiness (pods-not-ready alert, Kubernetes only)",
    "kafka_consumergroup_lag": "kafka-exporter: records behind per consumer group (optional second lag view)",
}
# Grafana's built-in variables, replaced by a typical value before promtool parses an expression.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h"}
PROMQL_KEYWORDS = {
    "and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left", "group_right",
    "inf", "nan", "start", "end",
}  # fmt: skip
Render = Callable[..., dict[str, Any]]


# ------------------------------------------------------------------------------------------ reading ---


def rule_groups() -> list[dict[str, Any]]:
    groups: list[dict[str, Any]] = yaml.safe_load(RULES.read_text())["groups"]
    return groups


def rules() -> list[dict[str, Any]]:
    return [rule for group in rule_groups() for rule in group["rules"]]


def recorded_names() -> set[str]:
    return {rule["record"] for rule in rules() if "record" in rule}


def rule_exprs() -> dict[str, str]:
    """``rule name -> expression`` for every recording and alert rule."""
    return {rule.get("record") or rule["alert"]: rule["expr"] for rule in rules()}


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def dashboard_exprs() -> dict[str, str]:
    """``"<panel title> [<refId>]" -> expression`` with Grafana's variables replaced."""
    out: dict[str, str] = {}
    for panel in _panels(dashboard()["panels"]):
        for target in panel.get("targets", []):
            expr = target["expr"]
            for variable, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(variable, value)
            out[f"{panel['title']} [{target['refId']}]"] = expr
    return out


def metric_names_in(expr: str) -> set[str]:
    """The metric names an expression selects (not functions, keywords, labels or durations)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)  # string literals
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges and subqueries
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names: set[str] = set()
    for match in re.finditer(r"(?<![A-Za-z0-9_:.])[A-Za-z_:][A-Za-z0-9_:]*", text):
        token = match.group(0)
        following = text[match.end() :].lstrip()
        if token.lower() in PROMQL_KEYWORDS or following.startswith("("):
            continue
        names.add(token)
    return names


def exposed_names(exposition: str) -> set[str]:
    """Series names a Prometheus text exposition offers, from its ``# TYPE`` lines (so a labelled metric
    that has not been observed yet counts) and its samples."""
    names: set[str] = set()
    for line in exposition.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            if kind in {"histogram", "gaugehistogram"}:
                names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
            elif kind == "summary":
                names |= {name, f"{name}_sum", f"{name}_count"}
            else:
                names.add(name)
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{\s]", line, maxsplit=1)[0])
    return names


def names_used() -> dict[str, list[str]]:
    """Every metric name the rules and the dashboard read (not the rules' own recorded series) -> where."""
    recorded = recorded_names()
    used: dict[str, list[str]] = {}
    for where, exprs in (("rule", rule_exprs()), ("dashboard", dashboard_exprs())):
        for name, expr in exprs.items():
            for metric in metric_names_in(expr) - recorded:
                used.setdefault(metric, []).append(f"{where} {name}")
    return used


def services_exposition() -> str:
    """What the three services' registries expose (the metric modules, as imported by the services)."""
    from prometheus_client import REGISTRY, CollectorRegistry, generate_latest

    import aggregator.customer_refresh
    import aggregator.metrics
    import ingestion.metrics
    import prediction.metrics
    from eta_common.live_accuracy import AccuracyGauges

    assert [aggregator.customer_refresh, aggregator.metrics, ingestion.metrics, prediction.metrics]
    live = CollectorRegistry()
    AccuracyGauges(live)  # the aggregator's live-accuracy gauges (created by its accuracy loop)
    return generate_latest(REGISTRY).decode() + generate_latest(live).decode()


def unexported(exposed: set[str]) -> dict[str, list[str]]:
    """Names used by the rules or the dashboard that neither ``exposed`` nor the allow-list has."""
    known = exposed | set(EXTERNAL_METRICS)
    return {name: where for name, where in names_used().items() if name not in known}


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *args], capture_output=True, text=True, timeout=120, check=False, cwd=cwd
    )


# ------------------------------------------------------------------------------------ the parser ---


def test_metric_name_extraction() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le, stage) (rate(eta_x_seconds_bucket{stage="redis"}[5m]))) '
        '> 1 and on (model_version) eta:rec:max{model_version="all"} offset 5m unless absent(up) '
        "or label_replace(eta_y_total, 'a', '$1', 'b', '(.*)') * 1e3 - foo:bar[10m:1m] > bool 2"
    )
    assert metric_names_in(expr) == {"eta_x_seconds_bucket", "eta:rec:max", "up", "eta_y_total", "foo:bar"}
    text = '# TYPE h histogram\nh_bucket{le="1"} 0\n# TYPE c_total counter\n# TYPE g gauge\ng 1\n'
    assert exposed_names(text) == {"h_bucket", "h_sum", "h_count", "c_total", "g"}


# ------------------------------------------------------------------------------------------ rules ---


def test_one_source_for_the_chart_and_plain_prometheus() -> None:
    assert RULES.resolve() == CHART_DIR / "monitoring" / "rules.yaml"
    assert DASHBOARD.resolve() == CHART_DIR / "monitoring" / "dashboard.json"


@needs_promtool
def test_promtool_check_rules() -> None:
    result = promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules())} rules found" in result.stdout


@needs_promtool
def test_promtool_rule_unit_tests_pass() -> None:
    result = promtool("test", "rules", str(RULE_TESTS.relative_to(MONITORING)), cwd=MONITORING)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_rule_has_a_unit_test() -> None:
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    fired: set[str] = set()
    quiet: set[str] = set()
    exprs: list[str] = []
    for case in tests:
        for alert in case.get("alert_rule_test", []):
            (fired if alert.get("exp_alerts") else quiet).add(alert["alertname"])
        exprs += [t["expr"] for t in case.get("promql_expr_test", [])]
    alerts = {rule["alert"] for rule in rules() if "alert" in rule}
    assert alerts - fired == set(), "alerts never seen firing in a test"
    # a rule that waits (`for:`) or can stay silent is also seen not firing
    assert alerts - quiet == set(), "alerts never seen staying quiet in a test"
    tested = set().union(*(metric_names_in(e) for e in exprs))
    assert recorded_names() - tested == set(), "recording rules without a promql_expr_test"


def test_rules_cover_what_an_operator_pages_for() -> None:
    exprs = " ".join(rule_exprs().values())
    for metric in (
        "eta:freshness_seconds:p99_5m",  # freshness p99 over budget
        "eta:aggregator_consumed_records:rate10m",  # consumer lag growing
        'status="unavailable"',  # ingestion UNAVAILABLE rate
        'status="rejected"',  # ingestion REJECTED rate
        "eta:prediction_fallbacks:ratio_rate5m",  # prediction degraded
        "eta:prediction_shed:ratio_rate5m",  # shed rate
        "eta:prediction_feature_reads:ratio_rate5m",  # reads falling back from ready rows
        "eta_prediction_model_info",  # no model loaded
        "eta:prediction_model_age_seconds",  # model age
        "eta:live_mae_minutes:max",  # live MAE
        "eta:live_interval_coverage_ratio:max",  # interval coverage
        "kube_pod_status_ready",  # pods not ready
    ):
        assert metric in exprs, metric
    for rule in rules():
        if "alert" in rule:
            assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
            assert rule["annotations"]["summary"], rule["alert"]
            assert rule["annotations"]["description"], rule["alert"]


# -------------------------------------------------------------------------------------- dashboard ---


def test_dashboard_shows_what_the_issue_asks_for() -> None:
    board = dashboard()
    assert board["uid"] == "eta-platform"
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    panels = [p for p in _panels(board["panels"]) if p["type"] != "row"]
    assert len({p["id"] for p in _panels(board["panels"])}) == len(list(_panels(board["panels"])))
    for panel in panels:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
    exprs = " ".join(dashboard_exprs().values())
    for needle in (
        "eta_ingestion_publish_seconds_bucket",  # per-hop latency …
        "eta_aggregator_batch_seconds_bucket",
        "eta_prediction_stage_seconds_bucket",
        "eta_aggregator_ingest_to_visible_seconds_bucket",  # freshness
        "eta_aggregator_records_total",  # lag (accepted - consumed)
        "sum by (method, code) (rate(eta_prediction_rpc_seconds_count",  # RPS and errors per RPC
        "sum by (status) (rate(eta_ingestion_events_total",
        "eta_ingestion_calls_refused_total",
        "eta_prediction_fallbacks_total",  # degraded share
        "eta_prediction_feature_reads_total",  # ready rows vs exact fallback
        "eta_aggregator_rows_materialized_total",
        "eta_prediction_model_info",  # model version
        "eta_live_mae_minutes",  # live MAE
        "eta_live_interval_coverage_ratio",  # coverage
    ):
        assert needle in exprs, needle


def test_dashboard_panels_fit_the_grid_without_overlap() -> None:
    taken: dict[tuple[int, int], str] = {}
    for panel in dashboard()["panels"]:
        grid = panel["gridPos"]
        assert 0 <= grid["x"] < grid["x"] + grid["w"] <= 24, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in taken, (panel["title"], taken.get((x, y)))
                taken[(x, y)] = panel["title"]


@needs_promtool
def test_every_query_parses(tmp_path: Path) -> None:
    """promtool parses each dashboard expression as a recording rule (and the rules file itself)."""
    exprs = dashboard_exprs()
    records = [{"record": f"dashboard:query_{i}", "expr": expr} for i, expr in enumerate(exprs.values())]
    generated = tmp_path / "dashboard-queries.yaml"
    generated.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": records}]}))
    result = promtool("check", "rules", str(generated))
    failed = [
        f"{title}: {expr}"
        for i, (title, expr) in enumerate(exprs.items())
        if f"dashboard:query_{i}" in result.stdout + result.stderr
    ]
    assert result.returncode == 0, (failed, result.stdout + result.stderr)
    assert f"SUCCESS: {len(records)} rules found" in result.stdout


@needs_promtool
def test_promtool_rejects_a_broken_query(tmp_path: Path) -> None:
    """Guards the test above: a broken expression must fail promtool."""
    generated = tmp_path / "broken.yaml"
    bad = {"record": "dashboard:broken", "expr": "sum by (le (rate(x[5m]))"}
    generated.write_text(yaml.safe_dump({"groups": [{"name": "x", "rules": [bad]}]}))
    assert promtool("check", "rules", str(generated)).returncode != 0


def test_queries_name_only_metrics_the_services_export() -> None:
    """Offline half of the name check: the services' metric registries (the integration test scrapes the
    running services' /metrics)."""
    assert unexported(exposed_names(services_exposition())) == {}


def test_allow_listed_external_metrics_are_used() -> None:
    assert set(EXTERNAL_METRICS) <= set(names_used())


# ---------------------------------------------------------------------------------------- the chart ---

MONITORING_ON = {
    "prometheusRule": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
    "grafanaDashboard": {
        "enabled": True,
        "labels": {"team": "eta"},
        "annotations": {"grafana_folder": "ETA"},
    },
}


def _find(manifests: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any] | None:
    return next((m for m in manifests if m["kind"] == kind and m["metadata"]["name"] == name), None)


def test_monitoring_objects_are_off_by_default(render: Render) -> None:
    manifests = render("default")["manifests"]
    assert _find(manifests, "PrometheusRule", "eta-platform-rules") is None
    assert _find(manifests, "ConfigMap", "eta-platform-dashboard") is None


@pytest.mark.parametrize("value_set", ["default", "dev", "production"])
def test_prometheus_rule_renders_the_rules_file_verbatim(render: Render, value_set: str) -> None:
    rule = _find(render(value_set, MONITORING_ON)["manifests"], "PrometheusRule", "eta-platform-rules")
    assert rule is not None
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert rule["metadata"]["labels"]["app.kubernetes.io/instance"] == "eta-platform"
    assert rule["spec"] == yaml.safe_load(RULES.read_text())


@pytest.mark.parametrize("value_set", ["default", "dev", "production"])
def test_dashboard_configmap_carries_the_json_for_the_sidecar(render: Render, value_set: str) -> None:
    config = _find(render(value_set, MONITORING_ON)["manifests"], "ConfigMap", "eta-platform-dashboard")
    assert config is not None
    assert config["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert config["metadata"]["labels"]["team"] == "eta"
    assert config["metadata"]["annotations"] == {"grafana_folder": "ETA"}
    assert list(config["data"]) == ["eta-platform.json"]
    assert json.loads(config["data"]["eta-platform.json"]) == dashboard()
    clean = {k: v for k, v in config.items() if not k.startswith("_")}
    kubernetes_validate.validate(clean, "1.33.0", strict=True)


def test_dashboard_configmap_can_go_to_grafanas_namespace(render: Render) -> None:
    overrides = {"grafanaDashboard": {"enabled": True, "namespace": "monitoring"}}
    config = _find(render("default", overrides)["manifests"], "ConfigMap", "eta-platform-dashboard")
    assert config is not None
    assert config["metadata"]["namespace"] == "monitoring"


def test_production_ships_the_dashboard_and_prepares_the_rule_labels(render: Render) -> None:
    production = render("production")
    config = _find(production["manifests"], "ConfigMap", "eta-platform-dashboard")
    assert config is not None
    assert config["metadata"]["labels"]["grafana_dashboard"] == "1"
    values = production["values"]
    assert values["prometheusRule"]["labels"] == values["serviceMonitor"]["labels"]


@pytest.mark.parametrize("value_set_file", [None, "values-dev.yaml", "values-production.yaml"])
def test_helm_lint_strict_with_monitoring_on(value_set_file: str | None) -> None:
    values = helm.values_from_yaml((CHART_DIR / value_set_file).read_text()) if value_set_file else {}
    for key, override in MONITORING_ON.items():
        values[key] = {**values.get(key, {}), **override}
    report = helm.lint(CHART_DIR, values, strict=True, namespace="eta", kube_version="v1.33.0")
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


@pytest.mark.parametrize(
    "bad_values",
    [
        {"prometheusRule": {"enabled": "yes"}},
        {"prometheusRule": {"enabled": True, "lables": {}}},
        {"grafanaDashboard": {"enabled": True, "labels": {"grafana_dashboard": 1}}},
        {"telemetry": {"samplerArg": "2"}},
        {"telemetry": {"samplerArg": 1.5}},
        {"telemetry": {"samplerArg": "five percent"}},
    ],
)
def test_values_schema_rejects_bad_monitoring_values(chart: helm.Chart, bad_values: dict[str, Any]) -> None:
    with pytest.raises(helm.HelmValuesError):
        chart.validate_schema(bad_values)


# ---------------------------------------------------------------------------------------- sampling ---


@pytest.mark.parametrize(
    ("value_set", "sampler", "ratio"),
    [
        ("default", "parentbased_traceidratio", 0.05),
        ("production", "parentbased_traceidratio", 0.05),
        ("dev", "parentbased_traceidratio", 1.0),  # every event's journey findable in Jaeger
    ],
)
def test_trace_sampling_per_value_set(render: Render, value_set: str, sampler: str, ratio: float) -> None:
    config = _find(render(value_set)["manifests"], "ConfigMap", "eta-platform-config")
    assert config is not None
    assert config["data"]["OTEL_TRACES_SAMPLER"] == sampler
    assert float(config["data"]["OTEL_TRACES_SAMPLER_ARG"]) == ratio


# ----------------------------------------------------------------------------- make run's Prometheus ---


@needs_promtool
def test_make_run_prometheus_config_is_valid(tmp_path: Path) -> None:
    from devstack.infra import RULES_FILE, prometheus_config

    assert RULES_FILE == RULES
    config = tmp_path / "prometheus.yml"
    config.write_text(prometheus_config({"eta-ingestion": 9101, "eta-prediction": 9103}, RULES_FILE, 5))
    result = promtool("check", "config", str(config))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout
    assert str(RULES_FILE) in result.stdout
