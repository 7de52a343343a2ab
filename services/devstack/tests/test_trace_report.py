"""The attribution report: journeys from spans (file export or Jaeger's API) → per-hop quantiles."""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from devstack.trace_report import EVENT_HOPS, PREDICT_HOPS, hop_stats, jaeger_spans, load_spans, main, render

MS = 1_000_000


def span(
    trace: str,
    sid: str,
    parent: str | None,
    name: str,
    kind: str,
    start_ms: float,
    end_ms: float,
    **attributes: Any,
) -> dict[str, Any]:
    return {
        "trace_id": trace,
        "span_id": sid,
        "parent_span_id": parent,
        "name": name,
        "kind": kind,
        "start_ns": int(start_ms * MS),
        "end_ns": int(end_ms * MS),
        "attributes": attributes,
    }


def event_journey(trace: str, scale: float) -> list[dict[str, Any]]:
    return [
        span(trace, "a", None, "eta.v1.IngestionService/PublishEvents", "SERVER", 0, 4 * scale),
        span(trace, "b", "a", "eta.order-events publish", "PRODUCER", 1, 1 + 2 * scale),
        span(
            trace,
            "c",
            "b",
            "eta.order-events process",
            "CONSUMER",
            10,
            10 + 3 * scale,
            **{"eta.kafka.queued_ms": 5 * scale, "eta.freshness.event_to_visible_ms": 20 * scale},
        ),
        span(trace, "d", "c", "redis apply features", "CLIENT", 11, 11 + scale),
    ]


def prediction(trace: str, total: float, read: float, inference: float) -> list[dict[str, Any]]:
    return [
        span(trace, "p", None, "eta.v1.EtaService/PredictEta", "SERVER", 100, 100 + total),
        span(trace, "q", "p", "redis read features", "CLIENT", 100.1, 100.1 + read),
        span(trace, "r", "p", "model inference", "INTERNAL", 100.5, 100.5 + inference),
    ]


def test_hops_per_journey_and_quantiles() -> None:
    spans = [s for i in range(1, 101) for s in event_journey(f"t{i}", float(i))]
    spans += prediction("x1", total=2.0, read=0.5, inference=0.3)
    stats = {s.hop: s for s in hop_stats(spans)}
    assert stats[EVENT_HOPS[0]].count == 100
    assert stats[EVENT_HOPS[0]].p50_ms == pytest.approx(4 * 50, rel=0.03)
    assert stats[EVENT_HOPS[2]].p99_ms == pytest.approx(5 * 99, rel=0.02)
    assert stats[EVENT_HOPS[5]].p95_ms == pytest.approx(20 * 95, rel=0.02)
    assert stats[PREDICT_HOPS[3]].p50_ms == pytest.approx(2.0 - 0.5 - 0.3)
    text = render(list(stats.values()))
    assert "freshness: event_time -> visible in Redis" in text
    assert "predict: gRPC + rest" in text


def test_last_limits_to_the_most_recent_journeys() -> None:
    spans = [s for i in range(1, 11) for s in event_journey(f"t{i}", float(i))]
    stats = {s.hop: s for s in hop_stats(spans, last=2)}
    assert stats[EVENT_HOPS[4]].count == 2
    assert stats[EVENT_HOPS[4]].p50_ms in (9.0, 10.0)


def test_reads_json_lines_and_skips_partial_lines(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "spans.jsonl"
    path.write_text("\n".join(json.dumps(s) for s in event_journey("t1", 1.0)) + '\n{"trace_id": ')
    assert len(load_spans([path, tmp_path / "missing.jsonl"])) == 4
    main([str(path)])
    assert "ingest: PublishEvents/StreamEvents handling" in capsys.readouterr().out


@pytest.fixture
def fake_jaeger() -> Iterator[str]:
    """A stand-in for Jaeger's /api/traces (the real query API shape), only for this unit test."""
    payload = {
        "data": [
            {
                "traceID": "t1",
                "processes": {"p1": {"serviceName": "eta-prediction"}},
                "spans": [
                    {
                        "traceID": "t1",
                        "spanID": "p",
                        "operationName": "eta.v1.EtaService/PredictEta",
                        "references": [],
                        "startTime": 1_000,
                        "duration": 2_000,
                        "processID": "p1",
                        "tags": [{"key": "span.kind", "type": "string", "value": "server"}],
                    },
                    {
                        "traceID": "t1",
                        "spanID": "q",
                        "operationName": "redis read features",
                        "startTime": 1_100,
                        "duration": 500,
                        "processID": "p1",
                        "references": [{"refType": "CHILD_OF", "traceID": "t1", "spanID": "p"}],
                        "tags": [{"key": "span.kind", "type": "string", "value": "client"}],
                    },
                ],
            }
        ]
    }

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            assert self.path.startswith("/api/traces?")
            body = json.dumps(payload).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            return None

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


def test_jaeger_query_api_is_read_into_the_same_shape(fake_jaeger: str) -> None:
    spans = jaeger_spans(fake_jaeger, services=["eta-prediction", "eta-ingestion"], limit=10)
    assert len(spans) == 2  # deduplicated across the two service queries
    stats = {s.hop: s for s in hop_stats(spans)}
    assert stats[PREDICT_HOPS[0]].p50_ms == pytest.approx(2.0)
    assert stats[PREDICT_HOPS[1]].p50_ms == pytest.approx(0.5)
    assert stats[PREDICT_HOPS[3]].p50_ms == pytest.approx(1.5)
