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


def _colours(n: int) -> list:
    """n distinct colours: tab10 up to 10, tab20 up to 20, then evenly spaced on a perceptual map."""
    plt = _pyplot()
    if n <= 10:
        return [plt.get_cmap("tab10")(i) for i in range(n)]
    if n <= 20:
        return [plt.get_cmap("tab20")(i) for i in range(n)]
    return [plt.get_cmap("turbo")(i / (n - 1)) for i in range(n)]


def spans_decade(series: dict[str, Sequence[tuple[float, float]]]) -> bool:
    """Whether the positive values of ``series`` span a factor of 10 (where a log axis helps)."""
    positive = [y for points in series.values() for _, y in points if y > 0]
    return bool(positive) and max(positive) >= 10 * min(positive)


def curves_figure(
    series: dict[str, Sequence[tuple[float, float]]],
    *,
    title: str = "",
    xlabel: str = "step",
    ylabel: str = "loss",
    logy: bool = False,
    hlines: dict[str, float] | None = None,
    markers: bool = False,
):
    """The figure :func:`plot_curves` saves: one line per series in its own colour, grey reference
    lines, the legend outside the axes. ``logy`` takes effect only where the plotted values span a
    decade (a symmetric log when a value or reference is 0 or below); otherwise the axis stays linear."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.2), dpi=110)
    drawn = {name: points for name, points in series.items() if points}
    for (name, points), colour in zip(drawn.items(), _colours(len(drawn))):
        xs, ys = zip(*points)
        ax.plot(xs, ys, label=name, color=colour, marker="o" if markers else None, markersize=3)
    for (name, value), style in zip((hlines or {}).items(), ("--", ":", "-.", (0, (5, 1, 1, 1)))):
        ax.axhline(value, linestyle=style, color="gray", linewidth=1.2, label=name)
    values = [y for points in drawn.values() for _, y in points] + list((hlines or {}).values())
    positive = [v for v in values if v > 0]
    if logy and positive and max(positive) >= 10 * min(positive):
        if len(positive) < len(values):
            ax.set_yscale("symlog", linthresh=min(positive))
            if min(values) == 0:
                ax.set_ylim(bottom=0)  # a reference at 0 (the teacher's KL) at the foot, no empty negative half
        else:
            ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    if drawn or hlines:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    fig.tight_layout()
    return fig


def figure_problems(fig, expected: Sequence[str] = ()) -> list[str]:
    """What makes a saved curve figure misleading: an expected series without a line, two data
    lines of one colour, a legend that overlaps the plotting area or misses a line."""
    problems = []
    ax = fig.axes[0]
    lines = [line for line in ax.get_lines() if not line.get_label().startswith("_")]
    labels = [line.get_label() for line in lines]
    for name in expected:
        if name not in labels:
            problems.append(f"series {name!r} has no line")
    data = [line for line in lines if line.get_color() != "gray"]
    colours = [tuple(line.get_color()) if not isinstance(line.get_color(), str) else line.get_color() for line in data]
    if len(set(colours)) < len(colours):
        problems.append(f"{len(colours)} series share {len(set(colours))} colours")
    legend = ax.get_legend()
    if lines and legend is None:
        problems.append("no legend")
    elif legend is not None:
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        box, area = legend.get_window_extent(renderer), ax.get_window_extent(renderer)
        if box.overlaps(area):
            problems.append("the legend overlaps the plotting area")
        shown = [text.get_text() for text in legend.get_texts()]
        problems += [f"series {name!r} is missing from the legend" for name in labels if name not in shown]
    return problems


def save_figure(fig, path: str | Path) -> Path:
    plt = _pyplot()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
    return Path(path)


def plot_curves(series: dict[str, Sequence[tuple[float, float]]], path: str | Path, **options) -> Path:
    """One line per named series of (x, y) points; optional labelled horizontal reference lines.
    ``options`` are :func:`curves_figure`'s (title, xlabel, ylabel, logy, hlines, markers); saved as a PNG."""
    return save_figure(curves_figure(series, **options), path)


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
    return save_figure(fig, path)


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
