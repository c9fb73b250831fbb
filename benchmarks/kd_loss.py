"""Forward + backward time and peak memory of the distillation loss through the LM head.

    python benchmarks/kd_loss.py                      # N in {1024, 8192}, hidden 1024, vocab 32768
    python benchmarks/kd_loss.py --vocab 128256       # GPU-sized vocabulary
    python benchmarks/kd_loss.py --tokens 1024 --kind reverse_kl --repeats 3

Variants, each on the same inputs (student hidden [N, H] and head [V, H]; teacher hidden and head):

* eager: materialised logits, log_softmax and the divergence, autograd (what users write by hand);
* fused: ``distil.losses.fused_linear_kd_loss`` (chunked, closed-form gradients);
* liger: Liger-Kernel's chunked distillation loss (``LigerFusedLinearJSDLoss``, generalised JSD),
  when installed, timed after its torch.compile warm-up. Compare it with ``--kind jsd``.

Each variant runs in a fresh subprocess. Peak memory is the extra resident memory (CPU: VmHWM
above the level after the inputs exist) or the CUDA allocator's peak above the inputs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

sys.path.insert(0, __import__("os").path.dirname(__file__))
from _memory import memory_pass, peak_since, reset_peak  # noqa: E402


def run_one(variant: str, tokens: int, hidden: int, vocab: int, kind: str, repeats: int, device: str, dtype: str,
            chunk_size: int | None = None) -> dict:
    import torch

    from distil.losses import fused_linear_kd_loss, kd_loss

    torch.manual_seed(0)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    h = (torch.randn(tokens, hidden, device=device) * 1.0).to(torch_dtype).requires_grad_()
    w = (torch.randn(vocab, hidden, device=device) * hidden**-0.5).to(torch_dtype).requires_grad_()
    th = torch.randn(tokens, hidden, device=device).to(torch_dtype)
    tw = (torch.randn(vocab, hidden, device=device) * hidden**-0.5).to(torch_dtype)

    if variant == "eager":
        def step():
            loss = kd_loss(h @ w.t(), th @ tw.t(), kind)
            loss.backward()
    elif variant == "fused":
        def step():
            loss = fused_linear_kd_loss(h, w, th, tw, kind=kind, chunk_size=chunk_size)
            loss.backward()
    elif variant == "liger":
        # Liger's chunked distillation loss (torch.compile, runs on CPU too): generalised JSD, so
        # compare with --kind jsd (beta 0.5 on both sides).
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        liger = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=0.5, compiled=True)
        labels = torch.zeros(tokens, dtype=torch.long, device=device)

        def step():
            loss = liger(h, w, th, tw, labels)
            loss.backward()
    else:
        raise ValueError(variant)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    step()  # warm-up (and Liger's compile)
    h.grad = w.grad = None
    sync()
    base = reset_peak(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
        h.grad = w.grad = None
    peak = peak_since(device, base)
    return {"variant": variant, "tokens": tokens, "seconds": min(times), "peak_mib": peak / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 8192])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--kind", default="forward_kl")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cuda" if _cuda() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--variants", nargs="+", default=["eager", "fused", "liger"])
    parser.add_argument("--chunk-size", type=int, default=None,
                        help="tokens per chunk of the fused loss (default: distil's default for the vocabulary)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run a single variant, print JSON
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.tokens[0], args.hidden, args.vocab, args.kind, args.repeats, args.device,
                                 args.dtype, args.chunk_size)))
        return
    rows = []
    for tokens in args.tokens:
        for variant in args.variants:
            if variant == "liger" and not _installed("liger_kernel"):
                rows.append({"variant": "liger", "tokens": tokens, "seconds": None, "peak_mib": None, "note": "not installed"})
                continue
            cmd = [sys.executable, __file__, "--one", variant, "--tokens", str(tokens), "--hidden", str(args.hidden),
                   "--vocab", str(args.vocab), "--kind", args.kind, "--repeats", str(args.repeats), "--device", args.device,
                   "--dtype", args.dtype] + (["--chunk-size", str(args.chunk_size)] if args.chunk_size else [])
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:
                rows.append({"variant": variant, "tokens": tokens, "seconds": None, "peak_mib": None,
                             "note": out.stderr.strip().splitlines()[-1][:80] if out.stderr.strip() else "failed"})
                continue
            row = json.loads(out.stdout.strip().splitlines()[-1])
            if args.device != "cuda":  # CUDA: the allocator's own peak from the timed run
                row["peak_mib"] = memory_pass(cmd)
            rows.append(row)
            print(f"  {variant:>6} N={tokens}: {rows[-1]['seconds']:.3f}s, {rows[-1]['peak_mib']:.0f} MiB", file=sys.stderr)
    print(f"\nkind={args.kind} hidden={args.hidden} vocab={args.vocab} device={args.device} dtype={args.dtype} "
          f"chunk={args.chunk_size or 'default'}\n")
    print("| N | variant | fwd+bwd (s) | peak extra memory (MiB) | time vs eager | memory vs eager |")
    print("|---|---|---|---|---|---|")
    for tokens in args.tokens:
        eager = next((r for r in rows if r["tokens"] == tokens and r["variant"] == "eager" and r["seconds"]), None)
        for r in (r for r in rows if r["tokens"] == tokens):
            if r["seconds"] is None:
                print(f"| {tokens} | {r['variant']} | - | - | {r.get('note', '')} | |")
                continue
            rel_t = f"{r['seconds'] / eager['seconds']:.2f}x" if eager else "-"
            rel_m = f"{r['peak_mib'] / eager['peak_mib']:.0%}" if eager and eager["peak_mib"] > 0 else "-"
            print(f"| {tokens} | {r['variant']} | {r['seconds']:.3f} | {r['peak_mib']:.0f} | {rel_t} | {rel_m} |")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


if __name__ == "__main__":
    main()
