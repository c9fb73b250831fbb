"""The training engine: exact resume after SIGKILL, 2 processes = 1 process, the spike guard."""

import json
import math
import os
import signal
import subprocess
import sys

import pytest
import torch
import yaml

from distil.models import ModelConfig, TransformerLM
from distil.models.io import save_native
from distil.run_dir import read_metrics
from distil.train.guard import SpikeGuard

ENV = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def _setup(tmp_path, tokenizer, corpus, **train):
    torch.manual_seed(0)
    teacher = TransformerLM(ModelConfig(vocab_size=len(tokenizer), d_model=48, n_layers=2, n_heads=2))
    save_native(teacher, tmp_path / "teacher")
    tokenizer.save_pretrained(str(tmp_path / "teacher"))
    cfg = {
        "teacher": {"source": "model", "path": str(tmp_path / "teacher")},
        "student": {"d_model": 96, "n_layers": 2, "n_heads": 2},
        "data": {"source": "jsonl", "path": str(corpus), "seq_len": 48, "val_fraction": 0.2},
        "loss": {"kind": "forward_kl", "kd_weight": 1.0, "ce_weight": 0.2},
        "train": {"steps": 40, "batch_size": 8, "lr": 3e-3, "warmup_steps": 3, "log_every": 1, "val_every": 0,
                  "checkpoint_every": 4, "progress": False, "device": "cpu", **train},
        "eval": {"val_batches": 1},
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _losses(run) -> dict[int, float]:
    return {r["step"]: r["value"] for r in read_metrics(run / "metrics.jsonl") if r["split"] == "train" and r["name"] == "loss"}


def _train(cfg, run, *extra):
    return subprocess.run([sys.executable, "-m", "distil", "train", str(cfg), "--run-dir", str(run), *extra],
                          capture_output=True, text=True, env=ENV, timeout=300)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_tokenizer, tiny_docs):
    """One 24-step run (checkpoints every 4 steps) that both kill points are compared against."""
    tmp = tmp_path_factory.mktemp("resume")
    corpus = tmp / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in tiny_docs))
    cfg = _setup(tmp, tiny_tokenizer, corpus, steps=24)
    whole = tmp / "whole"
    assert _train(cfg, whole).returncode == 0
    return cfg, _losses(whole)


@pytest.mark.slow
@pytest.mark.parametrize("kill_after_step", [6, 17])
def test_sigkill_then_resume_reproduces_the_uninterrupted_losses(tmp_path, uninterrupted, kill_after_step):
    cfg, reference = uninterrupted
    assert sorted(reference) == list(range(1, 25))

    killed = tmp_path / "killed"
    # The run kills itself (SIGKILL) at a fixed point: once step `kill_after_step` is logged.
    proc = subprocess.run([sys.executable, "-m", "distil", "train", str(cfg), "--run-dir", str(killed)],
                          capture_output=True, text=True, timeout=300,
                          env={**ENV, "DISTIL_KILL_AT_STEP": str(kill_after_step)})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert max(_losses(killed)) == kill_after_step
    assert not (killed / "summary.json").exists()

    resumed = _train(cfg, killed)  # the folder has a checkpoint: training resumes by itself
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stderr
    assert _losses(killed) == reference  # bit-for-bit, every step
    assert (killed / "summary.json").exists()
    kept = sorted(p.name for p in (killed / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert kept == ["step_00000020", "step_00000024"]  # keep_checkpoints = 2


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, tiny_tokenizer, tiny_docs):
    """The single-process run both two-process kinds are compared against (train.parallel does not
    change a single process)."""
    tmp = tmp_path_factory.mktemp("one")
    corpus = tmp / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in tiny_docs))
    cfg = _setup(tmp, tiny_tokenizer, corpus, steps=6, checkpoint_every=3)
    single = tmp / "single"
    assert _train(cfg, single).returncode == 0
    return cfg, single


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_train_like_one(tmp_path, one_process, parallel):
    cfg, single = one_process
    double = tmp_path / "double"
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "distil", "train", str(cfg), "--run-dir", str(double), "--set", f"train.parallel={parallel}"],
                         capture_output=True, text=True, env=ENV, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    a, b = _losses(single), _losses(double)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-6), step
    # Only rank 0 writes metrics: the same number of records as one process.
    assert len(read_metrics(double / "metrics.jsonl")) == len(read_metrics(single / "metrics.jsonl"))
    from distil.models import load

    sa, sb = load(single / "checkpoints" / "final").state_dict(), load(double / "checkpoints" / "final").state_dict()
    for name in sa:
        torch.testing.assert_close(sa[name], sb[name], atol=1e-5, rtol=1e-4)
    val = {r["name"]: r["value"] for r in read_metrics(single / "metrics.jsonl") if r["split"] == "val"}
    val2 = {r["name"]: r["value"] for r in read_metrics(double / "metrics.jsonl") if r["split"] == "val"}
    assert val2["loss"] == pytest.approx(val["loss"], rel=1e-4)


