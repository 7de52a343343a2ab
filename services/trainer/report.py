"""The training report: ``report.md`` plus two plots (``error_by_hour.png``, ``calibration.png``).

The markdown is also stored with the run (``training_runs.report``). Plots use matplotlib's Agg backend
(no display needed) and are written only when a report directory is given.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from trainer.evaluate import HourlyErrors

__all__ = ["render_markdown", "write_report"]

LABELS = {
    "model": "model (LightGBM p50, range p10–p90)",
    "baseline_restaurant_mean": "baseline: restaurant mean",
    "baseline_distance": "baseline: distance/speed",
    "oracle": "oracle (true hidden state)",
    "model_raw_range": "model, raw range (no calibration)",
    "incumbent": "promoted model before this run",
}
COLORS = {
    "model": "#1f77b4",
    "baseline_restaurant_mean": "#ff7f0e",
    "baseline_distance": "#7f7f7f",
    "oracle": "#2ca02c",
}


def _num(value: Any, digits: int = 2, pct: bool = False) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{100 * value:.1f} %" if pct else f"{value:.{digits}f}"


def render_markdown(
    *, version: str, metrics: dict[str, Any], promoted: bool, promotion_reason: str, plots: bool
) -> str:
    period = metrics.get("period", {})
    lines = [
        f"# Training report — {version}",
        "",
        f"History {period.get('since', '?')} → {period.get('until', '?')}; holdout = orders placed from "
        f"{period.get('holdout_from', '?')} (time-ordered split). Rows: {metrics['rows_train']:,} train, "
        f"{metrics['rows_holdout']:,} holdout ({metrics.get('rows_oracle', 0):,} with the simulator's "
        "oracle).",
        "",
        f"**Promoted: {'yes' if promoted else 'no'}** — {promotion_reason}.",
        "",
        "## Holdout",
        "",
        "| predictor | MAE min | p90 abs error min | p10–p90 coverage | bias min | rows |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for key in (
        "model",
        "model_raw_range",
        "baseline_restaurant_mean",
        "baseline_distance",
        "oracle",
        "incumbent",
    ):
        s = metrics.get(key)
        if not isinstance(s, dict) or "mae" not in s:
            continue
        name = LABELS[key] + (f" `{s['version']}`" if key == "incumbent" else "")
        lines.append(
            f"| {name} | {_num(s['mae'])} | {_num(s['p90_abs_error'])} | {_num(s['coverage'], pct=True)} "
            f"| {_num(s.get('bias'))} | {s.get('rows', 0):,} |"
        )
    ratios = metrics.get("ratios", {})
    lines += [
        "",
        "Ratios (model MAE ÷ …): "
        + ", ".join(f"{k.removeprefix('mae_vs_').replace('_', ' ')} {_num(v, 3)}" for k, v in ratios.items()),
    ]
    if "model_on_oracle_rows" in metrics and metrics.get("rows_oracle", 0) != metrics["rows_holdout"]:
        lines.append(
            f"(vs oracle on the {metrics['rows_oracle']:,} rows that have one: model MAE "
            f"{_num(metrics['model_on_oracle_rows']['mae'])})"
        )
    cal = metrics.get("calibration", {})
    if cal:
        hold, raw = cal.get("holdout", {}), cal.get("holdout_raw", {})
        lines += [
            "",
            "## Range calibration",
            "",
            f"Method: {cal.get('method')}; out-of-fold rows {cal.get('rows', 0):,}; the p10 bound moved "
            f"{_num(-cal.get('low_offset_minutes', 0.0))} min, the p90 bound "
            f"+{_num(cal.get('high_offset_minutes', 0.0))} min; out-of-fold coverage "
            f"{_num(cal.get('raw_coverage_out_of_fold'), pct=True)} raw → "
            f"{_num(cal.get('coverage_out_of_fold'), pct=True)} calibrated.",
            "",
            "| share of holdout deliveries below … | ideal | raw | calibrated |",
            "| --- | ---: | ---: | ---: |",
            f"| p10 bound | 10 % | {_num(raw.get('below_p10'), pct=True)} "
            f"| {_num(hold.get('below_p10'), pct=True)} |",
            f"| p50 (point) | 50 % | {_num(raw.get('below_p50'), pct=True)} "
            f"| {_num(hold.get('below_p50'), pct=True)} |",
            f"| p90 bound | 90 % | {_num(raw.get('below_p90'), pct=True)} "
            f"| {_num(hold.get('below_p90'), pct=True)} |",
        ]
    importance = metrics.get("importance_gain", {})
    if importance:
        total = sum(importance.values()) or 1.0
        ranked = sorted(importance.items(), key=lambda kv: -kv[1])
        lines += ["", "## Feature importance (p50 model, share of gain)", ""]
        lines += [f"- `{name}`: {_num(gain / total, pct=True)}" for name, gain in ranked]
    timings = metrics.get("timings", {})
    if timings:
        lines += [
            "",
            "Timings: " + ", ".join(f"{k.removesuffix('_s')} {v:.1f} s" for k, v in timings.items()),
        ]
    if plots:
        lines += [
            "",
            "## Plots",
            "",
            "![MAE by hour of day](error_by_hour.png)",
            "",
            "![Calibration of the range](calibration.png)",
        ]
    return "\n".join(lines) + "\n"


def write_report(
    report_dir: Path | None,
    *,
    version: str,
    metrics: dict[str, Any],
    hourly: HourlyErrors,
    promoted: bool,
    promotion_reason: str,
) -> str:
    """Render the markdown (returned); with ``report_dir`` also write it and the two PNG plots there."""
    text = render_markdown(
        version=version,
        metrics=metrics,
        promoted=promoted,
        promotion_reason=promotion_reason,
        plots=report_dir is not None,
    )
    if report_dir is None:
        return text
    report_dir.mkdir(parents=True, exist_ok=True)
    _plot_error_by_hour(report_dir / "error_by_hour.png", hourly, version)
    _plot_calibration(report_dir / "calibration.png", metrics, hourly, version)
    (report_dir / "report.md").write_text(text)
    return text


def _hour_range(hourly: HourlyErrors) -> tuple[float, float]:
    """The x range: the hours that have holdout rows (a city closed at night has none then)."""
    used = [h for h, n in zip(hourly.hours, hourly.rows, strict=True) if n]
    return (min(used) - 0.5, max(used) + 0.5) if used else (-0.5, 23.5)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot_error_by_hour(path: Path, hourly: HourlyErrors, version: str) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 4.8), dpi=110)
    try:
        counts = ax.twinx()
        counts.bar(hourly.hours, hourly.rows, color="#dddddd", width=0.8, label="holdout orders")
        counts.set_ylabel("holdout orders per hour")
        ax.set_zorder(counts.get_zorder() + 1)
        ax.patch.set_visible(False)
        for name, values in hourly.mae.items():
            ax.plot(
                hourly.hours,
                values,
                marker="o",
                markersize=3,
                label=LABELS.get(name, name),
                color=COLORS.get(name),
                linewidth=2.2 if name == "model" else 1.4,
            )
        ax.set_xlabel("hour of placement (UTC = city time)")
        ax.set_ylabel("mean absolute error, minutes")
        ax.set_xticks(range(0, 24))
        ax.set_xlim(*_hour_range(hourly))
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", fontsize=8)
        ax.set_title(f"Holdout error by hour — {version}")
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)


def _plot_calibration(path: Path, metrics: dict[str, Any], hourly: HourlyErrors, version: str) -> None:
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.6), dpi=110)
    try:
        nominal = [0.1, 0.5, 0.9]
        keys = ["below_p10", "below_p50", "below_p90"]
        cal = metrics.get("calibration", {})
        left.plot([0, 1], [0, 1], color="#999999", linestyle="--", linewidth=1, label="ideal")
        for label, source, style in (
            ("raw quantile models", cal.get("holdout_raw", {}), "s--"),
            ("conformally calibrated (served)", cal.get("holdout", {}), "o-"),
        ):
            if source:
                left.plot(nominal, [source[k] for k in keys], style, label=label)
        left.set_xlabel("nominal quantile")
        left.set_ylabel("share of holdout deliveries below the prediction")
        left.set_xlim(0, 1)
        left.set_ylim(0, 1)
        left.grid(alpha=0.3)
        left.legend(fontsize=8, loc="upper left")
        left.set_title("Quantile calibration")
        for name, values in hourly.coverage.items():
            right.plot(
                hourly.hours,
                values,
                marker="o",
                markersize=3,
                label=LABELS.get(name, name),
                color=COLORS.get(name),
                linewidth=2.2 if name == "model" else 1.2,
            )
        right.axhspan(0.77, 0.83, color="#2ca02c", alpha=0.12, label="target 80 % ± 3")
        right.axhline(0.8, color="#2ca02c", linewidth=1)
        model = metrics.get("model", {})
        if model.get("coverage") is not None:
            right.text(
                0.02,
                0.04,
                f"model overall: {100 * model['coverage']:.1f} %",
                fontsize=9,
                transform=right.transAxes,
            )
        right.set_xlabel("hour of placement (UTC)")
        right.set_ylabel("share inside [p10, p90]")
        right.set_ylim(0, 1.02)
        right.set_xlim(*_hour_range(hourly))
        right.set_xticks(range(0, 24))
        right.grid(alpha=0.3)
        right.legend(fontsize=8, loc="lower right")
        right.set_title("Range coverage by hour")
        fig.suptitle(f"Calibration of the ETA range — {version}")
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)
