"""Golden per-step losses of the two debug configs, recorded before the trainer's restructuring.

The trainer's setup and loop may be rearranged, but what a run computes must not change: these
are the losses of ``configs/debug.yaml`` (CE only) and ``configs/debug-kd.yaml`` (forward KL from
a teacher) for every step, and the final held-out loss.

How exact: bit for bit on the kernel set that recorded them (same torch, same ATen CPU capability,
same CPU model: the fingerprint in the file), so a refactor on that machine must leave every
float unchanged. On any other kernel set (AVX-512, ``ATEN_CPU_CAPABILITY=default``, another CPU)
float32 sums are reassociated over another vector width: the first loss differs in its last bit
and 20 Adam steps carry that on. Measured on the recording machine (AMD EPYC, AVX2, torch 2.13.0,
2026-12-03), ``default`` against ``avx2`` kernels: losses up to 5.0e-6 relative, grad norms up to
1.1e-5, the final held-out loss identical; an AVX-512 machine reported 7.8e-8 at step 3. The
tolerances below are ten times the drift measured, and still an order below what the smallest
deliberate change makes: learning rate x1.001 moves the CE losses by 8.7e-5 and the KD losses by
9.6e-4 (grad norms 4e-2 and 1e-3), temperature x1.001 moves the KD losses by 2.0e-3.

Record again (only when a change is *meant* to alter the numbers, and say so in the commit):
``DISTIL_RECORD_GOLDEN=1 python3 -m pytest tests/test_golden.py``.
"""

import json
import os
import platform
from pathlib import Path

import pytest
import torch

from distil.config import load_config
from distil.models import ModelConfig, TransformerLM
from distil.models.io import save_native
from distil.train.loop import train

pytestmark = pytest.mark.numerics  # CI runs these again under ATEN_CPU_CAPABILITY=default

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).with_name("golden") / "debug_losses.json"
RECORD = os.environ.get("DISTIL_RECORD_GOLDEN") == "1"
# ten times the drift between two kernel sets (module docstring): relative, per value
LOSS_RTOL, GRAD_NORM_RTOL = 5e-5, 1e-4


def kernel_fingerprint() -> dict:
    """What decides the float32 rounding of a CPU run: torch's build, ATen's kernel set, the CPU."""
    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpu": cpu}


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
        GOLDEN.write_text(json.dumps({**kernel_fingerprint(), **debug_runs}, indent=1) + "\n")
    golden = json.loads(GOLDEN.read_text())
    assert golden["torch"] == torch.__version__, "recorded with another torch; record again on a reference build"
    here = kernel_fingerprint()
    exact = all(golden.get(key) == value for key, value in here.items())
    for name in ("debug", "debug-kd"):
        assert len(debug_runs[name]["loss"]) == 20
        for key, rtol in (("loss", LOSS_RTOL), ("grad_norm", GRAD_NORM_RTOL), ("val_loss", LOSS_RTOL)):
            got, want = debug_runs[name][key], golden[name][key]
            if exact:  # the recording kernel set: step for step, bit for bit
                assert got == want, f"{name} {key} on the recording kernel set {here}"
            else:
                torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), torch.tensor(want, dtype=torch.float64),
                                           rtol=rtol, atol=0, msg=lambda m, n=name, k=key: f"{n} {k} on {here}: {m}")
    assert golden["debug-kd"]["loss"][-1] < golden["debug-kd"]["loss"][0]  # it is a training run


def test_a_deliberate_change_moves_the_losses_beyond_the_tolerance(debug_runs):
    """The tolerance must still catch a real change: learning rate x1.001 on the CE config."""
    nudged = train(load_config(ROOT / "configs" / "debug.yaml", ["train.progress=false", "train.device=cpu",
                                                                 "train.lr=3.003e-3"]))
    losses = torch.tensor([h["loss"] for h in nudged.history], dtype=torch.float64)
    recorded = torch.tensor(debug_runs["debug"]["loss"], dtype=torch.float64)
    assert ((losses - recorded).abs() / recorded.abs()).max() > 1.5 * LOSS_RTOL
