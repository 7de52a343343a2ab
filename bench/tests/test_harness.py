"""Unit tests of the benchmark helpers (part of `make test`; alone: `.venv/bin/pytest bench/tests`)."""

from __future__ import annotations

import asyncio
import json
import math
import os
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from bench import harness as H
from bench.loadgen import _HttpConnection, read_requests
from bench.result import BenchResult, Target


def test_percentile_and_median() -> None:
    values = [float(v) for v in range(1, 101)]
    assert H.percentile(values, 0.5) == 51.0
    assert H.percentile(values, 0.99) == 99.0
    assert math.isnan(H.percentile([], 0.5))
    assert H.median([3.0, 1.0, 2.0]) == 2.0
    assert H.median([4.0, 1.0, 2.0, 3.0]) == 2.5


def test_ratios_are_paired_within_each_round_in_round_order() -> None:
    runs = [{"rps": 110.0}, {"rps": 90.0}]
    reference = [{"rps": 100.0}, {"rps": 100.0}]
    assert H.paired_ratios(runs, reference, "rps") == [1.1, 0.9]
    assert math.isnan(H.paired_ratios([{"rps": 1.0}], [{"rps": 0.0}], "rps")[0])


def _run(server_s: float, client_core_s: float, server_core_s: float, seconds: float = 1.0) -> H.LoadRun:
    (server_core,) = H.SERVER_CPUS
    (client_core,) = H.CLIENT_CPUS
    return H.LoadRun(
        ok=1000,
        errors={},
        seconds=seconds,
        latencies_ms=[1.0] * 1000,
        server_cpu_s=server_s,
        client_cpu_s=[0.3, 0.3],
        watched_cpu_s={"redis": 0.05},
        core_busy_s={server_core: server_core_s, client_core: client_core_s},
        background={"redis": 0.01},
    )


def test_what_set_the_pace() -> None:
    assert _run(0.97, 0.70, 0.98).bound == "server"
    client = _run(0.60, 0.97, 0.62)
    assert client.bound == "client"
    assert client.client_bound
    disturbed = _run(0.70, 0.60, 0.95)
    assert disturbed.bound == "neither"
    assert disturbed.server_core_others_pct == pytest.approx(25.0)


def test_per_call_figures_net_of_background() -> None:
    summary = _run(0.5, 0.5, 0.5).summary()
    assert summary["server_cpu_us_per_call"] == pytest.approx(500.0)
    assert summary["redis_cpu_us_per_call"] == pytest.approx(50.0)
    assert summary["redis_net_cpu_us_per_call"] == pytest.approx(40.0)
    assert summary["client_cpu_pct"] == pytest.approx(60.0)
    assert summary["rps"] == pytest.approx(1000.0)


def test_requests_round_trip(tmp_path: Path) -> None:
    bodies = [b"", b"a", b"x" * 70_000]
    assert read_requests(H.write_requests(tmp_path / "r.bin", bodies)) == bodies


def test_metric_samples() -> None:
    text = (
        "# HELP eta_prediction_feature_reads_total reads\n"
        'eta_prediction_feature_reads_total{path="row"} 990.0\n'
        'eta_prediction_feature_reads_total{path="fallback"} 10.0\n'
        "eta_other_total 3.0\n"
    )
    samples = H.metric_samples(text, "eta_prediction_feature_reads_total")
    assert samples == {'path="row"': 990.0, 'path="fallback"': 10.0}
    assert H.metric_samples(text, "eta_other_total") == {"": 3.0}


