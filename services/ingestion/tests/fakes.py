"""In-memory stand-ins for the unit tests: a Kafka producer whose acks the test controls, and the few
Redis commands the dedup store uses (SET NX/PX, GET, DEL in non-transactional pipelines)."""

from __future__ import annotations

import asyncio
import hashlib
import time
from dataclasses import dataclass, field
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError


@dataclass
class Meta:
    topic: str
    partition: int
    offset: int


@dataclass
class Record:
    topic: str
    value: bytes
    key: bytes | None
    headers: list[tuple[str, bytes]]
    future: asyncio.Future[Meta]
    partition: int | None = None


@dataclass
class FakeProducer:
    """``mode``: "ack" resolves each record's future at once, "hold" leaves it pending (the test resolves
    it), "fail" fails it, "refuse" raises from ``send`` itself (like a full buffer)."""

    mode: str = "ack"
    records: list[Record] = field(default_factory=list)
    # ``client.cluster.partitions_for_topic(topic)``; the default knows no topic (the producer picks).
    client: Any = None

    async def send(
        self,
        topic: str,
        value: bytes,
        key: bytes | None = None,
        partition: int | None = None,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> asyncio.Future[Meta]:
        await asyncio.sleep(0)
        if self.mode == "refuse":
            raise TimeoutError("buffer full")
        future: asyncio.Future[Meta] = asyncio.get_running_loop().create_future()
        self.records.append(Record(topic, value, key, list(headers or ()), future, partition))
        if self.mode == "ack":
            self.ack(self.records[-1])
        elif self.mode == "fail":
            future.set_exception(ConnectionResetError("broker went away"))
        return future

    def __post_init__(self) -> None:
        if self.client is None:
            cluster = type("Cluster", (), {"partitions_for_topic": staticmethod(lambda topic: None)})()
            self.client = type("Client", (), {"cluster": cluster})()

    def ack(self, record: Record) -> None:
        if not record.future.done():
            record.future.set_result(Meta(record.topic, 0, self.records.index(record)))

    def ack_all(self) -> None:
        for record in self.records:
            self.ack(record)


class FakeRedis:
    """The dedup store's Redis: its two scripts (by SHA, emulated in Python), SCRIPT LOAD, and SET/GET/DEL
    with expiry, through ``pipeline(transaction=False)``."""

    def __init__(self) -> None:
        self.data: dict[str, tuple[bytes, float | None]] = {}
        self.scripts: dict[str, str] = {}
        self.down = False

    async def script_load(self, source: str) -> str:
        if self.down:
            raise RedisConnectionError("redis is down")
        sha = hashlib.sha1(source.encode()).hexdigest()
        self.scripts[sha] = source
        return sha

    def _set(self, key: str, value: bytes, px: int | None) -> None:
        self.data[key] = (value, None if px is None else time.monotonic() + px / 1000)

    def _get(self, key: str) -> bytes | None:
        entry = self.data.get(key)
        if entry is None:
            return None
        value, expires = entry
        if expires is not None and time.monotonic() >= expires:
            del self.data[key]
            return None
        return value

    def pipeline(self, transaction: bool = True) -> _Pipeline:
        assert not transaction
        return _Pipeline(self)


class _Pipeline:
    def __init__(self, redis: FakeRedis) -> None:
        self._redis = redis
        self._ops: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []

    def set(self, key: str, value: bytes, *, nx: bool = False, px: int | None = None) -> None:
        self._ops.append(("set", (key, value), {"nx": nx, "px": px}))

    def get(self, key: str) -> None:
        self._ops.append(("get", (key,), {}))

    def delete(self, *keys: str) -> None:
        self._ops.append(("delete", keys, {}))

    def evalsha(self, sha: str, numkeys: int, *keys_and_args: Any) -> None:
        self._ops.append(("evalsha", (sha, numkeys, *keys_and_args), {}))

    def _script(self, sha: str, numkeys: int, *keys_and_args: Any) -> Any:
        from ingestion import dedup

        source = self._redis.scripts.get(sha)
        if source is None:
            raise NoScriptError("No matching script")
        prefix, args = str(keys_and_args[0]), [str(a) for a in keys_and_args[numkeys:]]
        assert numkeys == 1
        redis = self._redis

        def ids(joined: str) -> list[str]:
            return [f"{prefix}:{event_id}" for event_id in joined.split("\n") if event_id]

        if source == dedup._CLAIM:
            out = ""
            for key in ids(args[1]):
                if redis._get(key) is None:
                    redis._set(key, b"p", int(args[0]))
                    out += "0"
                else:
                    out += "1" if redis._get(key) == b"a" else "2"
            return out.encode()
        assert source == dedup._SETTLE
        for key in ids(args[1]):
            redis._set(key, b"a", int(args[0]))
        for key in ids(args[2]):
            redis.data.pop(key, None)
        return 1

    async def execute(self) -> list[Any]:
        await asyncio.sleep(0)
        if self._redis.down:
            raise RedisConnectionError("redis is down")
        out: list[Any] = []
        for op, args, kwargs in self._ops:
            if op == "evalsha":
                out.append(self._script(*args))
            elif op == "set":
                key, value = args
                if kwargs["nx"] and self._redis._get(key) is not None:
                    out.append(None)
                    continue
                px = kwargs["px"]
                self._redis.data[key] = (value, None if px is None else time.monotonic() + px / 1000)
                out.append(True)
            elif op == "get":
                out.append(self._redis._get(args[0]))
            else:
                out.append(sum(self._redis.data.pop(k, None) is not None for k in args))
        return out
