"""Tokens per chunk of the fused loss: time of forward + backward, and what the process keeps.

    python benchmarks/loss_chunk.py                       # the issue-29 shapes: 2048 tokens, vocab 49152
    python benchmarks/loss_chunk.py --vocab 262144 --chunks 32 64 128

Student hidden [N, 256] with its head, teacher hidden [N, 576] with its head (SmolLM2-135M's
width), forward KL, fp32, as users run it (``import distil`` tunes glibc's allocator). Each chunk
size runs in its own process: the best of the timed repeats after one warm-up, and the process's
resident size after them (RSS: the blocks glibc keeps for reuse count, as they do in training).
``default`` is what ``loss.chunk_size: null`` chooses (``default_chunk_size``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time


def run_one(chunk: int, tokens: int, vocab: int, repeats: int) -> dict:
    import torch

    import distil  # noqa: F401  (the allocator tuning users get)
    from distil.losses.fused import fused_linear_kd_loss

    torch.manual_seed(0)
    hidden = torch.randn(tokens, 256, requires_grad=True)
    weight = (torch.randn(vocab, 256) * 0.02).requires_grad_()
    teacher_hidden, teacher_weight = torch.randn(tokens, 576), torch.randn(vocab, 576) * 0.02
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        fused_linear_kd_loss(hidden, weight, teacher_hidden, teacher_weight, chunk_size=chunk).backward()
        times.append(time.perf_counter() - start)
    rss = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmRSS"))
    return {"seconds": min(times[1:]), "rss": rss}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--chunks", type=int, nargs="+", default=[64, 128, 256, 341, 512, 1024])
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: one chunk size, print JSON
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.tokens, args.vocab, args.repeats)))
        return
    from distil.losses.fused import default_chunk_size

    default = default_chunk_size(args.vocab)
    print(f"fused forward KL, {args.tokens} tokens, vocab {args.vocab}; default chunk {default}\n")
    print("| chunk | fwd+bwd (s) | process RSS after (GB) |")
    print("|---|---|---|")
    for chunk in args.chunks:
        out = subprocess.run([sys.executable, __file__, "--one", str(chunk), "--tokens", str(args.tokens),
                              "--vocab", str(args.vocab), "--repeats", str(args.repeats)],
                             check=True, capture_output=True, text=True).stdout
        result = json.loads(out.strip().splitlines()[-1])
        label = f"{chunk} (default)" if chunk == default else str(chunk)
        print(f"| {label} | {result['seconds']:.3f} | {result['rss'] / 1e9:.2f} |", flush=True)


if __name__ == "__main__":
    main()