def test_spike_guard_logic():
    guard = SpikeGuard(factor=3.0, patience=2, window=5, min_history=3)
    assert [guard.check(x, 1.0) for x in (2.0, 2.1, 1.9)] == ["ok"] * 3
    assert guard.check(math.nan, 1.0) == "skip" and guard.check(1.0, math.inf) == "skip"
    assert guard.check(10.0, 1.0) == "ok"  # one spike is tolerated
    assert guard.check(2.0, 1.0) == "ok"  # and forgotten
    assert guard.check(10.0, 1.0) == "ok"
    assert guard.check(11.0, 1.0) == "rollback"  # two in a row
    assert guard.lr_scale == 0.5 and guard.rollbacks == 1 and guard.skipped == 2
    again = SpikeGuard(factor=3.0, patience=2, window=5, min_history=3)
    again.load_state_dict(guard.state_dict())
    assert again.state_dict() == guard.state_dict()


def test_guard_skips_non_finite_steps_and_rolls_back_spikes(tmp_path, tiny_tokenizer, tiny_corpus_file, monkeypatch):
    from distil.config import load_config
    from distil.run_dir import RunDir
    from distil.train import loop

    cfg_path = _setup(tmp_path, tiny_tokenizer, tiny_corpus_file, steps=14, checkpoint_every=4, spike_factor=3.0,
                      spike_patience=2, spike_window=20)
    cfg = load_config(cfg_path)
    calls = {"n": 0}
    real = loop.compute_loss

    def faulty(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        if calls["n"] == 3:
            return loss * math.nan  # step 3 is non-finite
        if calls["n"] in (10, 11):
            return loss * 100.0  # steps 9 and 10 spike (the skipped step made one extra call)
        return loss

    monkeypatch.setattr(loop, "compute_loss", faulty)
    run = RunDir.create(tmp_path / "guarded")
    result = loop.train(cfg, run=run)
    records = read_metrics(run.metrics_path)
    assert any(r["name"] == "skipped_step" and r["step"] == 3 for r in records)
    rollbacks = [r for r in records if r["name"] == "rollback"]
    assert len(rollbacks) == 1 and rollbacks[0]["step"] == 8 and rollbacks[0]["value"] == 0.5
    assert [h["step"] for h in result.history] == list(range(1, 15))
    assert math.isnan(result.history[2]["loss"])  # step 3 is recorded as the skipped step it was
    others = [h["loss"] for h in result.history if h["step"] != 3]
    assert all(math.isfinite(x) and x < 50 for x in others)  # the spiking steps were rolled back and redone
    # After the rollback the schedule runs at half the learning rate.
    assert result.history[-1]["lr"] == pytest.approx(0.5 * cfg.train.lr * loop.lr_multiplier(
        13, total_steps=14, warmup_steps=3, schedule="cosine", min_ratio=0.1))


@pytest.mark.slow
def test_existing_run_without_checkpoint_is_refused_but_one_with_a_checkpoint_resumes(tmp_path, tiny_tokenizer,
                                                                                      tiny_corpus_file):
    cfg = _setup(tmp_path, tiny_tokenizer, tiny_corpus_file, steps=4, checkpoint_every=2)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    out = _train(cfg, tmp_path / "other")
    assert out.returncode == 2 and "already exists" in out.stderr
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"
    assert _train(cfg, tmp_path / "r").returncode == 0
    again = _train(cfg, tmp_path / "r")  # complete: resumes at the last step and finishes at once
    assert again.returncode == 0, again.stderr
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["steps"] == 4


@pytest.mark.slow
def test_sequence_parallel_loss_is_the_global_token_mean_under_torchrun(tmp_path, tiny_tokenizer, tiny_corpus_file):
    """Stream packing gives the two ranks different numbers of counted tokens; with loss.parallel =
    sequence the logged (and trained) loss is the mean over all counted tokens, not a mean of means."""
    import numpy as np

    from distil.config import load_config
    from distil.data.dataset import build_data
    from distil.data.packing import StreamBatcher, stream_tensors
    from distil.losses import cross_entropy
    from distil.train.loop import student_model_config

    cfg_path = _setup(tmp_path, tiny_tokenizer, tiny_corpus_file, steps=1, checkpoint_every=0, batch_size=4)
    for parallel in ("sequence", "none"):
        overrides = ["loss.kd_weight=0", "loss.ce_weight=1", "data.packing=stream", "data.seq_len=120",
                     f"loss.parallel={parallel}", "data.token_cache=null"]
        out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                              "-m", "distil", "train", str(cfg_path), "--run-dir", str(tmp_path / parallel),
                              *sum([["--set", o] for o in overrides], [])],
                             capture_output=True, text=True, env=ENV, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
    cfg = load_config(cfg_path, overrides)
    data = build_data(cfg.data, tiny_tokenizer)
    torch.manual_seed(cfg.train.seed)
    student = TransformerLM(student_model_config(cfg, len(tiny_tokenizer), tiny_tokenizer)).eval()
    sums, counts = [], []
    with torch.no_grad():
        for rank in range(2):
            batcher = StreamBatcher(data.train_token_docs[rank::2], 2, 120, seed=cfg.train.seed,
                                    pad_id=tiny_tokenizer.eos_token_id)
            batch = stream_tensors(batcher.next_batch(), "cpu")
            logits = student(batch["input_ids"], positions=batch["positions"])
            sums.append(cross_entropy(logits, batch["labels"], reduction="sum").item())
            counts.append(int((batch["labels"] != -100).sum()))
    assert counts[0] != counts[1]  # the case that needs the global count
    global_mean = sum(sums) / sum(counts)
    mean_of_means = np.mean([s / c for s, c in zip(sums, counts)])
    # An untrained model's per-token losses are nearly uniform, so the two means differ only slightly:
    # the tolerance is a few fp32 ulps of summation order, well below that difference.
    assert abs(global_mean - mean_of_means) > 1e-5
    assert _losses(tmp_path / "sequence")[1] == pytest.approx(global_mean, rel=2e-6)
    assert _losses(tmp_path / "none")[1] == pytest.approx(mean_of_means, rel=2e-6)


