"""distil train --profile: each phase's time and peak memory, the floor, and no change to the run."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import yaml

from conftest import save_tiny_model
from distil import cli
from distil.config import config_from_dict
from distil.models import load
from distil.train.profile import PHASES
from distil.train.run import run_training

PEAKS = """
import torch
from distil.train.profile import StepProfile
profile = StepProfile(torch.device("cpu"))
with profile.phase("big"):
    block = torch.ones(64 * 2**20)  # 256 MiB, touched
    del block  # handed back to the OS (malloc tuning off)
with profile.phase("small"):
    torch.ones(1000).sum()
print(profile.per_phase_peaks, profile.peak["big"], profile.peak["small"])
"""


def test_each_phase_has_its_own_peak():
    """A phase's peak is its own: a 256 MiB block freed in one phase is not in the next one's peak."""
    env = {**os.environ, "DISTIL_MALLOC_TUNING": "0"}  # glibc then returns the freed block at once
    out = subprocess.run([sys.executable, "-c", PEAKS], capture_output=True, text=True, env=env, check=True)
    resets, big, small = out.stdout.split()
    if resets != "True":
        pytest.skip("this kernel does not reset the peak RSS (/proc/self/clear_refs)")
    assert int(big) - int(small) > 0.9 * 256 * 2**20


def test_profiling_accounts_every_phase_and_changes_no_loss(tmp_path, run_config, tiny_tokenizer):
    teacher = save_tiny_model(tmp_path / "teacher", tiny_tokenizer, n_layers=1, seed=3)
    sections = {"teacher": {"source": "model", "path": teacher}, "loss": {"kd_weight": 1.0, "ce_weight": 0.5}}
    plain = run_training(config_from_dict(run_config(**sections, train={"checkpoint_every": 2})), tmp_path / "plain")
    profiled = run_training(config_from_dict(run_config(**sections, train={"checkpoint_every": 2, "profile": True})),
                            tmp_path / "profiled")
    assert [h["loss"] for h in profiled.result.history] == [h["loss"] for h in plain.result.history]
    assert not (tmp_path / "plain" / "profile.json").exists()

    summary = json.loads((tmp_path / "profiled" / "profile.json").read_text())
    assert list(summary["phases"]) == list(PHASES) and summary["timed_steps"] == 3  # steps 2-4
    in_step = [summary["phases"][p] for p in PHASES[:6]]
    assert all(v["seconds_per_step"] > 0 for v in in_step)
    assert sum(v["share_of_step"] for v in in_step) == pytest.approx(1.0, abs=1e-9)
    assert summary["step_seconds"] == pytest.approx(sum(v["seconds_per_step"] for v in in_step))
    assert summary["peak_rss_bytes"] == max(v["peak_rss_bytes"] for v in summary["phases"].values())

    def size(params):
        return sum(p.numel() * p.element_size() for p in params)
    floor = summary["floor_bytes"]
    student = load(tmp_path / "profiled" / "checkpoints" / "final")
    assert floor["teacher"] == size(load(teacher).parameters())
    assert floor["student"] == 4 * size(student.parameters())  # weights, gradients, two AdamW moments
    assert floor["loss"] == 2 * 1024 * len(tiny_tokenizer) * 4
    assert 0 < floor["runtime"] < summary["peak_rss_bytes"]
    assert floor["total"] == sum(floor[k] for k in ("runtime", "teacher", "student", "loss"))
    assert summary["peak_over_floor"] == pytest.approx(summary["peak_rss_bytes"] / floor["total"])
    table = (tmp_path / "profiled" / "profile.md").read_text()
    assert "| teacher |" in table and "peak / floor" in table and np.isfinite(summary["step_seconds"])


def test_cli_profile_flag(tmp_path, run_config, capsys):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(run_config(train={"steps": 2, "val_every": 0})))
    cli.main(["train", str(path), "--run-dir", str(tmp_path / "run"), "--profile"])
    summary = json.loads((tmp_path / "run" / "profile.json").read_text())
    assert "teacher" not in summary["phases"] or summary["phases"]["teacher"]["seconds_per_step"] >= 0
    assert summary["floor_bytes"]["teacher"] == 0  # CE only: no teacher
