"""Run folders: finished reruns, runs stopped before a checkpoint, the lock, permissions, tokenizers."""

import hashlib
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from distil import cli
from distil.config import config_from_dict
from distil.errors import DistilError
from distil.fsutil import DIR_MODE, FILE_MODE
from distil.models import ModelConfig, TransformerLM
from distil.models.io import save_native
from distil.run_dir import RunLock, run_state
from distil.train.run import run_training


@pytest.fixture
def corpus(tmp_path, run_config):
    """The test's folder, holding the tiny corpus that ``run_config`` configs read."""
    return tmp_path


def _listing(root: Path) -> dict:
    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir",
                                       p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def test_rerunning_a_finished_run_does_nothing_and_a_changed_config_is_refused(corpus, tiny_tokenizer, run_config):
    cfg = run_config(data={"tokenizer": None})
    run = corpus / "run"
    first = run_training(config_from_dict(cfg), run)
    assert first.result is not None and (run / "summary.json").is_file()
    before = _listing(run)
    again = run_training(config_from_dict(cfg), run)  # the same config: nothing to do, nothing touched
    assert again.result is None and again.report == run / "report.md"
    assert _listing(run) == before
    changed = config_from_dict(run_config(train={"steps": 6}))
    with pytest.raises(DistilError, match=r"finished run .*train\.steps: 4 -> 6"):
        run_training(changed, run)
    assert _listing(run) == before
    more = run_training(changed, run, resume=True)  # --resume: continue the finished run to 6 steps
    assert [h["step"] for h in more.result.history] == [1, 2, 3, 4, 5, 6] and run_state(run) == "complete"
    assert run_training(changed, run, overwrite=True).result.history[-1]["step"] == 6


@pytest.mark.slow
def test_a_run_killed_before_its_first_checkpoint_starts_again(corpus, run_config):
    cfg_file = corpus / "c.yaml"
    cfg_file.write_text(yaml.safe_dump(run_config()))
    run = corpus / "run"
    env = {**os.environ, "DISTIL_KILL_AT_STEP": "2", "TOKENIZERS_PARALLELISM": "false"}
    killed = subprocess.run([sys.executable, "-m", "distil", "train", str(cfg_file), "--run-dir", str(run)],
                            capture_output=True, text=True, env=env, timeout=300)
    assert killed.returncode < 0
    assert run_state(run) == "unstarted"  # config.yaml and metrics, no checkpoint
    result = run_training(config_from_dict(run_config()), run)  # no --overwrite needed
    assert [h["step"] for h in result.result.history] == [1, 2, 3, 4] and run_state(run) == "complete"


def test_a_failure_before_the_first_checkpoint_leaves_no_folder(corpus, run_config):
    bad = config_from_dict(run_config(data={"path": str(corpus / "missing.jsonl")}))
    with pytest.raises(DistilError, match="not found"):
        run_training(bad, corpus / "deep" / "er" / "run")
    assert not (corpus / "deep").exists()