@pytest.mark.slow
def test_vocab_parallel_head_under_torchrun_trains_like_one_process(tmp_path, tiny_tokenizer, tiny_corpus_file):
    """loss.parallel = vocab: 2 processes each hold half of the student's LM head (torch's
    ColwiseParallel) and see the same batch; losses, validation, checkpoints and the final weights
    equal one process with the whole head, and a resumed TP run continues the uninterrupted one."""
    cfg = _setup(tmp_path, tiny_tokenizer, tiny_corpus_file, steps=6, checkpoint_every=3, batch_size=6, grad_clip=0.05)
    overrides = ["student.tie_embeddings=false", "loss.kind=reverse_kl", "loss.temperature=2.0",
                 "train.schedule=constant"]
    sets = sum([["--set", o] for o in overrides], [])
    single = tmp_path / "single"
    out = _train(cfg, single, *sets)
    assert out.returncode == 0, out.stderr[-3000:]

    def torchrun(run, *extra):
        return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                               "-m", "distil", "train", str(cfg), "--run-dir", str(run), *sets, "--set",
                               "loss.parallel=vocab", *extra], capture_output=True, text=True, env=ENV, timeout=300)

    double = tmp_path / "double"
    out = torchrun(double)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "LM head sharded over 2 processes" in out.stderr + out.stdout  # the head really was split
    a, b = _losses(single), _losses(double)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-6), step
    from distil.models import load

    sa, sb = load(single / "checkpoints" / "final").state_dict(), load(double / "checkpoints" / "final").state_dict()
    assert sa.keys() == sb.keys() and sa["lm_head.weight"].shape == sb["lm_head.weight"].shape
    for name in sa:
        torch.testing.assert_close(sb[name], sa[name], atol=1e-5, rtol=1e-4)
    val = {r["name"]: r["value"] for r in read_metrics(single / "metrics.jsonl") if r["split"] == "val"}
    val2 = {r["name"]: r["value"] for r in read_metrics(double / "metrics.jsonl") if r["split"] == "val"}
    assert val2["loss"] == pytest.approx(val["loss"], rel=1e-4)

    # Resume: 6 more steps from the TP checkpoint at step 6 equal 12 uninterrupted single-process steps.
    out = _train(cfg, tmp_path / "single12", *sets, "--set", "train.steps=12")
    assert out.returncode == 0, out.stderr[-3000:]
    out = torchrun(double, "--set", "train.steps=12", "--resume")  # --resume: continue the finished run
    assert out.returncode == 0, out.stderr[-3000:]
    a, b = _losses(tmp_path / "single12"), _losses(double)
    assert sorted(b) == list(range(1, 13))
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-6), step


