"""``distil report``: compare finished runs in one markdown report with plots.

    write_comparison_report(["runs/ce", "runs/kl"], "reports/compare")

The plotting and table helpers live in distil.charts (re-exported here).
"""

from __future__ import annotations

import logging
from pathlib import Path

from distil.charts import format_params, markdown_table, plot_bars, plot_curves, smooth, spans_decade
from distil.errors import DistilError
from distil.fsutil import atomic_write_text
from distil.run_dir import read_metrics

log = logging.getLogger("distil")

__all__ = ["format_params", "markdown_table", "plot_curves", "smooth", "read_run_series", "write_comparison_report"]


# ---------------------------------------------------------------------------------------------
# `distil report`: compare runs


def read_run_series(path: str | Path) -> dict:
    """A run's curves and summary, from a run folder (metrics.jsonl, summary.json) or from a text
    log of ``index label value`` lines (the format of the source notebook: label train / val / hella)."""
    import json

    path = Path(path)
    series: dict[str, list[tuple[float, float]]] = {}
    summary: dict = {}
    if path.is_dir():
        records = read_metrics(path / "metrics.jsonl")
        if not records:
            raise DistilError(f"run folder {path} has no metrics.jsonl records")
        for r in records:
            if r["step"] < 0:
                summary[r["name"]] = r["value"]  # `distil eval --run` results
                continue
            key = "train" if (r["split"], r["name"]) == ("train", "loss") else f"{r['split']}/{r['name']}"
            if r["split"] == "val" and r["name"] == "loss":
                key = "val"
            series.setdefault(key, []).append((r["step"], r["value"]))
        if (path / "summary.json").is_file():
            summary.update(json.loads((path / "summary.json").read_text()))
        name = path.name
        objective, tokenizer = _objective(path), _tokenizer_id(path)
    elif path.is_file():
        for line_no, line in enumerate(path.read_text().splitlines(), 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 3:
                raise DistilError(f"{path}:{line_no}: expected 'index label value', got {line!r}")
            try:
                series.setdefault(parts[1], []).append((float(parts[0]), float(parts[2])))
            except ValueError as e:
                raise DistilError(f"{path}:{line_no}: index and value must be numbers: {line!r}") from e
        name = path.stem
        objective = tokenizer = None
    else:
        raise DistilError(f"run not found: {path}")
    return {"name": name, "series": {k: sorted(v) for k, v in series.items()}, "summary": summary,
            "objective": objective, "tokenizer": tokenizer}


def _objective(run: Path) -> str | None:
    """What a run's training loss measures, from its config.yaml: "CE", "forward_kl", "0.5 CE + reverse_kl"."""
    import yaml

    try:
        loss = (yaml.safe_load((run / "config.yaml").read_text()) or {}).get("loss", {})
    except (OSError, yaml.YAMLError):
        return None
    parts = []
    if loss.get("ce_weight"):
        parts.append("CE" if loss["ce_weight"] == 1 else f"{loss['ce_weight']:g} CE")
    if loss.get("kd_weight"):
        parts.append(loss.get("kind", "forward_kl") if loss["kd_weight"] == 1 else f"{loss['kd_weight']:g} {loss['kind']}")
    return " + ".join(parts) or None


def _tokenizer_id(run: Path) -> str | None:
    """A hash of the tokenizer the run saved (tokenizer/ or checkpoints/final/), or None."""
    import hashlib

    for folder in (run / "checkpoints" / "final", run / "tokenizer"):
        if (folder / "tokenizer.json").is_file():
            return hashlib.sha256((folder / "tokenizer.json").read_bytes()).hexdigest()[:12]
    return None


def _final_accuracy(run: dict) -> float | None:
    s, series = run["summary"], run["series"]
    if "multiple_choice/acc" in s:
        return s["multiple_choice/acc"]
    for key in ("hella", "eval/acc", "val/mc_acc"):
        if series.get(key):
            return series[key][-1][1]
    return None


def _summary_row(run: dict) -> list:
    s, series = run["summary"], run["series"]
    final = s.get("final_val") or {}

    def last(key):
        return series[key][-1][1] if series.get(key) else None

    # `distil eval --run` and the demos write final numbers as eval rows (lm/..., multiple_choice/...);
    # they come first, then the run's own final validation, then its last logged point.
    val_loss = s.get("lm/loss", final.get("loss", last("val")))
    ppl = s.get("lm/ppl", final.get("ppl", last("val/ppl")))
    kl = s.get("lm/kl_to_teacher", final.get("kl_to_teacher", last("val/kl_to_teacher")))
    acc = s.get("multiple_choice/acc", last("hella") or last("eval/acc") or last("val/mc_acc"))
    acc_norm = s.get("multiple_choice/acc_norm", last("eval/acc_norm") or last("val/mc_acc_norm"))
    tps = s.get("tokens_per_second", last("train/tokens_per_second"))
    params = s.get("params")

    def fmt(x, spec):
        return "-" if x is None else format(x, spec)

    return [run["name"], fmt(val_loss, ".4f"), fmt(ppl, ".2f"), fmt(acc, ".4f"), fmt(acc_norm, ".4f"), fmt(kl, ".4f"),
            fmt(tps, ",.0f"), "-" if params is None else format_params(int(params))]


def write_comparison_report(runs: list[str], out: str | Path, *, chance: float | None = 0.25,
                            baselines: dict[str, float] | None = None, smooth_window: int = 1) -> Path:
    """report.md, PNG plots and a self-contained report.html comparing ``runs``."""
    import base64
    import html

    out = Path(out)
    loaded = [read_run_series(r) for r in runs]
    plots = []

    def plot(key_filter, filename, title, ylabel, *, logy=False, refs=None, runs=None):
        series = {}
        for run in loaded if runs is None else runs:
            for key, points in run["series"].items():
                if key_filter(key):
                    label = run["name"] if key in ("train", "val") else f"{run['name']} {key}"
                    ys = smooth([y for _, y in points], smooth_window) if key == "train" else [y for _, y in points]
                    series[label] = list(zip([x for x, _ in points], ys))
        if series and logy and not spans_decade(series):
            return  # a log axis over less than a decade only distorts; the linear plot says it all
        if series:
            plot_curves(series, out / filename, title=title, ylabel=ylabel, logy=logy, hlines=refs,
                        markers=not key_filter("train"))
            plots.append((title, filename))

    notes = []
    objectives = {r["objective"] for r in loaded if r["objective"]}
    if len(objectives) > 1:
        # CE and a KL divergence are different quantities: one axis per objective.
        for objective in sorted(objectives):
            members = {r["name"] for r in loaded if r["objective"] == objective}
            safe = "".join(c if c.isalnum() else "_" for c in objective)
            plot(lambda k: k == "train", f"train_loss_{safe}.png", f"Training loss: {objective}", objective,
                 runs=[r for r in loaded if r["name"] in members])
        notes.append(f"The runs trained on different objectives ({', '.join(sorted(objectives))}): their training "
                     "losses are plotted on separate axes; compare them on the held-out loss.")
    else:
        plot(lambda k: k == "train", "train_loss.png", "Training loss", "loss")
        plot(lambda k: k == "train", "train_loss_log.png", "Training loss (log scale)", "loss", logy=True)
    tokenizers = {r["tokenizer"] for r in loaded if r["tokenizer"]}
    if len(tokenizers) > 1:
        notes.append("The runs use different tokenizers: held-out losses and perplexities are per token of "
                     "different vocabularies and are not directly comparable.")
    plot(lambda k: k == "val", "val_loss.png", "Validation loss", "loss")
    plot(lambda k: k == "val", "val_loss_log.png", "Validation loss (log scale)", "loss", logy=True)
    refs = {}
    if chance is not None:
        refs[f"random chance ({chance:g})"] = chance
    for name, value in (baselines or {}).items():
        refs[f"{name} ({value:g})"] = value
    eval_keys = lambda k: k in ("hella", "eval/acc", "eval/acc_norm") or k.startswith(("val/mc_", "mc"))  # noqa: E731
    plotted = len(plots)
    plot(eval_keys, "eval_accuracy.png", "Evaluation accuracy over steps", "accuracy", refs=refs)
    finals = {r["name"]: _final_accuracy(r) for r in loaded}
    if len(plots) == plotted and any(v is not None for v in finals.values()):
        # Only final accuracies (eval rows of `distil eval --run` or a demo): one bar per run, references beside.
        plot_bars({k: float("nan") if v is None else v for k, v in finals.items()}, out / "final_accuracy.png",
                  title="Final multiple-choice accuracy", ylabel="accuracy", hlines=refs)
        plots.append(("Final multiple-choice accuracy", "final_accuracy.png"))
    if baselines and len(plots) == plotted:
        notes.append(f"--baseline {', '.join(baselines)} not shown: none of the runs has an accuracy metric to "
                     "compare it with.")
    plot(lambda k: k in ("val/kl_to_teacher",), "kl_to_teacher.png", "KL to the teacher (held out)", "KL")

    header = ["run", "final val loss", "ppl", "acc", "acc_norm", "KL to teacher", "tokens/s", "params"]
    rows = [_summary_row(r) for r in loaded]
    for note in notes:
        log.warning("%s", note)
    md = ["# Run comparison", "", markdown_table(header, rows), ""] + [f"**Note:** {n}" for n in notes] + [""]
    md += [f"![{title}]({filename})" for title, filename in plots]
    md += ["", f"Runs: {', '.join(str(r) for r in runs)}.", ""]
    atomic_write_text_path(out / "report.md", "\n".join(md))

    def img(filename):
        data = base64.b64encode((out / filename).read_bytes()).decode()
        return f'<img alt="{html.escape(filename)}" src="data:image/png;base64,{data}">'

    table = "<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>" + "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows) + "</table>"
    figures = "".join(f"<figure>{img(f)}<figcaption>{html.escape(t)}</figcaption></figure>" for t, f in plots)
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>distil run comparison</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1000px}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}th{{background:#f3f3f3}}
img{{max-width:100%}}figure{{margin:1.5em 0}}</style></head>
<body><h1>Run comparison</h1>{table}{"".join(f"<p><b>Note:</b> {html.escape(n)}</p>" for n in notes)}{figures}</body></html>
"""
    atomic_write_text_path(out / "report.html", page)
    return out / "report.md"


def markdown_page(md: str, folder: str | Path, *, title: str) -> str:
    """A self-contained HTML page from the markdown distil writes (headings, paragraphs, bullet
    lists, pipe tables, **bold**, `code`, and images relative to ``folder``, embedded as data URIs)."""
    import base64
    import html
    import re

    folder = Path(folder)

    def inline(text: str) -> str:
        text = html.escape(text)
        text = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", text)
        text = re.sub(r"\*(.+?)\*", r"<i>\1</i>", text)
        return re.sub(r"`(.+?)`", r"<code>\1</code>", text)

    def image(match) -> str:
        alt, src = match.group(1), match.group(2)
        path = folder / src
        if not path.is_file():
            return f"<p>(missing image {html.escape(src)})</p>"
        data = base64.b64encode(path.read_bytes()).decode()
        return f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"></figure>'

    out, paragraph, table, items = [], [], [], []

    def flush():
        if paragraph:
            out.append(f"<p>{inline(' '.join(paragraph))}</p>")
            paragraph.clear()
        if items:
            out.append("<ul>" + "".join(f"<li>{inline(i)}</li>" for i in items) + "</ul>")
            items.clear()
        if table:
            rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in table
                    if not re.fullmatch(r"\|?[\s:|-]+\|?", line.strip())]
            head, body = rows[0], rows[1:]
            out.append("<table><tr>" + "".join(f"<th>{inline(c)}</th>" for c in head) + "</tr>" + "".join(
                "<tr>" + "".join(f"<td>{inline(c)}</td>" for c in row) + "</tr>" for row in body) + "</table>")
            table.clear()

    for line in md.splitlines():
        stripped = line.strip()
        if stripped.startswith("|"):
            if paragraph or items:
                flush()
            table.append(stripped)
            continue
        if table:
            flush()
        if not stripped:
            flush()
        elif stripped.startswith("#"):
            flush()
            level = len(stripped) - len(stripped.lstrip("#"))
            out.append(f"<h{level}>{inline(stripped[level:].strip())}</h{level}>")
        elif re.fullmatch(r"!\[(.*?)\]\((.+?)\)", stripped):
            flush()
            out.append(re.sub(r"!\[(.*?)\]\((.+?)\)", image, stripped))
        elif stripped.startswith("- "):
            if paragraph:
                flush()
            items.append(stripped[2:])
        elif items:
            items[-1] += " " + stripped
        else:
            paragraph.append(stripped)
    flush()
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1100px}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:left}}th{{background:#f3f3f3}}
img{{max-width:100%}}figure{{margin:1em 0}}code{{background:#f5f5f5}}</style></head>
<body>{"".join(out)}</body></html>
"""


def atomic_write_text_path(path: Path, text: str) -> None:
    atomic_write_text(path, text)
