"""One way to make a redis-py client from ``REDIS_URL``, for every service: a single Redis or a Redis Cluster.

``REDIS_URL`` may name a standalone Redis or **any node of a Redis Cluster**: :func:`redis_from_url` asks
the node (``INFO cluster``) and returns :class:`redis.asyncio.cluster.RedisCluster` when it says
``cluster_enabled:1`` — the client discovers the other nodes and the slot map from that one node,
routes each command to the node serving its key's slot, follows ``MOVED``/``ASK`` and sends a pipeline's
commands grouped by node. Nothing else changes for callers: every key the services use carries a hash
tag (``rst:{R}``, ``drv:{city}``, ``eta:rows:{city:b}``, ``cust:{C}``), so each command and each script
call touches one slot. ``SCRIPT LOAD`` goes to every primary (redis-py's cluster routing), so ``EVALSHA``
works on whichever node serves the keys; ``FLUSHALL``/``SCAN`` likewise span every primary. The cluster
client raises "no node reachable" and "cluster down" as ``redis.exceptions.ConnectionError``, as a single
Redis does when it is down, so the services' outage handling (wait, retry, degrade) applies unchanged.

The answer is asked once per URL and process, when the first client is made (a synchronous round trip
bounded by ``detect_timeout``). If the node cannot be reached then, the redis-py client is a standalone
one and a warning says so: a cluster would answer its commands with ``MOVED`` (errors the services treat
as Redis errors) until the process restarts, so deployments on a cluster should set
``REDIS_CLUSTER=true`` (``false`` for a standalone Redis), which skips the check. The prediction
service's hand-written client (``prediction.redis_client.lean_from_url``) makes the same check and, when
it cannot, uses its cluster client, which also works on a standalone Redis.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, cast

import redis
import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterPipeline, RedisCluster
from redis.exceptions import ClusterDownError, RedisClusterException
from redis.exceptions import ConnectionError as RedisConnectionError

from eta_common.config import env_str

__all__ = ["cluster_mode", "is_cluster", "redis_from_url", "sync_redis_from_url"]

log = logging.getLogger(__name__)

_DETECTED: dict[str, bool] = {}
_LOCK = threading.Lock()


def is_cluster(url: str, *, detect_timeout: float = 2.0) -> bool:
    """Whether ``url`` names a node of a Redis Cluster (asked once per URL and process; ``REDIS_CLUSTER``
    true/false overrides); a node that cannot be asked counts as standalone (see :func:`cluster_mode`)."""
    return cluster_mode(url, detect_timeout=detect_timeout) is True


def cluster_mode(url: str, *, detect_timeout: float = 2.0) -> bool | None:
    """True for a node of a Redis Cluster, False for a standalone Redis, None when the node cannot be
    asked now (not remembered: the next call asks again). ``REDIS_CLUSTER`` true/false overrides."""
    forced = env_str("REDIS_CLUSTER", "auto").strip().lower()
    if forced in {"1", "true", "yes", "on"}:
        return True
    if forced in {"0", "false", "no", "off"}:
        return False
    with _LOCK:
        known = _DETECTED.get(url)
        if known is not None:
            return known
        timeouts = {"socket_connect_timeout": detect_timeout, "socket_timeout": detect_timeout}
        client = redis.Redis.from_url(url, **timeouts)
        try:
            info = client.info("cluster")
        except redis.RedisError as exc:
            log.warning(
                "cannot ask Redis whether it is a cluster node (set REDIS_CLUSTER to say)",
                extra={"error": repr(exc)},
            )
            return None
        finally:
            client.close()
        found = str(dict(info).get("cluster_enabled", 0)) == "1"
        _DETECTED[url] = found
        if found:
            log.info("REDIS_URL names a Redis Cluster node; using the cluster client")
        return found


def redis_from_url(url: str, *, cluster: bool | None = None, **kwargs: Any) -> aioredis.Redis:
    """An asyncio client for ``url``: :class:`redis.asyncio.Redis`, or :class:`RedisCluster` when the node
    is in cluster mode (``cluster`` overrides the check). ``kwargs`` go to ``from_url`` (connection
    timeouts, ``decode_responses``, ``retry``). The cluster client is typed as ``Redis``: it offers the
    same commands and pipelines the services use."""
    if cluster is None:
        cluster = is_cluster(url)
    if not cluster:
        return aioredis.Redis.from_url(url, **kwargs)
    kwargs.pop("retry", None)  # a per-node retry policy is not the cluster client's (it retries by itself)
    return cast(aioredis.Redis, _Cluster.from_url(_cluster_url(url), **kwargs))


def _unreachable(exc: Exception) -> RedisConnectionError:
    return RedisConnectionError(f"Redis Cluster: {exc}")


class _Cluster(RedisCluster):
    """redis-py's cluster client, with its "no node reachable" / "cluster down" failures raised as
    ``redis.exceptions.ConnectionError`` — what the services already treat as Redis being unavailable
    (retry, wait, degrade). redis-py raises them as ``RedisClusterException`` (not a ``RedisError``) and
    ``ClusterDownError`` (a ``ResponseError``), which would otherwise end the aggregator's loops."""

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().execute_command(*args, **kwargs)
        except (RedisClusterException, ClusterDownError) as exc:
            raise _unreachable(exc) from exc

    def pipeline(self, transaction: Any | None = None, shard_hint: Any | None = None) -> ClusterPipeline:
        pipe = super().pipeline(transaction, shard_hint)
        execute = pipe.execute

        async def execute_translated(
            raise_on_error: bool = True, allow_redirections: bool = True
        ) -> list[Any]:
            try:
                return await execute(raise_on_error, allow_redirections)
            except (RedisClusterException, ClusterDownError) as exc:
                raise _unreachable(exc) from exc

        pipe.execute = execute_translated  # type: ignore[method-assign]
        return pipe


def sync_redis_from_url(url: str, *, cluster: bool | None = None, **kwargs: Any) -> redis.Redis:
    """The blocking counterpart (tools, benchmarks)."""
    if cluster is None:
        cluster = is_cluster(url)
    if not cluster:
        return redis.Redis.from_url(url, **kwargs)
    return cast(redis.Redis, redis.RedisCluster.from_url(_cluster_url(url), **kwargs))


def _cluster_url(url: str) -> str:
    """A cluster has one database: drop a ``/0`` path (redis-py's cluster client refuses any db)."""
    head, sep, tail = url.rpartition("/")
    if sep and "://" in head and tail.split("?")[0] in ("", "0"):
        query = tail.partition("?")[2]
        return head + ("?" + query if query else "")
    return url
