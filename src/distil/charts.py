"""Plots and markdown tables: the pieces every report is made of.

    plot_curves({"ce": [(step, loss), ...], "forward_kl": [...]}, "plots/train_loss.png", ylabel="loss")
    markdown_table(["model", "val loss"], [["teacher", "2.91"], ...])

Matplotlib runs headless (Agg). Every file is written atomically.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

from distil.fsutil import atomic_write_bytes


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(
    series: dict[str, Sequence[tuple[float, float]]],
    path: str | Path,
    *,
    title: str = "",
    xlabel: str = "step",
    ylabel: str = "loss",
    logy: bool = False,
    hlines: dict[str, float] | None = None,
    markers: bool = False,
) -> Path:
    """One line per named series of (x, y) points; optional labelled horizontal reference lines."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for name, points in series.items():
        if not points:
            continue
        xs, ys = zip(*points)
        ax.plot(xs, ys, label=name, marker="o" if markers else None, markersize=3)
    for (name, value), style in zip((hlines or {}).items(), ("--", ":", "-.", "--")):
        ax.axhline(value, linestyle=style, color="gray", linewidth=1, label=name)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
    return Path(path)


def plot_bars(values: dict[str, float], path: str | Path, *, title: str = "", ylabel: str = "",
              hlines: dict[str, float] | None = None) -> Path:
    """One labelled bar per value (NaN: no bar), with labelled horizontal reference lines."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    names = list(values)
    bars = ax.bar(range(len(names)), [values[n] for n in names], color="tab:blue", alpha=0.8)
    for bar, name in zip(bars, names):
        if values[name] == values[name]:
            ax.annotate(f"{values[name]:.3f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                        va="bottom", fontsize=8)
    for (name, value), style in zip((hlines or {}).items(), ("--", ":", "-.", "--")):
        ax.axhline(value, linestyle=style, color="gray", linewidth=1, label=name)
    ax.set_xticks(range(len(names)), names, rotation=15, fontsize=8)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    ax.set_ylim(0, 1.0)
    if hlines:
        ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
    return Path(path)


def smooth(values: Sequence[float], window: int) -> list[float]:
    """Trailing moving average, for readable training curves."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    def cell(x):
        if isinstance(x, float):
            return f"{x:.4g}" if abs(x) < 1e5 else f"{x:,.0f}"
        return str(x)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


def format_params(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.0f}K"
