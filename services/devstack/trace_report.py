"""Where the time goes: per-hop latency and feature freshness, from exported spans.

Reads spans from the JSON-lines files written with ``ETA_TRACES_FILE`` (``make run`` writes them to
``.run/traces/``) or from Jaeger's query API, groups them into journeys (one trace each) and prints
p50/p95/p99 per hop over the most recent journeys::

    eta-trace-report .run/traces/*.jsonl [--last 1000]
    eta-trace-report --jaeger http://localhost:16686 [--last 200]

Hops of an event's journey: ingest handling (the PublishEvents server span), Kafka produce (send → broker
ack), time queued in Kafka (broker append → consumed), aggregation (processing the record), the Redis
write, and freshness (event_time → feature visible in Redis). Hops of a prediction: total server time,
the Redis read, inference, and the rest (gRPC, validation, serialisation).
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.parse
import urllib.request
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["HopStats", "hop_stats", "jaeger_spans", "load_spans", "render"]

Span = dict[str, Any]

EVENT_HOPS = (
    "ingest: PublishEvents/StreamEvents handling",
    "ingest: Kafka produce (send -> ack)",
    "kafka: queued (append -> consumed)",
    "aggregate: process record",
    "aggregate: Redis write (batched)",
    "freshness: event_time -> visible in Redis",
)
PREDICT_HOPS = (
    "predict: PredictEta total",
    "predict: Redis read (1 round trip)",
    "predict: model inference",
    "predict: gRPC + rest",
)


@dataclass(frozen=True)
class HopStats:
    hop: str
    count: int
    p50_ms: float
    p95_ms: float
    p99_ms: float


def load_spans(paths: Iterable[Path]) -> list[Span]:
    spans: list[Span] = []
    for path in paths:
        try:
            lines = path.read_text().splitlines()
        except FileNotFoundError:
            continue
        for line in lines:
            if line.strip():
                try:
                    spans.append(json.loads(line))
                except json.JSONDecodeError:
                    continue  # a line being written right now
    return spans


def jaeger_spans(base_url: str, *, services: Sequence[str], limit: int, lookback: str = "1h") -> list[Span]:
    """Spans from Jaeger's HTTP query API (``/api/traces``), in the same shape as the file export."""
    spans: list[Span] = []
    seen: set[tuple[str, str]] = set()
    for service in services:
        query = urllib.parse.urlencode({"service": service, "limit": limit, "lookback": lookback})
        with urllib.request.urlopen(f"{base_url.rstrip('/')}/api/traces?{query}", timeout=30) as response:
            payload = json.load(response)
        for trace in payload.get("data", []):
            processes = {pid: p.get("serviceName") for pid, p in trace.get("processes", {}).items()}
            for s in trace.get("spans", []):
                key = (s["traceID"], s["spanID"])
                if key in seen:
                    continue
                seen.add(key)
                tags = {t["key"]: t.get("value") for t in s.get("tags", [])}
                parent = next(
                    (r["spanID"] for r in s.get("references", []) if r.get("refType") == "CHILD_OF"), None
                )
                start_ns = int(s["startTime"]) * 1000
                spans.append(
                    {
                        "trace_id": s["traceID"],
                        "span_id": s["spanID"],
                        "parent_span_id": parent,
                        "name": s["operationName"],
                        "kind": str(tags.get("span.kind", "internal")).upper(),
                        "service": processes.get(s.get("processID")),
                        "start_ns": start_ns,
                        "end_ns": start_ns + int(s["duration"]) * 1000,
                        "attributes": tags,
                    }
                )
    return spans


def _ms(span: Span) -> float:
    return (int(span["end_ns"]) - int(span["start_ns"])) / 1e6


