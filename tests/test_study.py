"""`distil study` on a tiny random teacher with a tiny budget: the report's structure, resumption,
and the verdict rule. The verdicts themselves come from the real run (docs/study/)."""

from __future__ import annotations

import json
import math

import pytest

from conftest import save_tiny_model
from distil.errors import DistilError
from distil.study import EXPERIMENTS, budget_with, judge, run_study

# The study fixture runs every experiment (~25 s on 2 cores): outside the fast loop, in CI.
slow = pytest.mark.slow


def tiny_budget():
    return budget_with("quick", corpus_chars=40_000, seq_len=32, k=8, seeds=2, batch_size=2, steps=4, lr=1e-3,
                       placement_steps=2, tiny_student=(32, 1, 2), tiny_steps=2, tiny_batch_size=2, val_windows=4,
                       val_every=2, mc_items=6, calibration_windows=4, mixer_chunk=16)


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory, tiny_tokenizer):
    return save_tiny_model(tmp_path_factory.mktemp("study-teacher") / "teacher", tiny_tokenizer, n_layers=6, seed=0,
                           max_seq_len=64)


@pytest.fixture(scope="module")
def study(tmp_path_factory, tiny_teacher):
    out = tmp_path_factory.mktemp("study") / "study"
    report = run_study(out, budget=tiny_budget(), teacher=tiny_teacher, progress=False)
    return out, report


@slow
def test_report_has_every_experiment_with_setting_table_curves_and_verdict(study):
    out, report = study
    text = report.read_text()
    assert text.startswith("# distil study")
    summary = text.split("## ")[0]
    for name in EXPERIMENTS:
        assert f"`{name}`" in summary, name
        section = text.split(f"## `{name}`")[1].split("\n## ")[0]
        assert "**Verdict: " in section
        rows = [line for line in summary.splitlines() if line.startswith(f"| `{name}` |")]
        assert rows, name  # one summary row per part of the finding, each with one of the three verdicts
        for row in rows:
            verdict = row.rstrip(" |").rsplit("|", 1)[1].strip().strip("*")
            assert verdict in ("reproduced", "not reproduced", "inconclusive"), row
        assert "| arm | seeds | KL(teacher‖model)" in section
        assert "| teacher |" in section  # the teacher's own scores in every table
        for png in (f"{name}_kl.png", f"{name}_mc.png"):
            assert f"(plots/{png})" in section
            assert (out / "plots" / png).read_bytes()[:4] == b"\x89PNG"
        assert (out / "compare" / name / "report.md").is_file()
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 2 * len(EXPERIMENTS) and "<table>" in html
    results = json.loads((out / "results.json").read_text())
    assert set(results["experiments"]) == set(EXPERIMENTS)
    assert json.loads((out / "summary.json").read_text())["complete"] is True


@slow
def test_every_arm_ran_every_seed_and_scored(study):
    out, _ = study
    results = json.loads((out / "results.json").read_text())
    for name, exp in results["experiments"].items():
        for label, records in exp["arms"].items():
            assert [r["seed"] for r in records] == [0, 1], (name, label)
            for r in records:
                assert math.isfinite(r["kl"]) and r["kl"] >= 0 and math.isfinite(r["val_loss"])
                assert r["curve"][0][0] == 0 and r["curve"][-1][0] == r["steps"]
            assert "mc_acc" in records[0] and 0 <= records[0]["mc_acc"] <= 1
    arms = results["experiments"]
    # Single-layer arms train that one mixer only; the progressive arm ends with all of its layers.
    assert all(len(r["ssm_layers"]) == 1 for r in arms["init"]["arms"]["MIL"])
    assert arms["init"]["arms"]["MIL"][0]["trainable"] < arms["tiny-kd"]["arms"]["CE"][0]["trainable"] * 10
    prog, one = arms["zero-shot-vs-progressive"]["arms"]["progressive"], arms["zero-shot-vs-progressive"]["arms"]["one-shot"]
    assert prog[0]["ssm_layers"] == one[0]["ssm_layers"] and prog[0]["steps"] == one[0]["steps"]
    # `distil report` over an arm's first-seed folder shows its held-out loss, MC accuracy and KL.
    from distil.report import _summary_row, read_run_series

    folders = [p.parent for p in (out / "runs").glob("*/arm.json") if "mc_acc" in json.loads(p.read_text())]
    assert len(folders) >= len(EXPERIMENTS)
    for folder in folders:
        row = _summary_row(read_run_series(folder))
        assert "-" not in (row[1], row[3], row[5]), (folder.name, row)  # held-out loss, MC accuracy, KL
    # The shared arm (Mamba2 state 16, MIL, reverse KL) is one run, reused by three experiments.
    assert arms["init"]["arms"]["MIL"] == arms["mixer-state"]["arms"]["m2 state 16"] == arms["loss"]["arms"]["reverse KL"]


