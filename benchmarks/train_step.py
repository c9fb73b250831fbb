"""Tokens/s and peak memory of one distillation step: distil against the loop users write by hand.

    python benchmarks/train_step.py                       # vocab 32768, CPU-sized models
    python benchmarks/train_step.py --vocab 32768 --d-model 512 --layers 4 --batch 4 --seq 512
    python benchmarks/train_step.py --vocab 128256 --dtype bfloat16 ...   # GPU: bf16 autocast for both

One step = teacher forward, student forward and backward, the KD loss, an AdamW update.

* hand-written: transformers LlamaForCausalLM teacher and student, `student(ids).logits`,
  `teacher(ids).logits`, log_softmax + KL on the materialised [tokens x vocab] logits (eager).
* distil: the same weights copied into distil's TransformerLM (bit-exact with transformers), the
  teacher's hidden states only, and the fused LM-head + loss (never materialising logits).

Each variant runs in its own subprocess; peak memory is the extra resident memory over the models
and optimizer state (CPU: VmHWM after a reset, in a pass without allocator tuning) or the CUDA
allocator's peak. The hand-written variant is timed without distil's allocator tuning
(distil/runtime.py), as a user's own loop would run; distil's with it, as ``import distil`` applies it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, __import__("os").path.dirname(__file__))
from _memory import memory_pass, peak_since, reset_peak  # noqa: E402


def run_one(args) -> dict:
    import torch
    import torch.nn.functional as F
    import transformers

    from distil.losses import fused_linear_kd_loss
    from distil.models import TransformerLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)

    def llama(d, layers, heads):
        cfg = transformers.LlamaConfig(vocab_size=args.vocab, hidden_size=d, intermediate_size=int(8 * d / 3 // 64 * 64),
                                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                                       tie_word_embeddings=False)
        return transformers.LlamaForCausalLM(cfg)

    def to_distil(hf_model):
        """The same weights in distil's TransformerLM (what load_hf does, without the disk)."""
        from distil.models.hf import model_config_from_hf
        from distil.models.io import load_state

        with torch.device(device):
            model = TransformerLM(model_config_from_hf(hf_model.config.to_dict()))
        state = {k.removeprefix("model."): v for k, v in hf_model.state_dict().items() if "rotary_emb" not in k}
        load_state(model, state, source="transformers model")
        return model

    with torch.device(device):  # built where they run: a 128k-vocabulary model initialises slowly on CPU
        teacher_hf = llama(args.teacher_d_model, args.teacher_layers, 8)
        student_hf = llama(args.d_model, args.layers, 8)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq + 1), device=device)
    inputs, labels = ids[:, :-1], ids[:, 1:]
    if args.one == "handwritten":
        teacher, student = teacher_hf.eval(), student_hf.train()

        def step():
            with torch.no_grad():
                t_logits = teacher(inputs).logits
            s_logits = student(inputs).logits
            loss = F.kl_div(F.log_softmax(s_logits.float(), -1), F.log_softmax(t_logits.float(), -1),
                            log_target=True, reduction="none").sum(-1).mean()
            loss.backward()
    else:
        teacher, student = to_distil(teacher_hf).eval(), to_distil(student_hf).train()
        del teacher_hf, student_hf

        def step():
            with torch.no_grad():
                t_hidden = teacher(inputs, return_hidden=True)
            hidden = student(inputs, return_hidden=True)
            loss = fused_linear_kd_loss(hidden, student.lm_head.weight, t_hidden, teacher.lm_head.weight, kind="forward_kl")
            loss.backward()
    del labels
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)

    autocast = (torch.autocast(device, dtype=torch.bfloat16) if args.dtype == "bfloat16"
                else __import__("contextlib").nullcontext())

    def full_step():
        with autocast:
            step()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()

    full_step()  # warm-up; creates the optimizer state
    base = reset_peak(device)
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        full_step()
        times.append(time.perf_counter() - start)
    peak = peak_since(device, base)
    tokens = args.batch * args.seq
    return {"variant": args.one, "seconds": min(times), "tokens_per_second": tokens / min(times), "peak_mib": peak / 2**20,
            "device": device}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--teacher-d-model", type=int, default=512)
    parser.add_argument("--teacher-layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="bfloat16: both variants under bf16 autocast (fp32 weights, as mixed-precision training)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args)))
        return
    rows = []
    for variant in ("handwritten", "distil"):
        cmd = [sys.executable, __file__, "--one", variant] + [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                                                                if k != "one"]
        # The hand-written loop's process is one without distil's allocator tuning (this script imports
        # distil for both variants; a user's own loop would not).
        env = {**os.environ, "DISTIL_MALLOC_TUNING": "0"} if variant == "handwritten" else None
        out = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if out.returncode:
            raise SystemExit(out.stderr)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        if row["device"] != "cuda":  # CUDA: the allocator's own peak from the timed run
            row["peak_mib"] = memory_pass(cmd)
        rows.append(row)
    base = rows[0]
    print(f"\nvocab={args.vocab} student {args.d_model}x{args.layers} teacher {args.teacher_d_model}x{args.teacher_layers} "
          f"batch {args.batch}x{args.seq} device={rows[0]['device']} dtype={args.dtype}\n")
    print("| variant | step (s) | tokens/s | peak extra memory (MiB) | tokens/s vs hand-written | memory vs hand-written |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['seconds']:.3f} | {r['tokens_per_second']:,.0f} | {r['peak_mib']:.0f} | "
              f"{r['tokens_per_second'] / base['tokens_per_second']:.2f}x | {r['peak_mib'] / base['peak_mib']:.0%} |")


if __name__ == "__main__":
    main()