def _journeys(spans: Sequence[Span]) -> list[dict[str, float]]:
    """One dict of hop -> ms per trace, most recent last."""
    by_trace: dict[str, list[Span]] = defaultdict(list)
    for span in spans:
        by_trace[span["trace_id"]].append(span)
    journeys: list[tuple[int, dict[str, float]]] = []
    for trace_spans in by_trace.values():
        hops: dict[str, float] = {}
        totals: dict[str, float] = {}
        for span in trace_spans:
            name, kind, attrs = span["name"], span["kind"], span.get("attributes", {})
            if kind == "SERVER" and name.endswith(
                ("IngestionService/PublishEvents", "IngestionService/StreamEvents")
            ):
                hops[EVENT_HOPS[0]] = _ms(span)
            elif kind == "PRODUCER":
                hops[EVENT_HOPS[1]] = max(hops.get(EVENT_HOPS[1], 0.0), _ms(span))
            elif kind == "CONSUMER":
                if "eta.kafka.queued_ms" in attrs:
                    hops[EVENT_HOPS[2]] = float(attrs["eta.kafka.queued_ms"])
                hops[EVENT_HOPS[3]] = _ms(span)
                if "eta.freshness.event_to_visible_ms" in attrs:
                    hops[EVENT_HOPS[5]] = float(attrs["eta.freshness.event_to_visible_ms"])
            elif name == "redis apply features":
                hops[EVENT_HOPS[4]] = _ms(span)
            elif name.endswith("EtaService/PredictEta") and kind == "SERVER":
                totals["total"] = _ms(span)
            elif name == "redis read features":
                totals["read"] = _ms(span)
            elif name == "model inference":
                totals["inference"] = _ms(span)
        if "total" in totals:
            hops[PREDICT_HOPS[0]] = totals["total"]
            if "read" in totals:
                hops[PREDICT_HOPS[1]] = totals["read"]
            if "inference" in totals:
                hops[PREDICT_HOPS[2]] = totals["inference"]
            hops[PREDICT_HOPS[3]] = max(
                0.0, totals["total"] - totals.get("read", 0.0) - totals.get("inference", 0.0)
            )
        if hops:
            journeys.append((max(int(s.get("end_ns") or 0) for s in trace_spans), hops))
    journeys.sort(key=lambda j: j[0])
    return [hops for _, hops in journeys]


def _quantile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def hop_stats(spans: Sequence[Span], *, last: int = 1000) -> list[HopStats]:
    """Per-hop latency over the last ``last`` journeys that include the hop."""
    samples: dict[str, list[float]] = defaultdict(list)
    for hops in _journeys(spans):
        for hop, value in hops.items():
            samples[hop].append(value)
    out = []
    for hop in (*EVENT_HOPS, *PREDICT_HOPS):
        values = samples.get(hop, [])[-last:]
        if values:
            out.append(
                HopStats(
                    hop, len(values), _quantile(values, 0.5), _quantile(values, 0.95), _quantile(values, 0.99)
                )
            )
    return out


def render(stats: Sequence[HopStats]) -> str:
    if not stats:
        return "(no spans yet)"
    width = max(len(s.hop) for s in stats)
    lines = [f"{'hop':<{width}}  {'n':>6}  {'p50 ms':>9}  {'p95 ms':>9}  {'p99 ms':>9}"]
    for s in stats:
        lines.append(f"{s.hop:<{width}}  {s.count:>6}  {s.p50_ms:>9.2f}  {s.p95_ms:>9.2f}  {s.p99_ms:>9.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="eta-trace-report", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "files", nargs="*", type=Path, help="span files (JSON lines), e.g. .run/traces/*.jsonl"
    )
    parser.add_argument(
        "--jaeger", metavar="URL", help="read from Jaeger's query API instead (e.g. http://localhost:16686)"
    )
    parser.add_argument(
        "--services",
        default="eta-ingestion,eta-aggregator,eta-prediction",
        help="services to query in Jaeger (comma-separated)",
    )
    parser.add_argument("--last", type=int, default=1000, help="journeys per hop (default: 1000)")
    args = parser.parse_args(argv)
    if args.jaeger:
        spans = jaeger_spans(args.jaeger, services=args.services.split(","), limit=args.last)
    elif args.files:
        spans = load_spans(args.files)
    else:
        parser.error("give span files or --jaeger URL")
    sys.stdout.write(render(hop_stats(spans, last=args.last)) + "\n")


if __name__ == "__main__":
    main()
