"""Golden per-step losses of the two debug configs, recorded before the trainer's restructuring.

The trainer's setup and loop may be rearranged, but what a run computes must not change: these
are the losses of ``configs/debug.yaml`` (CE only) and ``configs/debug-kd.yaml`` (forward KL from
a teacher) for every step, and the final held-out loss, bit for bit on this CPU build of torch.

``configs/debug-kd.yaml`` reads the demo's trained teacher; here the teacher is a seeded random
model with the debug run's tokenizer, so the test needs nothing on disk.

Record again (only when a change is *meant* to alter the numbers, and say so in the commit):
``DISTIL_RECORD_GOLDEN=1 python3 -m pytest tests/test_golden.py``.
"""

import json
import os
from pathlib import Path

import pytest
import torch

from distil.config import load_config
from distil.models import ModelConfig, TransformerLM
from distil.models.io import save_native
from distil.train.loop import train

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).with_name("golden") / "debug_losses.json"
RECORD = os.environ.get("DISTIL_RECORD_GOLDEN") == "1"


@pytest.fixture(scope="module")
def debug_runs(tmp_path_factory):
    out = {}
    ce = train(load_config(ROOT / "configs" / "debug.yaml", ["train.progress=false", "train.device=cpu"]))
    out["debug"] = ce
    teacher_dir = tmp_path_factory.mktemp("golden") / "teacher"
    torch.manual_seed(1234)
    teacher = TransformerLM(ModelConfig(vocab_size=len(ce.tokenizer), d_model=64, n_layers=2, n_heads=2))
    save_native(teacher, teacher_dir)
    ce.tokenizer.save_pretrained(str(teacher_dir))
    out["debug-kd"] = train(load_config(ROOT / "configs" / "debug-kd.yaml", [
        f"teacher.path={teacher_dir}", "train.progress=false", "train.device=cpu"]))
    return {name: {"loss": [h["loss"] for h in r.history], "grad_norm": [h["grad_norm"] for h in r.history],
                   "val_loss": r.val["loss"]} for name, r in out.items()}


def test_debug_configs_reproduce_their_golden_losses(debug_runs):
    if RECORD:
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps({"torch": torch.__version__, **debug_runs}, indent=1) + "\n")
    golden = json.loads(GOLDEN.read_text())
    assert golden["torch"] == torch.__version__, "recorded with another torch; record again on a reference build"
    for name in ("debug", "debug-kd"):
        assert len(debug_runs[name]["loss"]) == 20
        assert debug_runs[name]["loss"] == golden[name]["loss"], name  # exact, step for step
        assert debug_runs[name]["grad_norm"] == golden[name]["grad_norm"], name
        assert debug_runs[name]["val_loss"] == golden[name]["val_loss"], name
    assert golden["debug-kd"]["loss"][-1] < golden["debug-kd"]["loss"][0]  # it is a training run
