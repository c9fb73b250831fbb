"""`distil eval` held-out loss on a real teacher against transformers' own model on the same windows.

    python benchmarks/family_eval.py --teacher gemma3-270m           # 8 windows x 256 tokens
    python benchmarks/family_eval.py --teacher smollm2 --windows 16

Writes the embedded corpus' last 300 documents to a JSONL file, runs ``distil.eval.run_eval`` on it
(what ``distil eval --model M --data FILE`` runs: distil's native model for the families it holds),
then scores the very same windows with ``transformers.AutoModelForCausalLM`` loaded from the same
converted checkpoint, and prints both losses, their relative difference and the largest logit
difference on the first window. Both see a BOS first in each window where the tokenizer adds one.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _real_teacher import TEACHERS

from distil.data.corpus import embedded_corpus
from distil.data.packing import concat_windows
from distil.data.tokenize import bos_id, load_tokenizer, tokenize_documents
from distil.eval.runner import run_eval
from distil.models import load


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", default="gemma3-270m", choices=sorted(TEACHERS))
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    args = p.parse_args()
    import transformers

    name, resolve = TEACHERS[args.teacher]
    path = resolve()
    tokenizer = load_tokenizer(path)
    docs, texts = [], embedded_corpus()[-300:]
    # Only as many documents as the windows need, so both sides score the same windows.
    windows, _ = concat_windows(tokenize_documents(tokenizer, texts), args.seq_len, bos=bos_id(tokenizer))
    windows = torch.from_numpy(windows.astype("int64"))
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "held_out.jsonl"
        need = args.windows * args.seq_len
        total = 0
        for text in texts:  # whole documents until the windows are covered
            docs.append(text)
            total += len(tokenize_documents(tokenizer, [text])[0])
            if total >= need + args.seq_len:
                break
        data.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
        start = time.perf_counter()
        ours = run_eval(args.teacher, data=data, seq_len=args.seq_len, batch_size=4)["lm"]
        ours_s = time.perf_counter() - start
    n_ours = ours.get("tokens")
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    native = load(path).eval()
    start, total, count = time.perf_counter(), 0.0, 0
    used = windows[: n_ours // args.seq_len]  # the windows distil eval scored (its file covers whole documents)
    with torch.no_grad():
        for i in range(0, len(used), 4):
            ids = used[i : i + 4]
            logits = hf(ids[:, :-1]).logits
            total += F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="sum").item()
            count += ids[:, 1:].numel()
        hf_s = time.perf_counter() - start
        diff = (native(used[:1]) - hf(used[:1]).logits).abs().max().item()
    hf_loss = total / count
    print(f"{name} ({native.config.family}, {native.config.n_layers} layers, vocabulary {native.config.vocab_size}), "
          f"{torch.get_num_threads()} threads")
    print("| | held-out loss | tokens | seconds |\n|---|---|---|---|")
    print(f"| distil eval | {ours['loss']:.4f} | {n_ours} | {ours_s:.0f} |")
    print(f"| transformers | {hf_loss:.4f} | {count} | {hf_s:.0f} |")
    print(f"relative difference {abs(ours['loss'] - hf_loss) / hf_loss:.2e}; max |logit difference| on one window {diff:.2e}")


if __name__ == "__main__":
    main()
