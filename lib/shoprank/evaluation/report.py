"""Markdown reports with PNG plots, so a run's outcome can be seen at a glance.

Every evaluation and tuning job ends with one ``report.md`` next to its outputs: a metrics
table (baselines, zero-shot and fine-tuned side by side) and a few plots. Figures are built with
matplotlib's object API and rendered by Agg: no pyplot global state and no display needed, so this
works on headless machines and inside Ray workers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

_DPI = 110


def _fmt(value: float | None) -> str:
    if value is None or math.isnan(float(value)):
        return "–"
    return f"{float(value):.4f}"


def metrics_table(rows: dict[str, dict[str, float]], columns: list[str] | None = None) -> str:
    """Markdown table, one row per model, 4 decimals; missing values show as '–'.

    Columns default to the union of metric names in first-seen order.
    """
    if columns is None:
        columns = list(dict.fromkeys(name for metrics in rows.values() for name in metrics))
    lines = [
        "| model | " + " | ".join(columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for model, metrics in rows.items():
        cells = [_fmt(metrics.get(c)) for c in columns]
        name = str(model).replace("|", "\\|")  # a pipe would split the row
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _figure(width: float, height: float) -> tuple[Figure, Axes]:
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)  # attach the Agg canvas explicitly
    return fig, fig.subplots()


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=_DPI, format="png")
    return path


def bar_chart(rows: dict[str, dict[str, float]], metrics: list[str], path: str | Path) -> Path:
    """Grouped bars: one group per metric, one bar per model, each bar labelled with its value."""
    models = list(rows)
    n = max(len(models), 1)
    width = 0.8 / n
    x = np.arange(len(metrics))
    fig, ax = _figure(max(6.0, 1.2 * len(metrics) * n**0.5 + 3), 4.2)
    for i, model in enumerate(models):
        values = [rows[model].get(m, float("nan")) for m in metrics]
        bars = ax.bar(x + (i - (n - 1) / 2) * width, values, width, label=model)
        ax.bar_label(bars, labels=[_fmt(v) for v in values], fontsize=7, padding=2, rotation=90)
    ax.set_xticks(x, metrics)
    ax.set_ylabel("value")
    ax.margins(y=0.25)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _save(fig, path)


def curve_plot(
    series: dict[str, tuple[Sequence[float], Sequence[float]]],
    xlabel: str,
    ylabel: str,
    title: str,
    path: str | Path,
) -> Path:
    """Line plot of named (x, y) series: loss or a validation metric over steps, Recall@K."""
    fig, ax = _figure(6.4, 4.2)
    for name, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o" if len(xs) <= 20 else None, markersize=3, label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if series:
        ax.legend(fontsize=8)
    return _save(fig, path)


def scatter_plot(
    groups: dict[str, tuple[Sequence, Sequence, Sequence[bool]]],
    xlabel: str,
    ylabel: str,
    title: str,
    path: str | Path,
    logx: bool = False,
) -> Path:
    """Points (x, y) in named groups; points flagged False are drawn hollow (a sweep's trials
    that were stopped early: their value is from fewer validations)."""
    fig, ax = _figure(6.4, 4.2)
    for i, (name, (xs, ys, full)) in enumerate(groups.items()):
        color = f"C{i % 10}"
        for filled in (True, False):
            pick = [j for j, f in enumerate(full) if bool(f) == filled]
            if not pick:
                continue
            ax.scatter(
                [xs[j] for j in pick],
                [ys[j] for j in pick],
                s=36,
                color=color if filled else "none",
                edgecolors=color,
                label=name if filled or not any(full) else None,
            )
    if logx:
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # decade labels only: no overlaps
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if len(groups) > 1 or any(name for name in groups):
        ax.legend(fontsize=8)
    return _save(fig, path)


def score_histogram(
    pos_scores: Sequence[float] | np.ndarray,
    neg_scores: Sequence[float] | np.ndarray,
    path: str | Path,
    title: str,
) -> Path:
    """Overlaid density histograms of positive vs negative scores: how well they separate."""
    pos = np.asarray(pos_scores, dtype=np.float64)
    neg = np.asarray(neg_scores, dtype=np.float64)
    both = np.concatenate([pos, neg])
    both = both[np.isfinite(both)]
    bins = np.histogram_bin_edges(both, bins=40) if both.size else 10
    fig, ax = _figure(6.4, 4.2)
    ax.hist(neg, bins=bins, density=True, alpha=0.55, label=f"negatives (n={neg.size})")
    ax.hist(pos, bins=bins, density=True, alpha=0.55, label=f"positives (n={pos.size})")
    ax.set_xlabel("score")
    ax.set_ylabel("density")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return _save(fig, path)


def write_report(
    out_dir: str | Path,
    title: str,
    sections: list[tuple[str, str]],
    images: dict[str, Path] | None = None,
    computed: str | None = None,
) -> Path:
    """Write ``out_dir/report.md``: the sections in order, then the images (relative links).

    Images outside ``out_dir`` are linked by absolute path, so the link still resolves.
    `computed` (the precisions the models ran in) adds a line naming the host's CPU.
    """
    from shoprank.precision import host_line

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    parts = [f"# {title}\n"]
    if computed:
        parts.append(f"Computed on: {host_line(computed)}.\n")
    for heading, body in sections:
        parts.append(f"## {heading}\n\n{body.strip()}\n")
    if images:
        parts.append("## Plots\n")
        for caption, image in images.items():
            image = Path(image).resolve()
            try:
                link = image.relative_to(out_dir.resolve()).as_posix()
            except ValueError:
                link = image.as_posix()
            parts.append(f"### {caption}\n\n![{caption}]({link})\n")
    path = out_dir / "report.md"
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


def training_curve(
    history: list[dict], steps: list[dict], keys: list[str], path: str | Path
) -> Path:
    """Training loss at every logged step, validation metrics at every validation."""
    if steps:
        series = {"train loss": ([s["step"] for s in steps], [s["loss"] for s in steps])}
    else:  # an export from before steps were logged: the loss at each validation
        series = {"train loss": ([h["step"] for h in history], [h["train_loss"] for h in history])}
    for key in keys:
        points = [h for h in history if key in h]
        if points:
            series[key] = ([h["step"] for h in points], [h[key] for h in points])
    return curve_plot(series, "optimizer step", "value", "training and validation", path)


def print_table(table: dict[str, dict[str, float]], columns: list[str]) -> None:
    """A result table on the console, one model a row."""
    width = max(len(name) for name in table)
    print(f"\n{'model':<{width}}  " + "  ".join(f"{m:>9}" for m in columns))
    for name, row in table.items():
        print(f"{name:<{width}}  " + "  ".join(f"{row.get(m, float('nan')):9.4f}" for m in columns))


def training_time(timing: dict, steps: list[dict]) -> str:
    """Where a training run's wall time went (rank 0): steps (of which waiting for data),
    validation and checkpointing, with the median training throughput."""
    if not timing:
        return ""
    parts = {k: timing.get(f"{k}_s", 0.0) for k in ("train", "validation", "checkpoint")}
    wall = sum(parts.values()) or 1.0
    rates = [s["pairs_per_s"] for s in steps if s.get("pairs_per_s")]
    rate = f"{float(np.median(rates)):.1f} pairs/s" if rates else "no step logged"
    wait = timing.get("data_wait_s", 0.0)
    return (
        f"training {wall:.0f} s: steps {parts['train']:.0f} s at {rate} (waiting for data "
        f"{100 * wait / wall:.1f}% of the wall time), validation {parts['validation']:.0f} s "
        f"({100 * parts['validation'] / wall:.0f}%), checkpointing {parts['checkpoint']:.0f} s "
        f"({100 * parts['checkpoint'] / wall:.0f}%)"
    )
