"""The shape every benchmark returns, and how it is printed and saved."""

from __future__ import annotations

import json
import platform
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"


@dataclass
class BenchResult:
    name: str
    # Rows of the printed table: each a dict of column -> value (first row defines the columns).
    rows: list[dict[str, Any]]
    # The headline figures, e.g. {"events_per_s": ..., "baseline_events_per_s": ..., "ratio": ...}.
    figures: dict[str, float]
    baseline: str
    notes: list[str] = field(default_factory=list)

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
