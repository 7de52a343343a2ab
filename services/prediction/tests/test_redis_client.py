"""The lean RESP client's wire format and reply matching (no server needed; parity with redis-py on a real
Redis is in tests/integration/test_prediction_serving.py)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from redis.exceptions import BusyLoadingError, NoScriptError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError

from prediction.redis_client import LeanRedis, _Incomplete, _RespProtocol, encode_commands, parse_reply


def test_commands_are_encoded_as_arrays_of_bulk_strings() -> None:
    payload = encode_commands([("EVALSHA", "abc", 2, "k{1}", 1.5, b"\x00raw"), ("HMGET", "h", "ü")])
    assert payload == (
        b"*6\r\n$7\r\nEVALSHA\r\n$3\r\nabc\r\n$1\r\n2\r\n$4\r\nk{1}\r\n$3\r\n1.5\r\n$4\r\n\x00raw\r\n"
        b"*3\r\n$5\r\nHMGET\r\n$1\r\nh\r\n$2\r\n\xc3\xbc\r\n"
    )


@pytest.mark.parametrize("bad", [True, None])
def test_values_redis_cannot_hold_are_refused(bad: Any) -> None:
    with pytest.raises(TypeError):
        encode_commands([("SET", "k", bad)])


def test_every_reply_type_is_parsed() -> None:
    buf = b"*5\r\n:42\r\n$3\r\nabc\r\n$-1\r\n*2\r\n$1\r\nx\r\n:-7\r\n+OK\r\n-NOSCRIPT No matching script\r\n"
    value, pos = parse_reply(buf, 0)
    assert value == [42, b"abc", None, [b"x", -7], b"OK"]
    error, end = parse_reply(buf, pos)
    assert isinstance(error, NoScriptError)
    assert end == len(buf)


def test_error_replies_map_to_redis_py_exceptions() -> None:
    loading, _ = parse_reply(b"-LOADING Redis is loading\r\n", 0)
    wrongtype, _ = parse_reply(b"-WRONGTYPE Operation against a key\r\n", 0)
    assert isinstance(loading, BusyLoadingError)
    assert isinstance(wrongtype, ResponseError)
    assert "WRONGTYPE" in str(wrongtype)


def test_a_null_array_and_an_empty_array_differ() -> None:
    assert parse_reply(b"*-1\r\n", 0) == (None, 5)
    assert parse_reply(b"*0\r\n", 0) == ([], 4)


@pytest.mark.parametrize("cut", range(1, 28))
def test_a_reply_cut_anywhere_is_incomplete(cut: int) -> None:
    whole = b"*3\r\n$5\r\nhello\r\n:1\r\n$2\r\nhi\r\n"
    assert parse_reply(whole, 0)[0] == [b"hello", 1, b"hi"]
    if cut < len(whole):
        with pytest.raises(_Incomplete):
            parse_reply(whole[:cut], 0)


class _Transport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written: list[bytes] = []
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True


def _protocol(parser: str) -> _RespProtocol:
    protocol = _RespProtocol()
    if parser == "python":
        protocol._reader = None  # what runs where hiredis is not installed
    return protocol


@pytest.mark.parametrize("parser", ["hiredis", "python"])
async def test_replies_split_across_reads_reach_their_pipelines_in_order(parser: str) -> None:
    protocol = _protocol(parser)
    protocol.connection_made(_Transport())
    first = protocol.send(b"...", 2)
    second = protocol.send(b"...", 1)
    stream = b":1\r\n$5\r\nhello\r\n*2\r\n$1\r\na\r\n$-1\r\n"
    for i in range(0, len(stream), 3):  # three bytes at a time
        protocol.data_received(stream[i : i + 3])
    assert await first == [1, b"hello"]
    assert await second == [[b"a", None]]


async def test_pipelines_sent_in_one_loop_iteration_leave_in_one_write() -> None:
    transport = _Transport()
    protocol = _RespProtocol()
    protocol.connection_made(transport)
    first, second = protocol.send(b"*1\r\n$4\r\nPING\r\n", 1), protocol.send(b"*1\r\n$4\r\nECHO\r\n", 1)
    assert transport.written == []  # written once this iteration ends
    await asyncio.sleep(0)
    assert transport.written == [b"*1\r\n$4\r\nPING\r\n*1\r\n$4\r\nECHO\r\n"]
    protocol.data_received(b"+PONG\r\n$1\r\nx\r\n")
    assert (await first, await second) == ([b"PONG"], [b"x"])
    third = protocol.send(b"...", 1)
    await asyncio.sleep(0)
    assert transport.written[1:] == [b"..."]  # a later iteration: its own write
    protocol.data_received(b":1\r\n")
    assert await third == [1]


async def test_a_pipeline_its_caller_gave_up_on_is_read_and_discarded() -> None:
    protocol = _RespProtocol()
    protocol.connection_made(_Transport())
    abandoned = protocol.send(b"...", 1)
    kept = protocol.send(b"...", 1)
    abandoned.cancel()
    protocol.data_received(b"$3\r\nold\r\n$3\r\nnew\r\n")
    assert await kept == [b"new"]  # the connection stayed in step


async def test_losing_the_connection_fails_every_waiting_pipeline() -> None:
    protocol = _RespProtocol()
    protocol.connection_made(_Transport())
    waiting = [protocol.send(b"...", 1), protocol.send(b"...", 3)]
    protocol.connection_lost(ConnectionResetError("reset"))
    for future in waiting:
        with pytest.raises(RedisConnectionError, match="lost"):
            await future
    with pytest.raises(RedisConnectionError):
        protocol.send(b"...", 1)


@pytest.mark.parametrize("parser", ["hiredis", "python"])
async def test_a_protocol_error_closes_the_connection(parser: str) -> None:
    transport = _Transport()
    protocol = _protocol(parser)
    protocol.connection_made(transport)
    waiting = protocol.send(b"...", 1)
    protocol.data_received(b"?what\r\n")
    with pytest.raises(RedisConnectionError, match="protocol error"):
        await waiting
    assert transport.closed


async def test_an_unreachable_server_raises_redis_connection_error() -> None:
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    client = LeanRedis("127.0.0.1", port, connect_timeout=0.5)
    with pytest.raises(RedisConnectionError, match="cannot connect"):
        await client.execute([("PING",)])


async def test_error_replies_are_raised_after_the_whole_pipeline_is_read() -> None:
    async def fake_redis(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(65536)
        writer.write(b":1\r\n-NOSCRIPT No matching script\r\n$2\r\nok\r\n")
        await writer.drain()
        await reader.read(65536)  # a second pipeline on the same connection
        writer.write(b"+PONG\r\n")
        await writer.drain()

    server = await asyncio.start_server(fake_redis, "127.0.0.1", 0)
    client = LeanRedis("127.0.0.1", server.sockets[0].getsockname()[1])
    try:
        pipe = client.pipeline()
        pipe.hmget("h", "a").evalsha("sha", 0).geosearch(
            "g", longitude=13.4, latitude=52.5, radius=3, unit="km"
        )
        with pytest.raises(NoScriptError):
            await pipe.execute()
        assert await client.execute([("PING",)]) == [b"PONG"]  # the connection is still usable
    finally:
        await client.aclose()
        server.close()


def test_urls_carry_host_port_db_and_credentials() -> None:
    client = LeanRedis.from_url("rediss://user:p%40ss@cache.internal:6380/3")
    assert (client.host, client.port, client.db) == ("cache.internal", 6380, 3)
    assert (client._username, client._password, client._tls) == ("user", "p@ss", True)
    with pytest.raises(ValueError, match="scheme"):
        LeanRedis.from_url("unix:///tmp/redis.sock")


async def test_only_a_stalled_connection_is_dropped() -> None:
    async def silent_redis(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(10)  # reads nothing, answers nothing

    server = await asyncio.start_server(silent_redis, "127.0.0.1", 0)
    client = LeanRedis("127.0.0.1", server.sockets[0].getsockname()[1])
    try:
        assert not client.reset_if_stalled(0.0)  # nothing pending
        waiting = asyncio.ensure_future(client.execute([("PING",)]))
        await asyncio.sleep(0.05)
        assert not client.reset_if_stalled(5.0)  # pending, but not for long
        assert client.reset_if_stalled(0.01)
        with pytest.raises(RedisConnectionError):
            await waiting
    finally:
        await client.aclose()
        server.close()
