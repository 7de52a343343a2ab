"""Load generator and bare echo server for the serving benchmarks (driven by ``bench.harness``).

``python -m bench.loadgen echo --port P --response-bytes N`` — the floor: a bare ``grpc.aio`` server
(generic handler, bytes in and out, no interceptors, no health/reflection) answering N bytes.

``python -m bench.loadgen load ...`` — one load-generator process; prints one JSON line (OK calls,
errors, the latency of every OK call in µs, its window). It sends pre-serialised request bodies (the
client does no protobuf or JSON work) over ``--protocol grpc`` (one ``grpc.aio`` channel, bytes in and
out), ``h2`` (the same calls from a minimal HTTP/2 gRPC client, about half grpc.aio's CPU per call)
or ``http`` (HTTP/1.1 keep-alive POSTs of JSON, one connection per outstanding call, a minimal
client on asyncio streams). Modes:

* ``max``: ``--concurrency`` calls outstanding, each worker sends its next call when the last returns
  (closed loop; ``--concurrency 1`` is sequential: one call at a time);
* ``fixed``: ``--rate`` calls/s open loop, latency from the instant each call was due. asyncio's timers
  fire up to ~1 ms late (epoll's millisecond timeout) and from a cold loop: at low rates the generator
  sleeps until ``--spin-ms`` before each call and waits out the rest on the CPU, so calls leave on time
  (``send_lag_p99_ms`` in the output: ~0 with the spin, 1.3-2 ms without it at 20/s on the benchmark
  machine) and the client's own wake-up is not counted as the server's latency.

Calls start at ``--start-at`` (epoch seconds, shared by the processes of one run); the first
``--warmup`` seconds are not recorded; then ``--duration`` seconds are.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any


def read_requests(path: Path) -> list[bytes]:
    data = path.read_bytes()
    out, pos = [], 0
    while pos < len(data):
        size = int.from_bytes(data[pos : pos + 4], "little")
        out.append(data[pos + 4 : pos + 4 + size])
        pos += 4 + size
    return out


def spin_seconds(rate: float, spin_ms: float) -> float:
    """How long before each call of a ``fixed`` run the generator waits on the CPU (0: never): ``spin_ms``
    when calls are at least 10 spins apart, else 0 (a spin must not take a busy client's core)."""
    return spin_ms / 1000 if spin_ms > 0 and spin_ms * 10 <= 1000 / rate else 0.0


# --- role: bare echo server ------------------------------------------------------------------------------


async def start_echo(answer: Callable[[bytes], bytes], port: int = 0) -> tuple[Any, int]:
    """A bare grpc.aio server answering ``/bench.Echo/Echo`` with ``answer(request)`` on 127.0.0.1
    (``port`` 0: any free one), started; returns it and its port."""
    import grpc

    async def echo(request: bytes, _context: Any) -> bytes:
        return answer(request)

    server = grpc.aio.server()
    handler = grpc.method_handlers_generic_handler(
        "bench.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(echo)}
    )
    server.add_generic_rpc_handlers((handler,))
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    return server, bound


async def echo_server(port: int, response_bytes: int) -> None:
    reply = b"\x00" * response_bytes
    server, _ = await start_echo(lambda _request: reply, port)
    await server.wait_for_termination()


# --- role: load generator --------------------------------------------------------------------------------

Call = Callable[[bytes], Awaitable[str]]  # sends one request, returns "OK" or an error code


class _HttpConnection:
    """One HTTP/1.1 keep-alive connection: POST a JSON body, read a Content-Length (or chunked) reply."""

    def __init__(self, host: str, port: int, path: str, timeout: float) -> None:
        self.host, self.port, self.path, self.timeout = host, port, path, timeout
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.head = (
            f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            "Connection: keep-alive\r\nContent-Length: "
        ).encode()

    async def call(self, body: bytes) -> str:
        try:
            async with asyncio.timeout(self.timeout):
                return await self._call(body)
        except (OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
            if self.writer is not None:
                self.writer.close()
            self.reader = self.writer = None
            return type(exc).__name__

    async def _call(self, body: bytes) -> str:
        if self.writer is None or self.reader is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        reader, writer = self.reader, self.writer
        writer.write(self.head + b"%d\r\n\r\n" % len(body) + body)
        head = await reader.readuntil(b"\r\n\r\n")
        status = head[9:12]
        lowered = head.lower()
        marker = lowered.find(b"content-length:")
        if marker >= 0:
            end = lowered.index(b"\r\n", marker)
            await reader.readexactly(int(lowered[marker + 15 : end]))
        elif b"transfer-encoding: chunked" in lowered:
            while True:
                size = int((await reader.readuntil(b"\r\n"))[:-2].split(b";")[0], 16)
                await reader.readexactly(size + 2)
                if size == 0:
                    break
        if b"connection: close" in lowered:
            writer.close()
            self.reader = self.writer = None
        return "OK" if status == b"200" else f"HTTP_{status.decode()}"


def _hpack_int(value: int, prefix_bits: int, first: int = 0) -> bytes:
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([first | value])
    out = [first | limit]
    value -= limit
    while value >= 128:
        out.append((value & 127) | 128)
        value >>= 7
    out.append(value)
    return bytes(out)


def _hpack_literal(name: str, value: str) -> bytes:
    """A header as "literal header field without indexing — new name", no Huffman (RFC 7541 6.2.2)."""
    raw_name, raw_value = name.encode(), value.encode()
    return b"\x00" + _hpack_int(len(raw_name), 7) + raw_name + _hpack_int(len(raw_value), 7) + raw_value


class _H2Grpc(asyncio.Protocol):
    """A minimal gRPC client on raw HTTP/2: one connection, many concurrent streams, constant request
    headers encoded once, no HPACK decoding (a call is OK when its stream carried a message before it
    ended — gRPC errors are trailers-only; the benchmark checks the endpoint with grpc.aio first). About half
    of grpc.aio's client CPU per call, so one load-generator core can saturate a server core."""

    _WINDOW = (1 << 31) - 1

    def __init__(self, authority: str, method: str) -> None:
        headers = b"".join(
            _hpack_literal(k, v)
            for k, v in (
                (":method", "POST"),
                (":scheme", "http"),
                (":path", method),
                (":authority", authority),
                ("content-type", "application/grpc"),
                ("te", "trailers"),
            )
        )
        self._headers = headers
        self._transport: asyncio.Transport | None = None
        self._buf = b""
        self._next_id = 1
        self._streams: dict[int, tuple[asyncio.Future[str], list[bool]]] = {}
        self._out: list[bytes] = []
        self._received = 0
        self.closed: str | None = None

    @staticmethod
    def _frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
        return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + payload

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        settings = (2).to_bytes(2, "big") + (0).to_bytes(4, "big")  # ENABLE_PUSH 0
        settings += (4).to_bytes(2, "big") + self._WINDOW.to_bytes(4, "big")  # INITIAL_WINDOW_SIZE
        update = (self._WINDOW - 65535).to_bytes(4, "big")
        transport.write(  # type: ignore[attr-defined]
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
            + self._frame(4, 0, 0, settings)
            + self._frame(8, 0, 0, update)
        )

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(f"connection lost: {exc}")

    def _fail(self, reason: str) -> None:
        self.closed = self.closed or reason
        for future, _ in self._streams.values():
            if not future.done():
                future.set_result("UNAVAILABLE")
        self._streams.clear()

    def data_received(self, data: bytes) -> None:
        buf = self._buf + data if self._buf else data
        pos, size = 0, len(buf)
        while size - pos >= 9:
            length = int.from_bytes(buf[pos : pos + 3], "big")
            if size - pos < 9 + length:
                break
            kind, flags = buf[pos + 3], buf[pos + 4]
            stream = int.from_bytes(buf[pos + 5 : pos + 9], "big") & 0x7FFFFFFF
            payload_at = pos + 9
            pos = payload_at + length
            if kind == 0:  # DATA
                entry = self._streams.get(stream)
                if entry is not None and length > 0:
                    entry[1][0] = True
                self._received += length
                if self._received > 1 << 30:  # keep the connection window open
                    self._send(self._frame(8, 0, 0, self._received.to_bytes(4, "big")))
                    self._received = 0
            elif kind == 4 and not flags & 1:  # SETTINGS: acknowledge
                self._send(self._frame(4, 1, 0, b""))
            elif kind == 6 and not flags & 1:  # PING: answer
                self._send(self._frame(6, 1, 0, buf[payload_at:pos]))
            elif kind == 7:  # GOAWAY
                self._fail("GOAWAY")
                continue
            elif kind == 3:  # RST_STREAM
                entry = self._streams.pop(stream, None)
                if entry is not None and not entry[0].done():
                    entry[0].set_result("RST_STREAM")
                continue
            if flags & 1 and kind in (0, 1):  # END_STREAM
                entry = self._streams.pop(stream, None)
                if entry is not None and not entry[0].done():
                    entry[0].set_result("OK" if entry[1][0] else "GRPC_ERROR")
        self._buf = buf[pos:] if pos < size else b""

    def _send(self, payload: bytes) -> None:
        self._out.append(payload)
        if len(self._out) == 1:
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        out, self._out = self._out, []
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(b"".join(out))

    async def call(self, request: bytes) -> str:
        if self.closed is not None:
            return "UNAVAILABLE"
        stream = self._next_id
        self._next_id += 2
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._streams[stream] = (future, [False])
        message = b"\x00" + len(request).to_bytes(4, "big") + request
        self._send(self._frame(1, 4, stream, self._headers) + self._frame(0, 1, stream, message))
        return await future  # no per-call timer (its cost): a stuck call fails at the end, see expire()

    def expire(self) -> None:
        """Fail every call still outstanding (called ``timeout`` seconds after the measured window)."""
        for future, _ in self._streams.values():
            if not future.done():
                future.set_result("DEADLINE_EXCEEDED")
        self._streams.clear()


async def _h2_caller(target: str, method: str) -> _H2Grpc:
    host, port = target.rsplit(":", 1)
    loop = asyncio.get_running_loop()
    _, protocol = await loop.create_connection(lambda: _H2Grpc(target, method), host, int(port))
    sock = protocol._transport.get_extra_info("socket") if protocol._transport else None
    if sock is not None:
        import socket

        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return protocol


def _grpc_caller(target: str, method: str, timeout: float) -> tuple[Callable[[], Call], Any]:
    import grpc

    channel = grpc.aio.insecure_channel(target)
    stub = channel.unary_unary(method)  # bytes in, bytes out

    async def call(request: bytes) -> str:
        try:
            await stub(request, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            return str(exc.code().name)
        return "OK"

    return (lambda: call), channel


async def load(args: argparse.Namespace) -> dict[str, Any]:
    requests = read_requests(Path(args.requests))
    channel: Any = None
    h2: _H2Grpc | None = None
    if args.protocol == "grpc":
        new_caller, channel = _grpc_caller(args.target, args.method, args.timeout)
    elif args.protocol == "h2":
        h2 = connection = await _h2_caller(args.target, args.method)

        def new_caller() -> Call:
            return connection.call
    else:
        host, port = args.target.rsplit(":", 1)

        def new_caller() -> Call:
            return _HttpConnection(host, int(port), args.method, args.timeout).call

    errors: Counter[str] = Counter()
    latencies: list[int] = []
    record = latencies.append
    lags: list[float] = []
    count = len(requests)
    state = {"measuring": False, "next": 0}
    warm = new_caller()
    for i in range(10):  # connect and warm the path before the shared start
        await warm(requests[i % count])
    delay = args.start_at - time.time()
    if delay > 0:
        await asyncio.sleep(delay)
    clock = time.perf_counter
    measure_at = clock() + args.warmup
    stop_at = measure_at + args.duration
    window: dict[str, float] = {}

    async def timer() -> None:
        await asyncio.sleep(max(0.0, measure_at - clock()))
        state["measuring"] = True
        window["started"], window["opened"] = time.time(), clock()
        await asyncio.sleep(max(0.0, stop_at - clock()))
        state["measuring"] = False
        window["seconds"] = clock() - window["opened"]
        if h2 is not None:
            asyncio.get_running_loop().call_later(args.timeout, h2.expire)

    async def one(call: Call, due: float) -> None:
        i = state["next"]
        state["next"] = i + 1
        code = await call(requests[i % count])
        if state["measuring"]:
            if code == "OK":
                record(int((clock() - due) * 1e6))
            else:
                errors[code] += 1

    if args.mode == "max":

        async def worker(call: Call) -> None:
            while clock() < stop_at:
                await one(call, clock())

        callers = [warm] + [new_caller() for _ in range(args.concurrency - 1)]
        await asyncio.gather(timer(), *(worker(c) for c in callers))
    else:
        interval = 1.0 / args.rate
        spin = spin_seconds(args.rate, args.spin_ms)
        pending: set[asyncio.Task[None]] = set()
        idle: list[Call] = [warm]

        async def fixed_call(due: float) -> None:
            call = idle.pop() if idle else new_caller()
            try:
                await one(call, due)
            finally:
                idle.append(call)

        timer_task = asyncio.ensure_future(timer())
        due = clock()
        while due < stop_at:
            now = clock()
            while due <= now:
                if state["measuring"]:
                    lags.append(now - due)
                task = asyncio.create_task(fixed_call(due))
                pending.add(task)
                task.add_done_callback(pending.discard)
                due += interval
            wait = due - clock()
            if spin and wait > 0:
                # asyncio wakes up to ~1 ms late (epoll's millisecond timeout) and cold: sleep until
                # ``spin`` before the call is due, then wait for the instant on the CPU, so the client's
                # own wake-up is not counted as the server's latency; nothing else is outstanding then
                # (``spin`` is used only when calls are ≥ 10 spins apart and the last one has returned)
                if wait > spin:
                    await asyncio.sleep(wait - spin)
                if not pending:
                    while clock() < due:
                        pass
                else:
                    await asyncio.sleep(max(0.0, due - clock()))
            else:
                await asyncio.sleep(max(0.0, wait))
        await timer_task
        if pending:
            await asyncio.wait(pending, timeout=args.timeout + 1)
    if channel is not None:
        await channel.close()
    lags.sort()
    return {
        "ok": len(latencies),
        "errors": dict(errors),
        "seconds": window["seconds"],
        "started": window["started"],
        "latencies_us": latencies,
        "send_lag_p99_ms": lags[int(0.99 * (len(lags) - 1))] * 1e3 if lags else 0.0,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.loadgen", description=__doc__)
    sub = parser.add_subparsers(dest="role", required=True)
    echo = sub.add_parser("echo", help="bare grpc.aio echo server")
    echo.add_argument("--port", type=int, required=True)
    echo.add_argument("--response-bytes", type=int, required=True)
    gen = sub.add_parser("load", help="one load-generator process (prints one JSON line)")
    gen.add_argument("--protocol", choices=["grpc", "h2", "http"], default="grpc")
    gen.add_argument("--target", required=True, help="host:port")
    gen.add_argument("--method", required=True, help="gRPC method path, or the HTTP path")
    gen.add_argument("--requests", required=True, help="length-prefixed request bodies")
    gen.add_argument("--mode", choices=["fixed", "max"], required=True)
    gen.add_argument("--rate", type=float, default=100.0)
    gen.add_argument("--concurrency", type=int, default=1)
    gen.add_argument("--start-at", type=float, default=0.0, help="epoch seconds")
    gen.add_argument("--warmup", type=float, default=1.0)
    gen.add_argument("--duration", type=float, default=5.0)
    gen.add_argument("--timeout", type=float, default=5.0)
    gen.add_argument(
        "--spin-ms",
        type=float,
        default=2.0,
        help="fixed mode: wait the last SPIN_MS before each call on the CPU rather than in the event loop, "
        "so calls leave on time (used when calls are at least 10 × SPIN_MS apart; 0 = never)",
    )
    args = parser.parse_args(argv)
    if args.role == "echo":
        asyncio.run(echo_server(args.port, args.response_bytes))
        return 0
    sys.stdout.write(json.dumps(asyncio.run(load(args))) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
