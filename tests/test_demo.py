"""The demo's pipeline on a tiny budget: every stage runs and the report says who won."""

import json

import pytest

from distil.demo import DemoSettings, demo_plots, mc_cell, mc_sentence, run_demo, standing, verdict
from distil.eval.compare import mc_chance


@pytest.mark.slow
def test_demo_pipeline_writes_an_honest_report(tmp_path):
    settings = DemoSettings(vocab_size=384, seq_len=32, batch_size=4, teacher=(48, 2, 2), student=(32, 1, 2),
                            teacher_steps=8, student_steps=4, val_every=2, val_batches=2, mc_items=8, max_docs=150,
                            hybrid_steps=2, decode_tokens=4, decode_context=16)
    results = run_demo(tmp_path / "demo", settings=settings, progress=False)
    assert set(results) == {"teacher", "ce", "forward_kl", "reverse_kl"}
    report = (tmp_path / "demo" / "report.md").read_text()
    assert verdict(results) in report
    for label in ("teacher", "hard-label CE only", "forward KL", "reverse KL"):
        assert f"| {label} |" in report
    for name in ("ce", "forward_kl", "reverse_kl"):  # two seeds each, judged pairwise
        assert len(results[name]["per_seed"]["val_loss"]) == 2
        assert (tmp_path / "demo" / "runs" / f"{name}-seed1" / "metrics.jsonl").is_file()
    assert "## 50% hybrid" in report and "MIL (from attention)" in report and "teacher (all attention)" in report
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    hybrids = summary["hybrids"]
    for init in ("mil", "random"):
        assert {"kl_before", "kl_after", "val_loss", "decode_tokens_per_second", "params"} <= set(hybrids[init])
        assert len(hybrids[init]["decode_tokens_per_second"]) == len(hybrids["teacher_decode_tokens_per_second"]) == 5
    assert hybrids["size"]["hybrid"] == hybrids["mil"]["params"] and hybrids["size"]["teacher"] == results["teacher"]["params"]
    assert "have no attention counterpart" in report and "decode tokens/s: median (range of 5 runs)" in report
    assert ("(chance)" in report) or ("Every model scores above chance" in report)
    for plot in ("val_loss.png", "train_loss_ce.png", "train_loss_kd.png", "kl_to_teacher.png"):
        assert (tmp_path / "demo" / "plots" / plot).stat().st_size > 1000
    # `distil report` over the demo's own run folders shows the KL and accuracy the demo measured.
    from distil.report import read_run_series, write_comparison_report

    run = read_run_series(tmp_path / "demo" / "runs" / "forward_kl")
    assert run["summary"]["lm/kl_to_teacher"] == pytest.approx(results["forward_kl"]["per_seed"]["kl_to_teacher"][0])
    compared = write_comparison_report([tmp_path / "demo" / "runs" / n for n in ("ce", "forward_kl")], tmp_path / "rep",
                                       baselines={"GPT-2 124M": 0.2955}).read_text()
    row = next(line for line in compared.splitlines() if line.startswith("| forward_kl |"))
    assert "| - |" not in row and "not shown" not in compared and "final_accuracy.png" in compared
    assert json.loads((tmp_path / "demo" / "summary.json").read_text())["complete"] is True
    # The tokenizer and every model are saved in loadable form.
    from transformers import AutoTokenizer

    from distil.models import load

    AutoTokenizer.from_pretrained(str(tmp_path / "demo" / "tokenizer"))
    assert load(tmp_path / "demo" / "checkpoints" / "forward_kl").num_parameters() == results["forward_kl"]["params"]
    # Checkpoints carry the tokenizer, so configs/debug-kd.yaml can use the demo's teacher as it is.
    from distil.data.tokenize import has_tokenizer

    for name in ("teacher", "forward_kl", "hybrid_mil"):
        assert has_tokenizer(tmp_path / "demo" / "checkpoints" / name), name


