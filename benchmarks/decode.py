"""Decode tokens/s and state memory: an all-attention teacher against its 50% Mamba2 hybrid.

    python benchmarks/decode.py                                   # contexts 1k..16k, CPU-sized model
    python benchmarks/decode.py --d-model 2048 --layers 24 --contexts 1024 4096 16384

For each context length: prefill the prompt once, then time greedy generation of ``--new-tokens``
tokens for ``--batch`` sequences (default 1), with the KV cache (attention layers) and recurrent
state (SSM layers); on CUDA with mamba_ssm and causal_conv1d the SSM step runs their kernels.
State memory is the size of the KV cache plus SSM states after the prompt.
"""

from __future__ import annotations

import argparse
import time

import torch

from distil.hybrid import hybridize
from distil.models import ModelConfig, TransformerLM
from distil.models.ssm import SSMState
from distil.models.state import preallocated_states


def state_bytes(states) -> int:
    total = 0
    for s in states:
        tensors = (s.conv, s.ssm) if isinstance(s, SSMState) else s[:2]
        total += sum(t.numel() * t.element_size() for t in tensors)
    return total


@torch.no_grad()
def measure(model, context: int, new_tokens: int, vocab: int, device, batch: int = 1) -> tuple[float, int]:
    prompt = torch.randint(0, vocab, (batch, context), device=device)
    states = preallocated_states(model, batch, context + new_tokens)  # as distil's generate() does
    logits, states = model(prompt, states=states, return_states=True)
    token = logits[:, -1:].argmax(-1)
    memory = state_bytes(states)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(new_tokens):
        logits, states = model(token, states=states, return_states=True)
        token = logits[:, -1:].argmax(-1)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return batch * new_tokens / (time.perf_counter() - start), memory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--d-state", type=int, default=16)
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--batch", type=int, default=1, help="sequences decoded together (tokens/s counts all of them)")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    teacher = TransformerLM(ModelConfig(vocab_size=args.vocab, d_model=args.d_model, n_layers=args.layers,
                                        n_heads=args.heads, max_seq_len=max(args.contexts) + args.new_tokens))
    ssm_layers = [i for i in range(args.layers) if i % 2 == 1]  # every other layer: 50%
    hybrid = hybridize(teacher, ssm_layers, d_state=args.d_state, chunk_size=256, init="mil_plain")
    teacher, hybrid = teacher.to(device, dtype).eval(), hybrid.to(device, dtype).eval()
    print(f"\nd_model={args.d_model} layers={args.layers} hybrid pattern {hybrid.config.pattern} device={device} "
          f"dtype={args.dtype}, batch {args.batch}, {args.new_tokens} new tokens\n")
    print("| context | teacher tokens/s | hybrid tokens/s | speed-up | teacher state (MiB) | hybrid state (MiB) |")
    print("|---|---|---|---|---|---|")
    for model in (teacher, hybrid):  # warm-up: CUDA context, kernel compilation (Triton), allocator
        measure(model, 64, 4, args.vocab, device, args.batch)
    for context in args.contexts:
        t_speed, t_mem = measure(teacher, context, args.new_tokens, args.vocab, device, args.batch)
        h_speed, h_mem = measure(hybrid, context, args.new_tokens, args.vocab, device, args.batch)
        print(f"| {context} | {t_speed:.1f} | {h_speed:.1f} | {h_speed / t_speed:.2f}x | {t_mem / 2**20:.1f} | "
              f"{h_mem / 2**20:.1f} |", flush=True)


if __name__ == "__main__":
    main()
