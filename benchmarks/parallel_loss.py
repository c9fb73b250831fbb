"""Overhead of the vocabulary- and sequence-parallel losses against the single-process loss.

    python benchmarks/parallel_loss.py                    # world size 2, gloo on CPU
    python benchmarks/parallel_loss.py --tokens 4096 --vocab 32768 --kind reverse_kl

Each process holds half of the vocabulary columns (vocab parallel) or half of the tokens (sequence
parallel) of [tokens, vocab] student and teacher logits, and times forward + backward. The single-
process row is kd_loss on the full tensors in one process. Communication per token is listed in
docs/losses.md.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _time(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _worker(rank, world, init, args, out):
    from distil.losses.parallel import sequence_parallel_kd_loss, vocab_parallel_kd_loss

    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    g = torch.Generator().manual_seed(0)
    s = torch.randn(args.tokens, args.vocab, generator=g)
    t = torch.randn(args.tokens, args.vocab, generator=g)
    cols = slice(rank * args.vocab // world, (rank + 1) * args.vocab // world)
    rows = slice(rank * args.tokens // world, (rank + 1) * args.tokens // world)
    sv, tv = s[:, cols].clone().requires_grad_(), t[:, cols].clone()
    ss, ts = s[rows].clone().requires_grad_(), t[rows].clone()

    def vocab():
        vocab_parallel_kd_loss(sv, tv, args.kind).backward()

    def sequence():
        sequence_parallel_kd_loss(ss, ts, args.kind).backward()

    result = {"vocab": _time(vocab, args.repeats), "sequence": _time(sequence, args.repeats)}
    if rank == 0:
        torch.save(result, out)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--kind", default="reverse_kl")
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from distil.losses import kd_loss

    g = torch.Generator().manual_seed(0)
    s = torch.randn(args.tokens, args.vocab, generator=g).requires_grad_()
    t = torch.randn(args.tokens, args.vocab, generator=g)
    single = _time(lambda: kd_loss(s, t, args.kind).backward(), args.repeats)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.pt")
        mp.spawn(_worker, args=(args.world, os.path.join(tmp, "init"), args, out), nprocs=args.world, join=True)
        result = torch.load(out)
    print(f"\nkind={args.kind} tokens={args.tokens} vocab={args.vocab} world={args.world} (gloo, CPU, "
          f"{os.cpu_count()} cores shared by all processes)\n")
    print("| form | fwd+bwd (s) | vs single process |")
    print("|---|---|---|")
    print(f"| single process, full tensors | {single:.3f} | 1.00x |")
    for form in ("vocab", "sequence"):
        print(f"| {form} parallel, {args.world} processes | {result[form]:.3f} | {result[form] / single:.2f}x |")


if __name__ == "__main__":
    main()
