"""Rollout speed: distil's batched sampling against ``transformers`` ``generate`` on the same student.

    python benchmarks/rollout.py                              # batch 1 / 8 / 32, prompts of 64 and 512 tokens
    python benchmarks/rollout.py --batches 8 --contexts 64 --new-tokens 128

The student (random weights, ``--d-model`` x ``--layers``, the SmolLM2 vocabulary size by default)
is built once in distil and saved in the transformers Llama format; both sides sample
``--new-tokens`` tokens at temperature 1 (no top-k / top-p, no early stop) from the same prompts,
with their KV caches, in float32 on this machine's threads. Tokens/s counts new tokens (batch x
new tokens / seconds, prefill included); each cell is the median of ``--repeats`` runs after one
warm-up. Rollouts in training call :func:`distil.models.generate.sample` exactly like this.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from distil.models import ModelConfig, TransformerLM, save_hf
from distil.models.generate import sample


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--contexts", type=int, nargs="+", default=[64, 512], help="prompt lengths in tokens")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=args.vocab, d_model=args.d_model, n_layers=args.layers, n_heads=args.heads,
                      max_seq_len=max(args.contexts) + args.new_tokens)
    model = TransformerLM(cfg).eval()
    with tempfile.TemporaryDirectory() as tmp:
        save_hf(model, tmp)
        hf = AutoModelForCausalLM.from_pretrained(tmp, torch_dtype=torch.float32).eval()
    rows = []
    for context in args.contexts:
        for batch in args.batches:
            prompt = torch.randint(0, args.vocab, (batch, context))
            g = torch.Generator().manual_seed(0)
            ours = timed(lambda prompt=prompt, g=g: sample(model, prompt, max_new_tokens=args.new_tokens, generator=g),
                         args.repeats)

            def theirs(prompt=prompt):
                with torch.no_grad():
                    hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=True, temperature=1.0,
                                top_k=0, top_p=1.0, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                pad_token_id=0, eos_token_id=None)

            hf_seconds = timed(theirs, args.repeats)
            tokens = batch * args.new_tokens
            rows.append((context, batch, tokens / ours, tokens / hf_seconds, hf_seconds / ours))
            print(f"context {context}, batch {batch}: distil {tokens / ours:,.0f} tok/s, transformers "
                  f"{tokens / hf_seconds:,.0f} tok/s", flush=True)
    import transformers

    print(f"\nStudent {args.d_model}-d x {args.layers} layers x {args.heads} heads, vocabulary {args.vocab:,}, float32, "
          f"{args.new_tokens} new tokens at temperature 1, {args.threads} threads; torch {torch.__version__}, "
          f"transformers {transformers.__version__}; median of {args.repeats}")
    print("| prompt tokens | batch | distil tok/s | transformers generate tok/s | speed-up |")
    print("|---|---|---|---|---|")
    for context, batch, ours, theirs, ratio in rows:
        print(f"| {context} | {batch} | {ours:,.0f} | {theirs:,.0f} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
