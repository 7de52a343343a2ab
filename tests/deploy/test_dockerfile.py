"""Static checks of the root Dockerfile and .dockerignore (no Docker engine needed).

The image itself is built and run by tests/image (`make image-test`).
"""

from __future__ import annotations

import fnmatch
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO_ROOT / "Dockerfile"


@dataclass
class Stage:
    base: str
    name: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]


def _parse(text: str) -> tuple[dict[str, str], list[Stage]]:
    """Tiny Dockerfile parser: joins continuation lines, drops comments, splits stages at FROM."""
    logical: list[str] = []
    buffer = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not buffer and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            buffer += line[:-1] + " "
            continue
        logical.append(buffer + line)
        buffer = ""
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        rest = rest.strip()
        if keyword == "FROM":
            parts = rest.split()
            base = parts[0]
            for name, value in args.items():
                base = base.replace(f"${{{name}}}", value)
            stage_name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else str(len(stages))
            stages.append(Stage(base=base, name=stage_name))
        elif keyword == "ARG" and not stages:
            name, _, default = rest.partition("=")
            args[name] = default
        elif stages:
            stages[-1].instructions.append((keyword, rest))
    return args, stages


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    _, parsed = _parse(DOCKERFILE.read_text(encoding="utf-8"))
    return parsed


@pytest.fixture(scope="module")
def final(stages: list[Stage]) -> Stage:
    return stages[-1]


def _env(stage: Stage) -> dict[str, str]:
    env: dict[str, str] = {}
    for args in stage.all("ENV"):
        for token in shlex.split(args):
            key, _, value = token.partition("=")
            env[key] = value
    return env


def test_multi_stage_on_a_pinned_slim_python(stages: list[Stage]) -> None:
    assert len(stages) >= 2
    for stage in stages:
        assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm(@sha256:[0-9a-f]{64})?", stage.base), stage.base
    assert len({s.base for s in stages}) == 1, (
        "builder and runtime must share the interpreter the venv links to"
    )


def test_builder_generates_protos_before_installing(stages: list[Stage]) -> None:
    builder = stages[0]
    runs = " && ".join(builder.all("RUN"))
    assert "grpc_tools.protoc -Iprotos --python_out=services --grpc_python_out=services" in runs
    assert "protos/eta/v1/*.proto" in runs
    assert "touch services/eta/__init__.py services/eta/v1/__init__.py" in runs
    assert runs.index("grpc_tools.protoc") < runs.index("pip install --no-deps .")
    copied = " ".join(builder.all("COPY"))
    for source in ("pyproject.toml", "protos/", "services/"):
        assert source in copied


def test_runtime_copies_only_the_venv_from_the_builder(stages: list[Stage], final: Stage) -> None:
    copies = final.all("COPY")
    assert copies == [f"--from={stages[0].name} /opt/venv /opt/venv"]
    runs = " ".join(final.all("RUN"))
    for tool in ("grpcio-tools", "grpc_tools", "build-essential", "gcc", "pip install"):
        assert tool not in runs, tool
    assert "rm -rf /var/lib/apt/lists/*" in runs


def test_runtime_runs_as_numeric_non_root_user(final: Stage) -> None:
    users = final.all("USER")
    assert users, "final stage must set USER"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit()
    assert int(uid) == 10001
    assert not gid or int(gid) == 10001
    assert "--uid 10001" in " ".join(final.all("RUN"))


def test_runtime_environment_has_no_secrets(final: Stage) -> None:
    env = _env(final)
    assert env["PYTHONUNBUFFERED"] == "1"
    assert env["PATH"].startswith("/opt/venv/bin")
    for key, value in env.items():
        assert not re.search(r"(?i)password|secret|token|database_url|redis_url|kafka", key), key
        assert "://" not in value, key


def test_no_fixed_entrypoint(final: Stage) -> None:
    """The chart chooses the program per workload with `command:`."""
    assert not final.all("ENTRYPOINT")


def test_exposed_ports_match_the_chart(final: Stage, render: Callable[..., dict[str, Any]]) -> None:
    exposed = {int(p) for args in final.all("EXPOSE") for p in args.split()}
    components = render("default")["values"]["components"]
    expected = {c["grpcPort"] for c in components.values()} | {c["metricsPort"] for c in components.values()}
    assert exposed == expected