def test_targets_and_saved_result(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    at_least = Target("throughput", 0.5, ">=", 0.4)
    at_most = Target("p99", 3.0, "<=", 2.0, "ms")
    assert at_least.met
    assert at_least.ratio == pytest.approx(1.25)
    assert not at_most.met
    assert "NOT met" in at_most.line()
    monkeypatch.setattr("bench.result.RESULTS_DIR", tmp_path)
    path = BenchResult("t", [{"a": 1.0}], {"f": 1.0}, "base", targets=[at_least, at_most]).save()
    saved = json.loads(path.read_text())
    assert [t["met"] for t in saved["targets"]] == [True, False]
    assert saved["targets"][0]["ratio"] == pytest.approx(1.25)


async def test_http_client_keep_alive_and_chunked() -> None:
    connections = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        n = 0
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                break
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            body = await reader.readexactly(length)
            n += 1
            if n % 2:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            else:
                writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        client = _HttpConnection("127.0.0.1", port, "/x", timeout=2.0)
        assert [await client.call(b'{"k": 1}') for _ in range(4)] == ["OK"] * 4
        assert connections == 1  # kept alive
    finally:
        server.close()
        await server.wait_closed()


def test_closed_loop_medians_use_server_bound_runs() -> None:
    runs = [
        {"rps": 2300.0, "bound": "neither"},
        {"rps": 3700.0, "bound": "server"},
        {"rps": 3600.0, "bound": "server"},
    ]
    med, used = H.medians(runs, closed_loop=True)
    assert (med["rps"], used) == (3650.0, 2)
    med, used = H.medians(runs, closed_loop=False)
    assert (med["rps"], used) == (3600.0, 3)
    med, used = H.medians([{"rps": 1.0, "bound": "client"}], closed_loop=True)
    assert (med["rps"], used) == (1.0, 1)  # none server-bound: all runs, flagged by the caller


async def test_h2_grpc_client_against_grpc_aio() -> None:
    from bench.loadgen import _h2_caller, start_echo

    # a reply of several DATA frames' worth
    server, port = await start_echo(lambda request: request * 300)
    try:
        client = await _h2_caller(f"127.0.0.1:{port}", "/bench.Echo/Echo")
        results = await asyncio.gather(*(client.call(b"x" * 100) for _ in range(200)))
        assert results == ["OK"] * 200
        missing = await _h2_caller(f"127.0.0.1:{port}", "/bench.Echo/Nope")
        assert await missing.call(b"x") == "GRPC_ERROR"  # UNIMPLEMENTED: trailers only
        for connection in (client, missing):
            assert connection._transport is not None
            connection._transport.close()
    finally:
        await server.stop(None)


def test_the_fixed_rate_spin_is_used_only_for_calls_far_apart() -> None:
    from bench.loadgen import spin_seconds

    assert spin_seconds(20, 2.0) == 0.002  # 50 ms apart
    assert spin_seconds(50, 2.0) == 0.002  # 20 ms apart: exactly 10 spins
    assert spin_seconds(100, 2.0) == 0.0  # 10 ms apart: the spin would take a fifth of the core
    assert spin_seconds(20, 0.0) == 0.0


async def test_a_fixed_rate_run_with_the_spin_sends_every_call_on_time() -> None:
    import argparse

    from bench.loadgen import load, start_echo

    server, port = await start_echo(lambda request: request)
    requests = Path(tempfile.mkdtemp()) / "requests.bin"
    requests.write_bytes((3).to_bytes(4, "little") + b"abc")
    try:
        args = argparse.Namespace(
            requests=str(requests), protocol="h2", target=f"127.0.0.1:{port}", method="/bench.Echo/Echo",
            mode="fixed", rate=40.0, concurrency=1, start_at=0.0, warmup=0.2, duration=1.0, timeout=5.0,
            spin_ms=2.0,
        )  # fmt: skip
        result = await load(args)
    finally:
        await server.stop(None)
    assert result["errors"] == {}
    assert 38 <= result["ok"] <= 42  # 40 calls due in the measured second
    # the lag of a send behind its due instant: the spin removes the event loop's timer granularity (a
    # loose bound: this is a shared test machine; the benchmark reports the measured figure)
    assert result["send_lag_p99_ms"] < 1.0


def test_cold_work_reports_the_same_work_back_to_back_and_gapped(capsys: pytest.CaptureFixture[str]) -> None:
    from bench.cold_work import main

    assert main(["--calls", "5", "--gap-ms", "2"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) == {"back_to_back_us", "gapped_us", "gap_ms", "factor"}
    assert result["back_to_back_us"] > 0
    assert result["gapped_us"] > 0
    assert result["gap_ms"] == 2.0
    assert result["factor"] == pytest.approx(result["gapped_us"] / result["back_to_back_us"])


def test_renice_tree_lowers_a_process_and_its_descendants() -> None:
    # a shell (the parent) with a sleeping child: both end up at the niceness asked for
    proc = subprocess.Popen(["sh", "-c", "sleep 30 & wait"])
    try:
        deadline = time.monotonic() + 5
        while not H.children(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        children = H.children(proc.pid)
        assert len(children) == 1
        H.renice_tree(proc.pid, 17)
        assert os.getpriority(os.PRIO_PROCESS, proc.pid) == 17
        assert os.getpriority(os.PRIO_PROCESS, children[0]) == 17
    finally:
        for pid in H.children(proc.pid):
            os.kill(pid, 9)
        proc.kill()
        proc.wait(5)
