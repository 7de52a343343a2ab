"""A thin, typed wrapper over the ``docker`` CLI for the image test (no Python Docker SDK needed).

Every container it starts carries the label ``eta-image-test=<run id>``; ``remove_all()`` removes them by
that label, so nothing is left behind whatever failed. Containers run the way the chart runs them: the
image's own (non-root) user, read-only root filesystem with a tmpfs at /tmp (the chart's emptyDir), all
capabilities dropped, no privilege escalation, host network (the daemon here has no bridge).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["HARDENING", "LABEL", "Container", "Docker", "DockerError", "docker_unavailable_reason"]

LABEL = "eta-image-test"
# What the chart's securityContext amounts to on a plain Docker engine.
HARDENING: tuple[str, ...] = (
    "--read-only",
    "--tmpfs=/tmp:rw,nosuid,nodev,size=256m",
    "--cap-drop=ALL",
    "--security-opt=no-new-privileges",
    "--network=host",
)


class DockerError(RuntimeError):
    pass


def docker_unavailable_reason() -> str | None:
    """None when a Docker daemon answers; otherwise why not (for a skip or failure message)."""
    binary = shutil.which("docker")
    if binary is None:
        return "no docker CLI on PATH (as root, ../shared/tools/docker-up installs and starts Docker)"
    try:
        probe = subprocess.run(
            [binary, "info", "--format", "{{.ServerVersion}}"],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return "the Docker daemon did not answer `docker info` within 20 s"
    if probe.returncode != 0:
        detail = (probe.stderr or probe.stdout).strip().splitlines()
        return f"the Docker daemon is not reachable: {detail[-1] if detail else 'docker info failed'}"
    return None


@dataclass
class Container:
    name: str
    docker: Docker

    def state(self) -> dict[str, Any]:
        state: dict[str, Any] = self.docker.inspect(self.name)["State"]
        return state

    def running(self) -> bool:
        return bool(self.state().get("Running"))

    def logs(self, tail: int | None = None) -> str:
        args = ["logs"] + ([f"--tail={tail}"] if tail else []) + [self.name]
        result = self.docker.run(args, check=False)
        return result.stdout + result.stderr

    def exec(self, *argv: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return self.docker.run(["exec", self.name, *argv], check=False, timeout=timeout)

    def stop(self, timeout: int = 10) -> int:
        """SIGTERM, then SIGKILL after ``timeout`` s (like a pod deletion); returns the exit code."""
        self.docker.run(["stop", f"--time={timeout}", self.name], timeout=timeout + 30)
        return int(self.state()["ExitCode"])


@dataclass
class Docker:
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    binary: str = field(default_factory=lambda: shutil.which("docker") or "docker")
    containers: list[Container] = field(default_factory=list)

    def run(
        self, args: Sequence[str], *, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [self.binary, *args], capture_output=True, text=True, timeout=timeout, check=False
        )
        if check and result.returncode != 0:
            raise DockerError(
                f"docker {' '.join(args[:3])} … failed ({result.returncode}): "
                f"{(result.stderr or result.stdout)[-3000:]}"
            )
        return result

    def inspect(self, name: str) -> dict[str, Any]:
        info: list[dict[str, Any]] = json.loads(self.run(["inspect", name]).stdout)
        return info[0]

    def image_id(self, tag: str) -> str | None:
        result = self.run(["image", "inspect", "--format", "{{.Id}}", tag], check=False)
        return result.stdout.strip() if result.returncode == 0 else None

    def remove_replaced(self, previous: Mapping[str, str | None]) -> None:
        """Remove the images a rebuild took the tags from (``{tag: id before}``), so that repeated runs do
        not pile up untagged images; an image still in use stays."""
        for tag, old_id in previous.items():
            if old_id and old_id != self.image_id(tag):
                self.run(["rmi", old_id], check=False)

    def build(
        self,
        context: Path,
        tag: str,
        *,
        build_args: Mapping[str, str],
        log_path: Path,
        timeout: float,
        target: str | None = None,
    ) -> float:
        """``docker build`` (host network: RUN steps reach PyPI through it); returns the seconds taken.
        The full build log goes to ``log_path``; a failure raises with its tail."""
        argv = [self.binary, "build", "--network=host", "--tag", tag]
        if target:
            argv += ["--target", target]
        for key, value in build_args.items():
            argv += ["--build-arg", f"{key}={value}"]
        argv.append(str(context))
        started = time.monotonic()
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("w") as log:
            proc = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, timeout=timeout, check=False)
        if proc.returncode != 0:
            tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-60:])
            raise DockerError(f"docker build failed ({proc.returncode}); last lines of {log_path}:\n{tail}")
        return time.monotonic() - started

    def _name(self, role: str) -> str:
        return f"eta-image-test-{self.run_id}-{role}"

    def _run_argv(self, name: str, image: str, env: Mapping[str, str], command: Sequence[str]) -> list[str]:
        argv = ["run", "--name", name, "--label", f"{LABEL}={self.run_id}", *HARDENING]
        for key, value in env.items():
            argv += ["--env", f"{key}={value}"]
        return [*argv, image, *command]

    def start(
        self, role: str, image: str, command: Sequence[str], env: Mapping[str, str] | None = None
    ) -> Container:
        """A detached, long-running container (a service)."""
        name = self._name(role)
        container = Container(name, self)
        self.containers.append(container)
        self.run(["run", "--detach", *self._run_argv(name, image, env or {}, command)[1:]])
        return container

    def run_to_completion(
        self,
        role: str,
        image: str,
        command: Sequence[str],
        env: Mapping[str, str] | None = None,
        *,
        timeout: float = 600,
    ) -> str:
        """A run-to-completion container (a Job: migrate, seed, train); returns its output, raises with
        it when the exit code is not 0. The container is removed afterwards."""
        name = self._name(role)
        container = Container(name, self)
        self.containers.append(container)
        try:
            result = self.run(self._run_argv(name, image, env or {}, command), check=False, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise DockerError(
                f"{' '.join(command)} did not finish within {timeout:.0f} s; output:\n"
                f"{container.logs(tail=80)}"
            ) from exc
        output = result.stdout + result.stderr
        if result.returncode != 0:
            raise DockerError(
                f"{' '.join(command)} exited with {result.returncode}; output:\n{output[-4000:]}"
            )
        self.run(["rm", "--force", name], check=False)
        self.containers.remove(container)
        return output

    def remove_all(self) -> list[str]:
        """Force-remove every container of this run (found by label, so also half-started ones)."""
        listed = self.run(["ps", "--all", "--quiet", "--filter", f"label={LABEL}={self.run_id}"], check=False)
        ids = listed.stdout.split()
        if ids:
            self.run(["rm", "--force", *ids], check=False)
        self.containers.clear()
        return ids