def test_the_lock_refuses_a_live_process_and_takes_over_a_stale_one(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (folder / ".lock").write_text(json.dumps({"pid": sleeper.pid, "host": os.uname().nodename, "time": 0}))
        with pytest.raises(DistilError, match=f"in use by process {sleeper.pid}"):
            RunLock(folder).acquire()
    finally:
        sleeper.kill()
        sleeper.wait()
    lock = RunLock(folder).acquire()  # that process is gone: the lock is stale
    assert json.loads((folder / ".lock").read_text())["pid"] == os.getpid()
    lock.release()
    assert not (folder / ".lock").exists()


@pytest.mark.slow
def test_stale_temp_folders_are_removed_when_a_run_resumes(corpus, run_config):
    run = corpus / "run"
    cfg = run_config(train={"checkpoint_every": 2, "steps": 4})
    cfg_file = corpus / "c.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "DISTIL_KILL_AT_STEP": "3", "TOKENIZERS_PARALLELISM": "false"}
    subprocess.run([sys.executable, "-m", "distil", "train", str(cfg_file), "--run-dir", str(run)],
                   capture_output=True, env=env, timeout=300)
    (run / "checkpoints" / ".step_00000004.abc123.tmp").mkdir()  # as a kill during a checkpoint write leaves
    (run / ".summary.json.xyz.tmp").write_text("half")
    assert run_state(run) == "resumable"
    run_training(config_from_dict(cfg), run)
    assert not list(run.rglob(".*.tmp"))


def test_outputs_follow_the_umask(corpus, run_config):
    run = corpus / "run"
    run_training(config_from_dict(run_config()), run)
    for path in (run / "report.md", run / "summary.json", run / "metrics.jsonl", run / "config.yaml",
                 run / "checkpoints" / "final" / "model.safetensors"):
        assert stat.S_IMODE(path.stat().st_mode) == FILE_MODE, path
    for folder in (run / "checkpoints" / "final", run / "plots"):
        assert stat.S_IMODE(folder.stat().st_mode) == DIR_MODE, folder


def test_a_teacher_with_another_tokenizer_is_refused_unless_allowed(corpus, tiny_tokenizer, tmp_path, run_config):
    from distil.data.tokenize import train_bpe_tokenizer

    torch.manual_seed(0)
    teacher = TransformerLM(ModelConfig(vocab_size=len(tiny_tokenizer), d_model=32, n_layers=1, n_heads=2))
    save_native(teacher, tmp_path / "teacher", tokenizer=tiny_tokenizer)
    other = train_bpe_tokenizer(["another corpus entirely, with other words in it"] * 40, 280, tmp_path / "other")
    assert len(other) != len(tiny_tokenizer)
    kd = dict(teacher={"source": "model", "path": str(tmp_path / "teacher")}, loss={"kd_weight": 1.0},
              data={"tokenizer": str(tmp_path / "other")})
    with pytest.raises(DistilError, match=r"teacher's .* tokenizer .* is not the data's"):
        run_training(config_from_dict(run_config(**kd)), corpus / "r1")
    allowed = run_config(**kd)
    allowed["teacher"]["allow_tokenizer_mismatch"] = True
    assert run_training(config_from_dict(allowed), corpus / "r2").result is not None
    same = run_config(**{**kd, "data": {"tokenizer": str(tmp_path / "teacher")}})
    assert run_training(config_from_dict(same), corpus / "r3").result is not None


def test_validation_runs_at_step_0(corpus, run_config):
    outcome = run_training(config_from_dict(run_config()), corpus / "run")
    assert outcome.result.val_start["loss"] > outcome.result.val["loss"]
    from distil.run_dir import read_metrics

    steps = [r["step"] for r in read_metrics(corpus / "run" / "metrics.jsonl") if r["split"] == "val"
             and r["name"] == "loss"]
    assert steps == [0, 2, 4]
    assert "before training" in (corpus / "run" / "report.md").read_text()


def test_distil_num_threads_is_checked_and_applied(monkeypatch, capsys):
    monkeypatch.setenv("DISTIL_NUM_THREADS", "two")
    with pytest.raises(SystemExit) as e:
        cli.main(["info"])
    assert e.value.code == 2 and "DISTIL_NUM_THREADS" in capsys.readouterr().err
    before = torch.get_num_threads()
    monkeypatch.setenv("DISTIL_NUM_THREADS", "1")
    try:
        cli.main(["info"])
        assert torch.get_num_threads() == 1 and "1 torch threads" in capsys.readouterr().out
    finally:
        torch.set_num_threads(before)


def test_a_damaged_token_cache_is_rebuilt_not_a_traceback(corpus, tiny_tokenizer, caplog, run_config):
    from distil.data.dataset import _cache_dir, build_data

    cfg = config_from_dict(run_config()).data
    import numpy as np

    first = np.array(build_data(cfg, tiny_tokenizer).train_windows)  # a copy: the cache's files are memory-mapped
    cache = _cache_dir(cfg, tiny_tokenizer)
    tokens = cache / "train_tokens.npy"
    tokens.write_bytes(tokens.read_bytes()[:-64])  # truncated: np.load's mmap fails
    with caplog.at_level("WARNING", logger="distil"):
        again = build_data(cfg, tiny_tokenizer)
    assert "damaged" in caplog.text
    assert (np.asarray(again.train_windows) == first).all()


def test_a_full_disk_during_a_checkpoint_is_named_as_such(tmp_path, monkeypatch):
    import errno
    import shutil

    from distil.cli import os_error_message
    from distil.train import checkpoint

    def full(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file")

    monkeypatch.setattr(checkpoint.torch, "save", full)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(100, 100, 0))
    model = TransformerLM(ModelConfig(vocab_size=64, d_model=16, n_layers=1, n_heads=2))
    with pytest.raises(OSError) as e:
        checkpoint.save_checkpoint(tmp_path / "ckpts", 1, model, {}, extra={})
    assert e.value.errno == errno.ENOSPC
    assert os_error_message(e.value).startswith("no space left on the device writing")
    assert not list((tmp_path / "ckpts").glob("*"))  # the half-written checkpoint is gone


def test_a_folder_made_by_another_thread_meanwhile_is_not_a_file_in_the_way(tmp_path, monkeypatch):
    """The API teacher's threads write answers into new folders at once: a folder that did not exist
    at the first look but exists at the second (another thread made it) must not be taken for a file."""
    from distil.fsutil import atomic_write_text

    made = tmp_path / "api" / "ff"
    made.mkdir(parents=True)
    real_is_dir, looks = Path.is_dir, {"n": 0}

    def is_dir_late(self):  # the first look at `made` happens before the other thread created it
        if self == made and looks["n"] == 0:
            looks["n"] += 1
            return False
        return real_is_dir(self)

    monkeypatch.setattr(Path, "is_dir", is_dir_late)
    atomic_write_text(made / "answer.json", "{}")
    assert (made / "answer.json").read_text() == "{}" and looks["n"] == 1