def _results(**losses):
    """Demo results with per-seed held-out losses: name=[loss per seed]."""
    labels = {"ce": "hard-label CE only", "forward_kl": "forward KL", "reverse_kl": "reverse KL"}
    out = {"teacher": {"val_loss": 1.0, "label": "teacher"}}
    for name, values in losses.items():
        out[name] = {"val_loss": sum(values) / len(values), "label": labels[name], "per_seed": {"val_loss": values}}
    return out


def test_a_student_is_ranked_only_beyond_its_spread_over_seeds():
    one_seed = verdict(_results(ce=[2.0], forward_kl=[1.5], reverse_kl=[2.3]))
    assert one_seed.startswith("No student is ranked: one seed") and "beat" not in one_seed
    clear = verdict(_results(ce=[2.0, 2.02], forward_kl=[1.5, 1.51], reverse_kl=[2.3, 2.31]))
    assert clear.startswith("The **forward KL** student beat CE-only") and "0.505 nats (25.1%)" in clear
    assert "reverse KL against CE-only: the opposite" in clear
    noisy = verdict(_results(ce=[2.0, 2.2], forward_kl=[2.1, 1.9], reverse_kl=[2.05, 2.15]))
    assert noisy.startswith("No student is ranked: none beat CE-only on every one of 2 seeds")
    assert "the seeds disagree in sign" in noisy
    small = verdict(_results(ce=[2.0, 2.001], forward_kl=[1.99, 1.991], reverse_kl=[2.3, 2.31]))
    assert small.startswith("No student is ranked")  # every seed better, but by 0.5%: under the 2% that counts
    worse = verdict(_results(ce=[2.0, 2.01], forward_kl=[2.1, 2.12], reverse_kl=[2.3, 2.31]))
    assert worse.startswith("Distillation did **not** beat CE-only")


def test_models_at_chance_on_multiple_choice_are_marked():
    assert mc_chance(0.236, 100) and mc_chance(0.33, 100) and not mc_chance(0.34, 100)  # 0.25 + 2 SE = 0.3366
    assert not mc_chance(0.30, 2000)  # the same 0.30 is beyond chance over many items
    rows = [{"label": "teacher", "mc_acc": 0.236, "mc_items": 100}, {"label": "big", "mc_acc": 0.86, "mc_items": 100}]
    assert mc_cell(rows[0]) == "0.236 (chance)" and mc_cell(rows[1]) == "0.860"
    assert "which guessing reaches: teacher." in mc_sentence(rows)


def test_standing_says_which_models_are_closer_to_guessing_than_to_the_teacher():
    results = {"teacher": {"label": "teacher", "val_loss": 3.379}, "ce": {"label": "CE", "val_loss": 6.749},
               "reverse_kl": {"label": "reverse KL", "val_loss": 9.03}}
    text = standing(results, 49152)
    assert "ln 49,152 = 10.80" in text and "CE 55%" in text and "reverse KL 24%" in text
    assert text.endswith("Closer to a uniform guess than to the teacher: reverse KL.")


def _history(steps, start, end, kl=None):
    out = []
    for i, step in enumerate(steps):
        value = start + (end - start) * i / max(1, len(steps) - 1)
        record = {"step": step, "tokens": step * 10, "loss": value + 0.1, "val_loss": value}
        if kl is not None:
            record["val_kl_to_teacher"] = kl * (1 - 0.5 * i / len(steps))
        out.append(record)
    return out


