"""Where the time goes: per-hop latency and feature freshness from exported spans.

Reads the JSON-lines span files written with ``ETA_TRACES_FILE`` (``make run`` writes them to
``.run/traces/``) and prints p50/p95/p99 per hop over the most recent journeys::

    python -m devstack.trace_report .run/traces/*.jsonl [--last 1000]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["HopStats", "hop_stats", "load_spans", "render"]


@dataclass(frozen=True)
class HopStats:
    hop: str
    count: int
    p50_ms: float
    p95_ms: float
    p99_ms: float


def load_spans(paths: Iterable[Path]) -> list[dict[str, Any]]:
    spans: list[dict[str, Any]] = []
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
    spans.sort(key=lambda s: s.get("end_ns") or 0)
    return spans


def _quantile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    idx = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[idx]


def _duration_ms(span: dict[str, Any]) -> float:
    return (int(span["end_ns"]) - int(span["start_ns"])) / 1e6


def hop_stats(spans: Sequence[dict[str, Any]], *, last: int = 1000) -> list[HopStats]:
    """Per-hop latency over the last ``last`` samples of each hop."""
    samples: dict[str, list[float]] = defaultdict(list)
    for span in spans:
        name, kind, attrs = span["name"], span["kind"], span.get("attributes", {})
        if name == "eta.v1.IngestionService/PublishEvents" and kind == "SERVER":
            samples["ingest: PublishEvents handling"].append(_duration_ms(span))
        elif kind == "PRODUCER":
            samples["ingest: Kafka produce (to ack)"].append(_duration_ms(span))
        elif kind == "CONSUMER":
            if "eta.kafka.queued_ms" in attrs:
                samples["kafka: queued (append → consumed)"].append(float(attrs["eta.kafka.queued_ms"]))
            samples["aggregate: process record"].append(_duration_ms(span))
            if "eta.freshness.event_to_visible_ms" in attrs:
                samples["freshness: event_time → visible in Redis"].append(
                    float(attrs["eta.freshness.event_to_visible_ms"])
                )
        elif name == "redis apply features":
            samples["aggregate: Redis write (batched)"].append(_duration_ms(span))
        elif name == "postgres archive events":
            samples["aggregate: PostgreSQL archive (batch)"].append(_duration_ms(span))
        elif name == "eta.v1.EtaService/PredictEta" and kind == "SERVER":
            samples["predict: PredictEta total"].append(_duration_ms(span))
        elif name == "redis read features":
            samples["predict: Redis read (1 round trip)"].append(_duration_ms(span))
        elif name == "model inference":
            samples["predict: model inference"].append(_duration_ms(span))
    out = []
    for hop, values in samples.items():
        recent = values[-last:]
        out.append(
            HopStats(
                hop, len(recent), _quantile(recent, 0.5), _quantile(recent, 0.95), _quantile(recent, 0.99)
            )
        )
    order = ["ingest", "kafka", "aggregate", "freshness", "predict"]
    out.sort(key=lambda h: (order.index(h.hop.split(":")[0]) if h.hop.split(":")[0] in order else 99, h.hop))
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
        prog="python -m devstack.trace_report",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("files", nargs="+", type=Path, help="span files (JSON lines)")
    parser.add_argument("--last", type=int, default=1000, help="samples per hop (default: 1000)")
    args = parser.parse_args(argv)
    sys.stdout.write(render(hop_stats(load_spans(args.files), last=args.last)) + "\n")


if __name__ == "__main__":
    main()
