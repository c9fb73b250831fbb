"""The command line: help texts, one-line user errors with exit code 2, train end to end."""

import json
import os
import subprocess
import sys

import pytest
import torch

from distil.models import ModelConfig, TransformerLM
from distil.models.io import save_native

COMMANDS = ["demo", "train", "eval", "export", "info"]


def distil(*args, cwd=None, env=None):
    return subprocess.run([sys.executable, "-m", "distil", *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "TOKENIZERS_PARALLELISM": "false", **(env or {})}, timeout=300)


def test_top_level_help_lists_commands():
    out = distil("--help")
    assert out.returncode == 0
    for command in COMMANDS:
        assert command in out.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command):
    out = distil(command, "--help")
    assert out.returncode == 0
    assert "usage: distil " + command in out.stdout
    assert len(out.stdout.splitlines()) > 4


@pytest.mark.slow
def test_info_prints_versions_device_and_kernels():
    out = distil("info")
    assert out.returncode == 0
    for key in ("torch", "transformers", "device", "mamba_ssm", "causal_conv1d", "allocator"):
        assert key in out.stdout
    assert "glibc thresholds raised" in out.stdout
    off = distil("info", env={"DISTIL_MALLOC_TUNING": "0"})
    assert "allocator: default" in off.stdout


def _assert_user_error(out, *fragments):
    assert out.returncode == 2, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("distil: error:")
    assert "Traceback" not in out.stderr
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.mark.slow
def test_config_typo_is_one_line_exit_2(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  stepz: 3\n")
    _assert_user_error(distil("train", str(cfg)), "train.stepz", "steps")
    _assert_user_error(distil("train", str(tmp_path / "missing.yaml")), "not found")
    _assert_user_error(distil("train", "configs/debug.yaml", "--set", "loss.kind=nope"), "loss.kind")


def test_debug_shows_the_traceback(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  stepz: 3\n")
    out = distil("--debug", "train", str(cfg))
    assert out.returncode != 0 and "Traceback" in out.stderr


@pytest.mark.slow
def test_missing_checkpoint_is_one_line(tmp_path):
    _assert_user_error(distil("export", str(tmp_path / "nope"), "--out", str(tmp_path / "x")), "not found")
    (tmp_path / "x.jsonl").write_text("")
    _assert_user_error(distil("eval", "--model", str(tmp_path / "nope"), "--mc", str(tmp_path / "x.jsonl")), "not found")


def test_empty_corpus_is_one_line(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    _assert_user_error(distil("train", "configs/debug.yaml", "--set", "data.source=jsonl", "--set", f"data.path={empty}",
                              "--run-dir", str(tmp_path / "run")), "empty")
    assert not (tmp_path / "run").exists()  # nothing half-written is left behind


@pytest.mark.slow
def test_train_distils_end_to_end_and_eval_export(tmp_path, tiny_tokenizer, tiny_corpus_file):
    torch.manual_seed(0)
    teacher = TransformerLM(ModelConfig(vocab_size=len(tiny_tokenizer), d_model=32, n_layers=1, n_heads=2))
    save_native(teacher, tmp_path / "teacher")
    tiny_tokenizer.save_pretrained(str(tmp_path / "teacher"))
    run = tmp_path / "run"
    args = ["train", "configs/debug-kd.yaml", "--set", f"teacher.path={tmp_path / 'teacher'}", "--set", "data.source=jsonl",
            "--set", f"data.path={tiny_corpus_file}", "--set", "data.seq_len=32", "--set", "data.val_fraction=0.2",
            "--set", "train.steps=4", "--set", "train.progress=false", "--run-dir", str(run)]
    out = distil(*args)
    assert out.returncode == 0, out.stderr
    for name in ("config.yaml", "metrics.jsonl", "report.md", "summary.json", "plots/train_loss.png",
                 "checkpoints/final/model.safetensors", "checkpoints/final/tokenizer.json"):
        assert (run / name).exists(), name
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {"train", "val"} <= {r["split"] for r in records}
    assert any(r["name"] == "kl_to_teacher" for r in records)
    # The same command again finds the finished run: nothing to do, nothing retrained, nothing rewritten.
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    again = distil(*args)
    assert again.returncode == 0 and "already complete" in again.stderr
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before

    mc = tmp_path / "mc.jsonl"
    mc.write_text(json.dumps({"context": "The model learns", "choices": [" to predict", " banana", " x", " y"], "label": 0}) + "\n")
    out = distil("eval", "--model", str(run / "checkpoints/final"), "--data", str(tiny_corpus_file), "--seq-len", "32",
                 "--mc", str(mc), "--teacher", str(tmp_path / "teacher"), "--run", str(run), "--out", str(tmp_path / "e.json"))
    assert out.returncode == 0, out.stderr
    result = json.loads((tmp_path / "e.json").read_text())
    assert {"loss", "ppl", "kl_to_teacher", "top1_agreement"} <= set(result["lm"])
    assert result["multiple_choice"]["n"] == 1
    assert any(r["split"] == "eval" for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()))

    out = distil("export", str(run / "checkpoints/final"), "--format", "hf", "--out", str(tmp_path / "hf"))
    assert out.returncode == 0, out.stderr
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert type(hf).__name__ == "LlamaForCausalLM"
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "hf") is not None


def _state(path):
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


@pytest.mark.slow
def test_train_converts_in_stages_and_an_interrupted_run_continues(tmp_path, tiny_tokenizer, tiny_corpus_file):
    """hybrid.stages: 1 -> 2 -> 3 of 4 layers, each stage distilled in its own folder. A run cut off in
    its last stage (after a checkpoint) continues to the same final model as the uninterrupted run."""
    torch.manual_seed(0)
    teacher = TransformerLM(ModelConfig(vocab_size=len(tiny_tokenizer), d_model=32, n_layers=4, n_heads=2))
    save_native(teacher, tmp_path / "teacher")
    tiny_tokenizer.save_pretrained(str(tmp_path / "teacher"))
    run = tmp_path / "run"
    args = ["train", "configs/hybrid-progressive.yaml", "--set", f"teacher.path={tmp_path / 'teacher'}",
            "--set", "data.source=jsonl", "--set", f"data.path={tiny_corpus_file}", "--set", "data.seq_len=32",
            "--set", "data.val_fraction=0.2", "--set", "train.steps=4", "--set", "train.checkpoint_every=2",
            "--set", "train.batch_size=4", "--set", "train.val_every=0", "--set", "train.progress=false",
            "--set", "hybrid.d_state=8", "--set", "hybrid.chunk_size=16", "--set", "hybrid.score_samples=4",
            "--run-dir", str(run)]
    out = distil(*args)
    assert out.returncode == 0, out.stderr
    stages = json.loads((run / "stages.json").read_text())
    assert [s["num_ssm"] for s in stages] == [1, 2, 3]
    for earlier, later in zip(stages, stages[1:]):  # trained SSM layers stay SSM
        assert set(earlier["ssm_layers"]) < set(later["ssm_layers"])
    assert [s["pattern"].count("M") for s in stages] == [1, 2, 3]
    assert all("kl_to_teacher" in s["before"] and "kl_to_teacher" in s["after"] for s in stages)
    scores = json.loads((run / "layer_scores.json").read_text())
    assert len(scores["scores"]) == 4
    for name in ("report.md", "summary.json", "plots/stages.png", "checkpoints/final/model.safetensors",
                 "checkpoints/final/tokenizer.json", "stage-1/report.md", "stage-3/checkpoints/final/config.json"):
        assert (run / name).exists(), name
    assert json.loads((run / "checkpoints/final/config.json").read_text())["pattern"] == stages[-1]["pattern"]
    final = _state(run / "checkpoints/final")

    # Cut off during stage 3 after its step-2 checkpoint: the run continues from there.
    import shutil

    stage3 = run / "stage-3"
    for gone in ("summary.json", "checkpoints/final", "checkpoints/step_00000004", "report.md"):
        target = stage3 / gone
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    for gone in ("summary.json", "stages.json", "checkpoints/final"):
        target = run / gone
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    again = distil(*args)
    assert again.returncode == 0, again.stderr
    assert "stage 1/3 (1 SSM layers) already done" in again.stderr and "resuming from" in again.stderr
    resumed = _state(run / "checkpoints/final")
    assert resumed.keys() == final.keys()
    for key in final:
        torch.testing.assert_close(resumed[key], final[key], atol=1e-6, rtol=1e-5, msg=key)
    assert json.loads((run / "stages.json").read_text())[:2] == stages[:2]

    _assert_user_error(distil(*args[:-2], "--set", "hybrid.stages=[1, 9]", "--run-dir", str(tmp_path / "r2")),
                       "ends at 9 SSM layers", "4 attention layers")
    assert not (tmp_path / "r2").exists()  # refused before anything was written


@pytest.mark.slow
def test_nproc_per_node_launches_workers_and_an_error_is_one_line_per_rank(tmp_path):
    """`distil train --nproc-per-node 2` goes through torch.distributed.run; a worker's error reaches the
    terminal as distil's one line (per rank), exit 2, without the launcher's ChildFailedError traceback."""
    out = distil("train", "configs/debug.yaml", "--nproc-per-node", "2", "--set", "data.source=jsonl",
                 "--set", f"data.path={tmp_path / 'missing.jsonl'}", "--run-dir", str(tmp_path / "run"))
    assert out.returncode == 2, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 2 and all(line.startswith("distil: error: data.path not found") for line in lines), out.stderr
    assert "Traceback" not in out.stderr and "ChildFailedError" not in out.stderr