def test_dockerignore_keeps_the_context_small_and_clean() -> None:
    patterns = {
        line.strip()
        for line in (REPO_ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    }
    for required in (
        ".venv",
        ".git",
        ".run",
        "services/eta",
        "**/__pycache__",
        ".pytest_cache",
        ".mypy_cache",
    ):
        assert required in patterns, required
    # What the build needs must not be ignored.
    for needed in ("pyproject.toml", "protos", "services", "README.md"):
        assert needed not in patterns, needed
    if "*.md" in patterns:
        assert "!README.md" in patterns


def _dockerignore_patterns() -> set[str]:
    return {
        line.strip()
        for line in (REPO_ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    }


def _entry_point_filter(builder: Stage) -> str:
    """The Python the builder runs (``python -c '…'``) to drop entry points of packages left out."""
    for args in builder.all("RUN"):
        argv = shlex.split(args)
        if argv[:2] == ["python", "-c"] and "project" in argv[2] and "scripts" in argv[2]:
            return argv[2]
    raise AssertionError("the builder has no step that drops the entry points of left-out packages")


def _image_entry_points(stages: list[Stage], tmp_path: Path) -> set[str]:
    """Runs the builder's entry-point filter on a copy of the build context's pyproject.toml and
    services/ (as .dockerignore lets them through) and returns the console scripts that remain."""
    ignored = _dockerignore_patterns()
    context = tmp_path / "context"
    (context / "services").mkdir(parents=True)
    shutil.copy(REPO_ROOT / "pyproject.toml", context / "pyproject.toml")
    for package in (REPO_ROOT / "services").iterdir():
        relative = f"services/{package.name}"
        if package.is_dir() and not any(fnmatch.fnmatch(relative, p) for p in ignored):
            (context / relative).mkdir()
    subprocess.run(
        [sys.executable, "-c", _entry_point_filter(stages[0])],
        cwd=context,
        check=True,
        capture_output=True,
    )
    scripts: dict[str, str] = tomllib.loads((context / "pyproject.toml").read_text())["project"]["scripts"]
    for target in scripts.values():  # every remaining entry point's module is in the context
        module = target.partition(":")[0]
        assert (context / "services" / module.partition(".")[0]).is_dir(), target
    return set(scripts)


def _pyproject_scripts() -> set[str]:
    scripts: dict[str, str] = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    return set(scripts)


def test_image_entry_points_are_exactly_what_the_chart_runs(
    stages: list[Stage],
    tmp_path: Path,
    render: Callable[..., dict[str, Any]],
    workloads_of: Callable[[list[dict[str, Any]]], list[dict[str, Any]]],
) -> None:
    """No development-only entry point (eta-devstack, eta-trace-report) in the image, and none the chart
    needs is missing. tests/image checks the built image itself (`make image-test`)."""
    commands = {
        container["command"][0]
        for value_set in ("default", "dev", "production")
        for workload in workloads_of(render(value_set)["manifests"])
        for container in workload["containers"]
        if container.get("command")
    }
    chart_entry_points = commands & _pyproject_scripts()
    assert chart_entry_points >= {"eta-ingestion", "eta-aggregator", "eta-prediction", "eta-migrate"}
    entry_points = _image_entry_points(stages, tmp_path)
    assert entry_points == chart_entry_points
    assert {"eta-devstack", "eta-trace-report"} <= _pyproject_scripts() - entry_points


def test_development_only_code_and_dependencies_stay_out(stages: list[Stage]) -> None:
    ignored = _dockerignore_patterns()
    assert "services/devstack" in ignored  # make run's local stack, the trace report
    assert "services/*/tests" in ignored
    builder_runs = " && ".join(stages[0].all("RUN"))
    installs = re.findall(r"/opt/venv/bin/pip install ([^&]*)", builder_runs)
    assert installs
    for args in installs:  # never the [dev] or [local] extras (pytest, linters, embedded servers)
        assert "[" not in args, args
    assert "grpcio-tools" not in " ".join(installs)  # codegen has its own throw-away venv
    assert "/opt/venv/bin/pip uninstall --yes wheel" in builder_runs
