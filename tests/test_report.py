"""`distil report`: two tiny runs and a notebook-format log compared in markdown, PNG and HTML."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from distil.run_dir import RunDir


def _fake_run(path, scale, params):
    run = RunDir.create(path)
    for step in range(1, 11):
        run.log(step=step, tokens=step * 100, split="train", name="loss", value=scale * (3.0 - 0.1 * step))
        run.log(step=step, tokens=step * 100, split="train", name="tokens_per_second", value=1000.0 * scale)
        if step % 5 == 0:
            run.log(step=step, tokens=step * 100, split="val", name="loss", value=scale * (3.1 - 0.1 * step))
            run.log(step=step, tokens=step * 100, split="val", name="kl_to_teacher", value=0.5 / step)
    run.mark_complete({"final_val": {"loss": scale * 2.1, "ppl": 8.17, "kl_to_teacher": 0.05}, "params": params,
                       "tokens_per_second": 1000.0 * scale})
    return path


def test_report_compares_runs_and_notebook_logs(tmp_path):
    a = _fake_run(tmp_path / "ce", 1.0, 1_500_000)
    b = _fake_run(tmp_path / "rkl", 0.9, 1_500_000)
    log = tmp_path / "SLM_log.txt"
    log.write_text("".join(f"{i} train {3 - 0.01 * i}\n{i} val {3.1 - 0.01 * i}\n" + (f"{i} hella {0.25 + 0.001 * i}\n" if i % 10 == 0 else "")
                           for i in range(1, 51)))
    out = tmp_path / "report"
    proc = subprocess.run([sys.executable, "-m", "distil", "report", str(a), str(b), str(log), "--out", str(out),
                           "--baseline", "GPT-2 124M=0.2955"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    md = (out / "report.md").read_text()
    assert "| ce | 2.1000 | 8.17 |" in md and "| rkl | 1.8900 |" in md and "| SLM_log |" in md
    for png in ("train_loss.png", "val_loss.png", "eval_accuracy.png", "kl_to_teacher.png"):
        assert (out / png).stat().st_size > 1000, png
    for png in ("train_loss_log.png", "val_loss_log.png"):  # losses 1.8 .. 3.1: no decade, no log axis
        assert not (out / png).exists(), png
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 4 and "<table>" in page and "src=\"http" not in page


def test_a_log_scale_plot_only_where_the_values_span_a_decade(tmp_path):
    from distil.report import write_comparison_report

    run = tmp_path / "long"
    rows = [{"step": s, "tokens": s, "split": "train", "name": "loss", "value": 10.0 / s, "time": 0} for s in range(1, 30)]
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_comparison_report([str(run)], tmp_path / "out")
    assert (tmp_path / "out" / "train_loss_log.png").is_file()  # 10 .. 0.34: a log axis shows it


def test_bad_log_lines_and_missing_runs_are_user_errors(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text("1 train\n")
    for target in (str(bad), str(tmp_path / "missing")):
        proc = subprocess.run([sys.executable, "-m", "distil", "report", target, "--out", str(tmp_path / "o")],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed")
def test_html_report_renders_in_headless_chromium(tmp_path):
    from distil.report import write_comparison_report

    write_comparison_report([str(_fake_run(tmp_path / "a", 1.0, 10)), str(_fake_run(tmp_path / "b", 0.8, 10))],
                            tmp_path / "out")
    shot = tmp_path / "shot.png"
    proc = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                           "--disable-component-update", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
                           f"--screenshot={shot}", "--window-size=1000,1400", f"file://{tmp_path / 'out' / 'report.html'}"],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "HOME": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    from PIL import Image

    image = Image.open(shot).convert("L")
    # A rendered page with a table and plots is far from blank: many distinct grey levels.
    assert len(set(image.getdata())) > 20
    assert json.loads((tmp_path / "a" / "summary.json").read_text())["complete"]


def test_report_notes_mixed_objectives_tokenizers_and_an_unused_baseline(tmp_path, caplog):
    import yaml

    from distil.report import write_comparison_report

    for name, loss, vocab in (("ce", {"kd_weight": 0.0, "ce_weight": 1.0}, "a"),
                              ("rkl", {"kd_weight": 1.0, "ce_weight": 0.0, "kind": "reverse_kl"}, "b")):
        run = tmp_path / name
        (run / "tokenizer").mkdir(parents=True)
        (run / "tokenizer" / "tokenizer.json").write_text(json.dumps({"vocab": vocab}))
        (run / "config.yaml").write_text(yaml.safe_dump({"loss": loss}))
        rows = [{"step": s, "tokens": s, "split": split, "name": "loss", "value": 3.0 - 0.1 * s, "time": 0}
                for s in range(1, 5) for split in ("train", "val")]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with caplog.at_level("WARNING", logger="distil"):
        report = write_comparison_report([str(tmp_path / "ce"), str(tmp_path / "rkl")], tmp_path / "out",
                                         baselines={"GPT-2": 0.29})
    text = report.read_text()
    assert "different objectives (CE, reverse_kl)" in text and "different tokenizers" in text
    assert "--baseline GPT-2 not shown" in text
    assert (tmp_path / "out" / "train_loss_CE.png").is_file() and (tmp_path / "out" / "train_loss_reverse_kl.png").is_file()
    assert not (tmp_path / "out" / "train_loss.png").exists()  # CE and KL never share an axis
    assert "different objectives" in caplog.text