@slow
def test_rerun_skips_finished_arms_and_other_settings_are_refused(study, tiny_teacher):
    out, report = study
    before = {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/arm.json")}
    run_study(out, budget=tiny_budget(), teacher=tiny_teacher, only=["init"], progress=False)
    after = {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/arm.json")}
    assert before == after  # nothing retrained
    with pytest.raises(DistilError, match="other settings"):
        run_study(out, budget=budget_with("quick", seeds=3), teacher=tiny_teacher, progress=False)
    with pytest.raises(DistilError, match="unknown experiment"):
        run_study(out, budget=tiny_budget(), teacher=tiny_teacher, only=["nope"], progress=False)


@pytest.mark.parametrize("kind, a, b, verdict, rule, words", [
    ("less", [1.0, 1.1], [2.0, 2.2], "reproduced", "better", ["A lower on every seed", "1.05 against 2.1",
                                                             "B 100% higher", "beyond 2 SE = 0.1"]),
    ("less", [2.0, 2.2], [1.0, 1.1], "not reproduced", "opposite", ["the opposite: B lower on every seed", "1.05 against 2.1"]),
    ("less", [1.000, 1.001], [1.001, 1.002], "not reproduced", "no_difference", ["no difference", "under 2% of B"]),
    ("less", [1.0, 2.0], [1.5, 1.5], "inconclusive", "within_spread", ["diff +0", "seeds disagree in sign"]),
    ("less", [1.0], [2.0], "inconclusive", "one_seed", ["one seed"]),
    # "reaches": the tiny-kd case of the study report: A (CE 6.611) far ahead of B (reverse KL 9.334)
    ("not_worse", [6.6, 6.622], [9.034, 9.634], "reproduced", "ahead", ["A ahead on every seed", "6.611 against 9.334",
                                                                       "B 41% higher"]),
    ("not_worse", [1.0, 1.01], [1.0, 1.0], "reproduced", "within_tolerance", ["A at worst", "behind", "under 2% of B"]),
    ("not_worse", [1.5, 1.6], [1.0, 1.0], "not reproduced", "behind", ["A behind on every seed", "A 55% higher"]),
    ("not_worse", [1.0, 1.5], [1.2, 1.1], "inconclusive", "within_spread", ["seeds disagree in sign"]),
])
def test_each_verdicts_reason_comes_from_the_rule_that_fired(kind, a, b, verdict, rule, words):
    r = judge(a, b, kind=kind, a_label="A", b_label="B")
    assert (r["verdict"], r["rule"]) == (verdict, rule)
    for w in words:
        assert w in r["why"], (w, r["why"])
    if rule == "ahead":  # the old text claimed "at worst 2% behind" for an arm 41% ahead
        assert "behind" not in r["why"]


def test_judge_rules():
    # Better on every seed, far beyond the spread: reproduced; the opposite: not reproduced.
    assert judge([1.0, 1.1], [2.0, 2.2])["verdict"] == "reproduced"
    assert judge([2.0, 2.2], [1.0, 1.1])["verdict"] == "not reproduced"
    # Seeds disagree: inconclusive. Equal within 2%: not reproduced (no difference).
    assert judge([1.0, 2.0], [1.5, 1.5])["verdict"] == "inconclusive"
    assert judge([1.000, 1.001], [1.001, 1.002])["verdict"] == "not reproduced"
    # One seed has no spread.
    assert judge([1.0], [2.0])["verdict"] == "inconclusive"
    # "reaches": equal or better is reproduced; clearly behind is not.
    assert judge([1.0, 1.01], [1.0, 1.0], kind="not_worse")["verdict"] == "reproduced"
    assert judge([1.5, 1.6], [1.0, 1.0], kind="not_worse")["verdict"] == "not reproduced"
    r = judge([1.0, 1.2], [2.0, 2.1])
    assert r["diff"] == pytest.approx(0.95) and r["se"] == pytest.approx(0.05)