@pytest.mark.slow
def test_vocab_parallel_head_with_online_topk_trains_like_one_process(tmp_path, tiny_tokenizer, tiny_corpus_file):
    """loss.topk under a sharded head: each rank owns the top-k entries in its columns."""
    cfg = _setup(tmp_path, tiny_tokenizer, tiny_corpus_file, steps=3, checkpoint_every=0)
    sets = sum([["--set", o] for o in ("student.tie_embeddings=false", "loss.topk=8", "loss.kind=forward_kl")], [])
    out = _train(cfg, tmp_path / "single", *sets)
    assert out.returncode == 0, out.stderr[-3000:]
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "distil", "train", str(cfg), "--run-dir", str(tmp_path / "double"), *sets, "--set",
                          "loss.parallel=vocab"], capture_output=True, text=True, env=ENV, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    a, b = _losses(tmp_path / "single"), _losses(tmp_path / "double")
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-6), step


@pytest.mark.slow
def test_staged_hybrid_conversion_under_torchrun_equals_one_process(tmp_path, tiny_tokenizer, tiny_corpus_file):
    """hybrid.stages under DDP: rank 0's layer scores go to every process, each stage trains as one
    process would (per-step losses of every stage and the final weights agree)."""
    from safetensors.torch import load_file

    cfg = _setup(tmp_path, tiny_tokenizer, tiny_corpus_file, steps=3, checkpoint_every=0)
    sets = ["--set", "hybrid.stages=[1, 2]", "--set", "hybrid.d_state=8", "--set", "hybrid.score_samples=3",
            "--set", "hybrid.chunk_size=16"]
    single, double = tmp_path / "single", tmp_path / "double"
    out = _train(cfg, single, *sets)
    assert out.returncode == 0, out.stderr[-3000:]
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "distil", "train", str(cfg), "--run-dir", str(double), *sets],
                         capture_output=True, text=True, env=ENV, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    one, two = (json.loads((run / "stages.json").read_text()) for run in (single, double))
    assert [s["ssm_layers"] for s in one] == [s["ssm_layers"] for s in two] and len(one) == 2
    for stage in ("stage-1", "stage-2"):
        a, b = _losses(single / stage), _losses(double / stage)
        assert sorted(a) == sorted(b) == [1, 2, 3]
        for step in a:
            assert math.isclose(a[step], b[step], rel_tol=1e-5), (stage, step, a[step], b[step])
    # Adam turns near-zero gradients' rounding (summed in another order under DDP) into updates of up
    # to lr: weights agree to 1e-4 after 6 steps at lr 3e-3 (they are O(0.05); untouched ones exactly).
    w1, w2 = (load_file(str(run / "checkpoints/final/model.safetensors")) for run in (single, double))
    assert w1.keys() == w2.keys()
    for key in w1:
        torch.testing.assert_close(w2[key], w1[key], atol=1e-4, rtol=1e-3)
