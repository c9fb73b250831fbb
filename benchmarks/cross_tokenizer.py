"""Cross-tokenizer distillation on real pairs: a small student from scratch, CE only against ULD and
the hybrid (first- and last-position merging), at equal steps, and CE again at the KD arms' wall clock.

    python benchmarks/cross_tokenizer.py --pair smollm2-bpe --steps 120 --seeds 0 1
    python benchmarks/cross_tokenizer.py --pair gemma3-smollm2 --steps 60 --seeds 0 1 --arms ce hybrid
    python benchmarks/cross_tokenizer.py --pair gemma3-smollm2 --steps 30 --arms ce uld hybrid hybrid-gkd

Pairs (teacher -> the student's tokenizer):
* ``smollm2-bpe``: SmolLM2-135M-Instruct (49152) -> distil's byte-level BPE trained on the training text;
* ``gemma3-smollm2``: Gemma 3 270M (262144) -> SmolLM2's tokenizer (49152).

Each arm reports the student's held-out loss in its own tokenizer, multiple-choice accuracy
(continuations of held-out documents, chance 0.25), the matched-entry KL to the teacher (forward KL
between the two next-token distributions renormalised over the vocabulary entries with the same
bytes, averaged over byte-aligned groups: a cross-tokenizer KL estimate), seconds, and the share of
the step spent re-tokenising and aligning.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from distil.config import config_from_dict
from distil.data.alignment import TokenizerPair
from distil.data.corpus import embedded_corpus
from distil.data.dataset import build_data
from distil.data.tokenize import load_tokenizer, train_bpe_tokenizer
from distil.eval.multiple_choice import continuation_items, score_multiple_choice
from distil.eval.perplexity import evaluate_lm
from distil.gguf import gemma3_270m, real_teacher
from distil.losses.cross_tokenizer import cross_tokenizer_loss
from distil.runtime import set_threads
from distil.teachers import Request, load_teacher
from distil.teachers.cross import CrossTokenizerTeacher
from distil.train.loop import train

ARMS = {
    "ce": ({"kd_weight": 0.0, "ce_weight": 1.0}, None),
    "uld": ({"kd_weight": 1.0, "ce_weight": 1.0}, {"mode": "uld"}),
    "hybrid": ({"kd_weight": 1.0, "ce_weight": 1.0}, {"mode": "hybrid"}),
    "hybrid-last": ({"kd_weight": 1.0, "ce_weight": 1.0}, {"mode": "hybrid", "merge": "last"}),
    # On-policy GKD: with probability lmbda a step trains on the student's own samples of the training
    # documents' openings (re-tokenised for the teacher), otherwise on the documents' continuations.
    "hybrid-gkd": ({"kd_weight": 1.0, "ce_weight": 1.0, "policy": "gkd"}, {"mode": "hybrid"}),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pair", choices=["smollm2-bpe", "gemma3-smollm2"], default="smollm2-bpe")
    ap.add_argument("--arms", nargs="+", choices=list(ARMS), default=["ce", "uld", "hybrid", "hybrid-last"])
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--bpe-vocab", type=int, default=4096)
    ap.add_argument("--docs", type=int, default=1200, help="embedded-corpus documents used (the last 5%% held out)")
    ap.add_argument("--mc-items", type=int, default=100)
    ap.add_argument("--equal-time", action="store_true", help="also train CE for the KD arms' mean wall clock")
    ap.add_argument("--lmbda", type=float, default=0.5, help="hybrid-gkd: the share of steps on the student's samples")
    ap.add_argument("--new-tokens", type=int, default=64, help="hybrid-gkd: tokens each sample adds")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    set_threads(args.threads)

    teacher_path = str(real_teacher() if args.pair == "smollm2-bpe" else gemma3_270m())
    docs = embedded_corpus()[: args.docs]
    if args.pair == "smollm2-bpe":
        student_tok = train_bpe_tokenizer(docs[: int(len(docs) * 0.95)], args.bpe_vocab)
    else:
        student_tok = load_tokenizer(real_teacher())
    teacher = load_teacher(teacher_path)
    pair = TokenizerPair(student_tok, load_tokenizer(teacher_path))
    print(f"pair {args.pair}: student vocabulary {len(student_tok)}, teacher {teacher.vocab_size}; "
          f"{len(pair.matched()[0])} entries with the same bytes")
    import json
    import tempfile
    from pathlib import Path

    tmp = Path(tempfile.mkdtemp(prefix="distil-xtok-"))
    corpus = tmp / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    student_tok.save_pretrained(str(tmp / "student_tok"))
    prompts = tmp / "prompts.jsonl"  # hybrid-gkd: openings of the training documents, their continuations
    prompts.write_text("".join(json.dumps({"prompt": d[:160], "completion": d[160:1200]}) + "\n"
                               for d in docs[: int(len(docs) * 0.95)] if len(d) > 400))

    def config(arm: str, seed: int, steps: int):
        loss, cross = ARMS[arm]
        return config_from_dict({
            "teacher": {"source": "model", "path": teacher_path} if cross else {"source": "none"},
            "student": {"d_model": 256, "n_layers": 4, "n_heads": 4, "max_seq_len": args.seq_len},
            "data": {"source": "jsonl", "path": str(corpus), "seq_len": args.seq_len, "token_cache": None,
                     "val_fraction": 0.05, "tokenizer": str(tmp / "student_tok")},
            "loss": {**loss, **({"cross_tokenizer": cross} if cross else {})},
            **({"rollout": {"prompts": str(prompts), "lmbda": args.lmbda, "max_new_tokens": args.new_tokens,
                            "max_prompt_tokens": 64, "completion_tokens": args.seq_len - 64}}
               if loss.get("policy") == "gkd" else {}),
            "train": {"steps": steps, "batch_size": args.batch_size, "lr": 3e-3, "warmup_steps": max(2, steps // 20),
                      "val_every": 0, "seed": seed, "device": "cpu", "progress": False},
            "eval": {"val_batches": 1}})

    data = build_data(config("ce", 0, 1).data, student_tok)
    val = data.val_windows[:16]
    held_docs = docs[int(len(docs) * 0.95):]
    items = continuation_items(held_docs, student_tok, num_items=args.mc_items, seed=0)
    judge = CrossTokenizerTeacher(teacher, pair)
    rows = []

    def run(arm: str, seed: int, steps: int, label: str | None = None) -> dict:
        cfg = config(arm, seed, steps)
        wrapped = CrossTokenizerTeacher(teacher, pair, merge=cfg.loss.cross_tokenizer.merge) if ARMS[arm][1] else None
        start = time.perf_counter()
        result = train(cfg, teacher=wrapped, tokenizer=student_tok, data=data, resume=False)
        seconds = time.perf_counter() - start
        student = result.student.eval()
        held = evaluate_lm(student, val, batch_size=8)
        mc = score_multiple_choice(student, student_tok, items, batch_size=16)
        row = {"arm": label or arm, "seed": seed, "steps": steps, "seconds": seconds, "loss": held["loss"],
               "mc": mc["acc"], "kl": matched_kl(student, judge, val),
               "align": (wrapped.align_seconds / seconds) if wrapped else 0.0}
        print(f"  {row['arm']:<14} seed {seed}: {steps} steps {seconds:6.1f} s  held-out loss {row['loss']:.3f}  "
              f"MC {row['mc']:.3f}  matched KL {row['kl']:.3f}  alignment {100 * row['align']:.1f}% of the run",
              flush=True)
        rows.append(row)
        return row

    for seed in args.seeds:
        for arm in args.arms:
            run(arm, seed, args.steps)
    if args.equal_time and "ce" in args.arms:
        kd = [r for r in rows if r["arm"] not in ("ce",)]
        ce = [r for r in rows if r["arm"] == "ce"]
        if kd and ce:
            per_step = statistics.mean(r["seconds"] for r in ce) / args.steps
            steps = round(statistics.mean(r["seconds"] for r in kd) / per_step)
            for seed in args.seeds:
                run("ce", seed, steps, label="ce-equal-time")

    print("\n| arm | steps | seconds | held-out loss | MC acc | matched KL | alignment share |")
    print("|---|---|---|---|---|---|---|")
    for arm in dict.fromkeys(r["arm"] for r in rows):
        sel = [r for r in rows if r["arm"] == arm]

        def cell(key, fmt, sel=sel):
            values = [r[key] for r in sel]
            if len(values) == 1:
                return format(values[0], fmt)
            return f"{format(statistics.mean(values), fmt)} ± {format(statistics.stdev(values), fmt)}"

        print(f"| {arm} | {sel[0]['steps']} | {cell('seconds', '.0f')} | {cell('loss', '.3f')} | {cell('mc', '.3f')} | "
              f"{cell('kl', '.3f')} | {cell('align', '.1%')} |")
    print(f"\n{len(args.seeds)} seeds (mean ± sample standard deviation); {len(val)} held-out windows of "
          f"{args.seq_len} tokens; {len(items)} MC items (chance 0.25)")


@torch.no_grad()
def matched_kl(student, judge: CrossTokenizerTeacher, windows) -> float:
    """Forward KL(teacher || student) renormalised over the matched entries, mean over groups."""
    total, groups = 0.0, 0
    for start in range(0, len(windows), 4):
        block = torch.from_numpy(windows[start:start + 4].astype("int64"))
        batch = {"input_ids": block[:, :-1], "labels": block[:, 1:]}
        signal = judge.signal(batch, Request("groups"))
        hidden = student(batch["input_ids"], return_hidden=True)
        value = cross_tokenizer_loss(hidden, student.lm_head.weight, batch["labels"], signal.teacher, signal.index,
                                     mode="hybrid", kind="forward_kl", matched=signal.matched, matched_weight=1.0,
                                     student_next=signal.student_next)
        total += value.item() * signal.index.groups
        groups += signal.index.groups
    return total / max(groups, 1)


if __name__ == "__main__":
    main()
