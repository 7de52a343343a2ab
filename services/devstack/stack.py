"""The whole system as local processes: infrastructure (or existing endpoints) plus the three services.

Used by ``make run`` (fixed, documented ports) and by the integration tests (free ports, temp dirs).
Existing servers are used instead of embedded ones when ``KAFKA_BOOTSTRAP_SERVERS``, ``REDIS_URL`` or
``DATABASE_URL`` are set. ``redis_cluster=True`` starts a local Redis Cluster of 3 primaries instead of one
Redis (``make run`` with ``--redis-cluster``; the integration tests with ``--redis-mode=cluster``); the
services get the first node's URL and discover the rest.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from devstack.infra import (
    ChildProcess,
    RedisServer,
    free_port,
    start_broker,
    start_postgres,
    start_redis,
    start_redis_cluster,
    wait_for_port,
)

__all__ = ["SERVICES", "LocalStack", "ServicePorts"]

log = logging.getLogger(__name__)

# service name → (python module, default gRPC port, default metrics port)
SERVICES: dict[str, tuple[str, int, int]] = {
    "ingestion": ("ingestion", 50051, 9101),
    "aggregator": ("aggregator", 50052, 9102),
    "prediction": ("prediction", 50053, 9103),
}


@dataclass
class ServicePorts:
    grpc: dict[str, int]
    metrics: dict[str, int]

    @classmethod
    def defaults(cls) -> ServicePorts:
        return cls({n: p for n, (_, p, _) in SERVICES.items()}, {n: m for n, (_, _, m) in SERVICES.items()})

    @classmethod
    def free(cls) -> ServicePorts:
        return cls({n: free_port() for n in SERVICES}, {n: free_port() for n in SERVICES})


@dataclass
class LocalStack:
    workdir: Path
    ports: ServicePorts = field(default_factory=ServicePorts.defaults)
    infra_ports: dict[str, int | None] = field(default_factory=dict)
    use_env_endpoints: bool = True
    extra_env: dict[str, str] = field(default_factory=dict)
    redis_cluster: bool = False
    processes: list[ChildProcess] = field(default_factory=list)
    kafka: str = ""
    redis_url: str = ""
    redis: RedisServer | None = None  # the Redis (or Redis Cluster) we started, if any
    database_url: str = ""

    @property
    def log_dir(self) -> Path:
        return self.workdir / "logs"

    def start_infra(self) -> None:
        env = os.environ if self.use_env_endpoints else {}
        self.kafka = env.get("KAFKA_BOOTSTRAP_SERVERS", "")
        if not self.kafka:
            broker = start_broker(self.log_dir, self.infra_ports.get("kafka"))
            self.processes.append(broker)
            self.kafka = broker.url
        self.redis_url = env.get("REDIS_URL", "")
        if not self.redis_url:
            port = self.infra_ports.get("redis")
            if self.redis_cluster:
                ports = [port, port + 1, port + 2] if port else None
                cluster = start_redis_cluster(self.workdir / "redis", self.log_dir, ports)
                self.processes.extend(cluster.nodes)
                self.redis = cluster
            else:
                self.redis = start_redis(self.workdir / "redis", self.log_dir, port)
                self.processes.append(self.redis)
            self.redis_url = self.redis.url
        self.database_url = env.get("DATABASE_URL", "")
        if not self.database_url:
            pg = start_postgres(self.workdir / "pgdata", self.log_dir, self.infra_ports.get("postgres"))
            self.processes.append(pg)
            self.database_url = pg.url
        log.info(
            "infrastructure up",
            extra={"kafka": self.kafka, "redis": self.redis_url, "database": self.database_url},
        )

    def env(self) -> dict[str, str]:
        """Environment for our processes (services, simulator, trainer)."""
        env = dict(os.environ)
        env.update(
            {
                "KAFKA_BOOTSTRAP_SERVERS": self.kafka,
                "REDIS_URL": self.redis_url,
                "DATABASE_URL": self.database_url,
                "PYTHONUNBUFFERED": "1",
            }
        )
        env.update(self.extra_env)
        return env

    def target(self, service: str) -> str:
        return f"127.0.0.1:{self.ports.grpc[service]}"

    def start_service(
        self,
        name: str,
        *,
        extra_env: dict[str, str] | None = None,
        instance: str | None = None,
        grpc_port: int | None = None,
        metrics_port: int | None = None,
    ) -> ChildProcess:
        """Start one service process and wait for its gRPC port. ``instance`` names a second replica
        (with its own ports), e.g. a second aggregator in the same consumer group."""
        module, _, _ = SERVICES[name]
        grpc_port = grpc_port or (free_port() if instance else self.ports.grpc[name])
        metrics_port = metrics_port or (free_port() if instance else self.ports.metrics[name])
        label = f"{name}-{instance}" if instance else name
        env = self.env()
        env.update(
            {
                "GRPC_PORT": str(grpc_port),
                "METRICS_PORT": str(metrics_port),
                "OTEL_SERVICE_NAME": f"eta-{name}",
            }
        )
        env.update(extra_env or {})
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{label}.log"
        with open(log_path, "ab") as out:  # the child keeps its own copy of the descriptor
            proc = subprocess.Popen(
                [sys.executable, "-m", module],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        child = ChildProcess(
            label, proc, f"127.0.0.1:{grpc_port}", grpc_port, log_path, {"metrics_port": str(metrics_port)}
        )
        self.processes.append(child)
        try:
            wait_for_port(grpc_port, timeout=60, proc=proc, what=f"eta-{label}")
        except (RuntimeError, TimeoutError) as exc:
            raise RuntimeError(f"{exc}; see {log_path}:\n{log_path.read_text()[-3000:]}") from exc
        return child

    def start_services(self) -> None:
        for name in SERVICES:
            self.start_service(name)

    def stop(self) -> None:
        """Stop everything we started, services first (they drain), then infrastructure."""
        for child in reversed(self.processes):
            try:
                child.stop()
            except Exception:
                log.exception("failed to stop", extra={"process": child.name})
        self.processes.clear()
