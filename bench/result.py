"""The shape every benchmark returns, and how it is printed and saved."""

from __future__ import annotations

import json
import platform
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Target:
    """A target of the benchmark: ``value op limit`` (op ``<=`` or ``>=``); ``ratio`` = value / limit."""

    name: str
    value: float
    op: str
    limit: float
    unit: str = ""

    @property
    def ratio(self) -> float:
        return self.value / self.limit if self.limit else float("nan")

    @property
    def met(self) -> bool:
        return self.value <= self.limit if self.op == "<=" else self.value >= self.limit

    def line(self) -> str:
        unit = f" {self.unit}" if self.unit else ""
        return (
            f"target {self.name}: {self.value:,.4g}{unit} {self.op} {self.limit:,.4g}{unit} "
            f"(ratio {self.ratio:.2f}) — {'met' if self.met else 'NOT met'}"
        )


class Skipped(Exception):
    """A benchmark that cannot run here (e.g. an optional extra is not installed): reported, not failed."""


@dataclass
class BenchResult:
    name: str
    # Rows of the printed table: each a dict of column -> value (first row defines the columns).
    rows: list[dict[str, Any]]
    # The headline figures, e.g. {"events_per_s": ..., "baseline_events_per_s": ..., "ratio": ...}.
    figures: dict[str, float]
    baseline: str
    notes: list[str] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)  # saved, not printed (e.g. every run's figures)

    def table(self) -> str:
        if not self.rows:
            return "(no rows)"
        columns = list(self.rows[0])
        cells = [[_fmt(row.get(col)) for col in columns] for row in self.rows]
        widths = [max(len(col), *(len(r[i]) for r in cells)) for i, col in enumerate(columns)]
        lines = ["  ".join(col.ljust(widths[i]) for i, col in enumerate(columns))]
        lines.append("  ".join("-" * w for w in widths))
        lines.extend("  ".join(cell.rjust(widths[i]) for i, cell in enumerate(r)) for r in cells)
        return "\n".join(lines)

    def save(self) -> Path:
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        path = RESULTS_DIR / f"{self.name}.json"
        payload = {
            **asdict(self),
            "targets": [{**asdict(t), "ratio": t.ratio, "met": t.met} for t in self.targets],
            "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": {
                "python": platform.python_version(),
                "cpu_count": _cpu_count(),
                "platform": platform.platform(),
            },
        }
        path.write_text(json.dumps(payload, indent=2) + "\n")
        return path


def _cpu_count() -> int:
    import os

    return os.cpu_count() or 0


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.3f}" if abs(value) < 100 else f"{value:,.0f}"
    return str(value)