def test_every_demo_plot_shows_its_series_the_teacher_level_and_an_outside_legend(tmp_path):
    from distil.charts import curves_figure, figure_problems, plot_curves

    settings = DemoSettings(student_steps=20, val_batches=2)
    results = {"teacher": {"label": "teacher"}, "ce": {"label": "hard-label CE only"},
               "forward_kl": {"label": "forward KL"}, "reverse_kl": {"label": "reverse KL"}}
    histories = {"teacher": _history(range(1, 21), 7.0, 5.8), "ce": _history(range(1, 21), 7.2, 6.1, kl=0.9),
                 "forward_kl": _history(range(1, 21), 7.1, 6.0, kl=0.5), "reverse_kl": _history(range(1, 21), 7.3, 6.2, kl=0.7)}
    hybrids = {init: {"curve": [(0, 5.9, 0.02), (4, 5.85, 0.004)]} for init in ("mil", "random")}
    hybrids["teacher"] = {"val_loss": 5.84}
    plots = demo_plots(settings, results, histories, hybrids)
    assert set(plots) == {"train_loss_ce.png", "train_loss_kd.png", "val_loss.png", "kl_to_teacher.png"}
    for filename, spec in plots.items():
        assert any("teacher" in name for name in [*spec["series"], *(spec.get("hlines") or {})]), filename
        assert all(spec["series"].values()), f"{filename}: an empty series"
        fig = curves_figure(**spec)
        assert figure_problems(fig, [*spec["series"], *(spec.get("hlines") or {})]) == [], filename
        plot_curves(path=tmp_path / filename, **spec)
        assert (tmp_path / filename).stat().st_size > 5000
    assert {"50% hybrid, mil init", "50% hybrid, random init", "forward KL"} <= set(plots["val_loss.png"]["series"])
    assert "teacher (first 2 held-out batches)" in plots["val_loss.png"]["hlines"]
    # The KL plot spans 0.004 .. 0.9: a log axis that still shows the teacher's 0 (symlog).
    assert curves_figure(**plots["kl_to_teacher.png"]).axes[0].get_yscale() == "symlog"
    # Held-out loss over 5.8 .. 7.3 is not a decade: linear, whatever the caller asks.
    assert curves_figure(**plots["val_loss.png"], logy=False).axes[0].get_yscale() == "linear"
    assert curves_figure(plots["val_loss.png"]["series"], logy=True).axes[0].get_yscale() == "linear"


def test_figure_checks_fail_on_a_missing_series_shared_colours_and_a_legend_over_the_data():
    from distil.charts import _pyplot, curves_figure, figure_problems

    layers = {f"layer {i}": [(s, 1.0 / (s + i)) for s in range(1, 6)] for i in range(15)}
    fig = curves_figure(layers, logy=True)
    assert figure_problems(fig, list(layers)) == []  # 15 layers: 15 colours, legend outside
    assert figure_problems(fig, [*layers, "layer 99"]) == ["series 'layer 99' has no line"]
    plt = _pyplot()
    fig, ax = plt.subplots()
    for i in range(12):  # matplotlib's default cycle repeats after 10, and the legend sits on the axes
        ax.plot([0, 1], [i, i + 1], label=f"layer {i}")
    ax.legend()
    problems = figure_problems(fig, [f"layer {i}" for i in range(12)])
    assert "12 series share 10 colours" in problems and "the legend overlaps the plotting area" in problems
    plt.close("all")


def test_decode_speed_is_claimed_only_when_the_ranges_do_not_overlap():
    from distil.demo import decode_section, speed_comparison

    overlapping = speed_comparison([14, 15, 41, 40, 39], [40, 56, 45, 50, 48], "the MIL hybrid")
    assert "same speed within the run-to-run spread" in overlapping and "x the teacher" not in overlapping
    apart = speed_comparison([20, 21, 22, 23, 24], [40, 45, 50, 55, 60], "the MIL hybrid")
    assert apart.startswith("the MIL hybrid decoded at 0.44x the teacher's speed") and "20-24 against 40-60" in apart
    table = decode_section({"teacher_decode_tokens_per_second": [40, 45, 50, 55, 60],
                            "mil": {"decode_tokens_per_second": [20, 21, 22, 23, 24]},
                            "random": {"decode_tokens_per_second": [41, 44, 52, 53, 58]}}, context=128, new_tokens=24)
    assert "| teacher (all attention) | 50 (40-60) |" in table and "| hybrid, MIL init | 22 (20-24) |" in table
    assert "the random-init hybrid and the teacher decoded at the same speed" in table
