"""Compact encoding of a teacher's top-k log-probs: one compressed block per sequence.

    order = frequency_order(first_ids, vocab_size=V, tokens=first_tokens)   # once per cache
    data = encode_block(tokens, ids, logprobs, tail, vocab_size=V, id_rank=ranks_of(order))
    tokens, ids, logprobs, tail = decode_block(data, vocab_size=V, id_order=order)

Per position the k entries are kept in descending log-prob order (as ``topk`` returns them).

* ``ranked`` (default): log-probs as in ``compact``; each id is replaced by its rank in a
  frequency table of the vocabulary (``frequency_order``: ids by how often they appear in the
  teacher's top-k over the first ``ORDER_SAMPLE`` positions, most frequent first), stored as a
  varint (one byte below 128, the rest in a second stream). The table is one array per cache,
  fixed before the first block and kept beside the manifest (``id_order.npy``). Frequent tokens get
  small numbers, which zstd compresses far better than raw 16-bit ids: on SmolLM2-135M's top-64
  (vocabulary 49152) under 2 bytes per entry instead of 2.2 (docs/benchmarks.md).
* ``compact``: log-probs are quantised in log space with step ``STEP`` = 0.0199 nats down to
  ``CUT`` = -10 (p >= 4.5e-5), so the error there is at most 0.00995 nats; below the cut the step
  is 0.25 nats. The integer codes are non-decreasing along the k entries, so they are stored as
  differences (mostly small numbers). The tail log-mass uses the same quantiser. Ids as they are.
* ``exact``: log-probs and tail as float32 bits, lossless (for training that must equal the
  online teacher bit for bit). Ids as they are.

Token ids, codes and the sequence's own tokens are split into byte planes (all low bytes, then the
next bytes, ...) and each plane is compressed with zstd on its own, so each gets its own entropy
model. ``compact`` comes to 1.56 bytes per entry at vocabulary 4096 and 2.22 at 49152.

Absent entries (id -1, e.g. an API token that did not map onto the vocabulary) are stored with the
largest id value (rank ``vocab_size`` in ``ranked``) and decoded back to -1 with log-prob LOG_FLOOR.
"""

from __future__ import annotations

import struct

import numpy as np

from distil.errors import DistilError

ENCODINGS = ("ranked", "compact", "exact")
DEFAULT_ENCODING = "ranked"
ORDER_SAMPLE = 16384  # positions of top-k (from the first sequences) whose id frequencies make a ranked table
LEVEL = 12  # zstd level: 0.02-0.04 B/entry smaller than 9 on SmolLM2's top-64, ~70k tokens/s per thread
STEP = 0.0199  # nats per code above CUT: max error STEP / 2 < 0.01
CUT = -10.0
COARSE = 0.25  # nats per code below CUT
_Q_CUT = int(round(-CUT / STEP))
_Q_MAX = 65535
ABSENT_LOGPROB = -1e30
POSITIVE_SLACK = 1e-3  # log-probs up to this much above 0 are rounding and are clamped to 0


def id_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id and the absent marker fit, else uint32."""
    return np.dtype(np.uint16) if vocab_size < 65535 else np.dtype(np.uint32)


def quantize(logprobs: np.ndarray) -> np.ndarray:
    """Log-probs (<= 0, may be -inf) to uint16 codes, non-decreasing as log-probs decrease."""
    v = np.asarray(logprobs, dtype=np.float64)
    fine = np.rint(-np.maximum(v, CUT) / STEP)
    with np.errstate(invalid="ignore", over="ignore"):
        coarse = np.rint(np.clip((CUT - v) / COARSE, 0, _Q_MAX))
    return np.clip(np.where(v >= CUT, fine, _Q_CUT + coarse), 0, _Q_MAX).astype(np.uint16)


def dequantize(codes: np.ndarray) -> np.ndarray:
    q = codes.astype(np.float64)
    return np.where(q <= _Q_CUT, -q * STEP, CUT - (q - _Q_CUT) * COARSE).astype(np.float32)


def check_logprobs(logprobs: np.ndarray, where: str, present: np.ndarray | None = None) -> None:
    """NaN, infinite and clearly positive log-probs of present entries are errors that name where they are."""
    bad = ~np.isfinite(logprobs) | (logprobs > POSITIVE_SLACK)
    if present is not None:
        bad &= present
    if bad.any():
        pos = np.argwhere(bad)[0]
        raise DistilError(f"{where}: log-prob {logprobs[tuple(pos)]} at entry {tuple(int(p) for p in pos)} is not a "
                          "log-probability (NaN, infinite or > 0)")


def _planes(array: np.ndarray) -> list[bytes]:
    b = np.ascontiguousarray(array).reshape(-1).view(np.uint8).reshape(-1, array.dtype.itemsize)
    return [np.ascontiguousarray(b[:, j]).tobytes() for j in range(array.dtype.itemsize)]


def _unplanes(buffers: list[bytes], dtype: np.dtype, shape) -> np.ndarray:
    n = int(np.prod(shape))
    b = np.empty((n, dtype.itemsize), dtype=np.uint8)
    for j, buf in enumerate(buffers):
        plane = np.frombuffer(buf, dtype=np.uint8)
        if plane.size != n:
            raise DistilError("corrupt top-k block: a byte plane has the wrong length")
        b[:, j] = plane
    return b.reshape(-1).view(dtype).reshape(shape)


def frequency_order(ids: np.ndarray, *, vocab_size: int, tokens: np.ndarray | None = None) -> np.ndarray:
    """The vocabulary's ids, most frequent in ``ids`` (top-k ids, -1 absent) first; ties by how often
    they appear in ``tokens``, then by id. A ``ranked`` cache's table (uint32 [vocab_size])."""
    ids = np.asarray(ids).reshape(-1)
    counts = np.bincount(ids[(ids >= 0) & (ids < vocab_size)], minlength=vocab_size)
    ties = np.zeros(vocab_size, dtype=np.int64)
    if tokens is not None:
        tokens = np.asarray(tokens).reshape(-1)
        ties = np.bincount(tokens[(tokens >= 0) & (tokens < vocab_size)], minlength=vocab_size)
    return np.lexsort((np.arange(vocab_size), -ties, -counts)).astype(np.uint32)


def ranks_of(order: np.ndarray) -> np.ndarray:
    """Inverse of a ``frequency_order`` table: rank[id]. Raises unless ``order`` is a permutation."""
    order = np.asarray(order)
    rank = np.full(len(order), -1, dtype=np.int64)
    if order.ndim != 1 or order.size == 0 or order.min() < 0 or order.max() >= len(order):
        raise DistilError("the id table is not a permutation of the vocabulary")
    rank[order.astype(np.int64)] = np.arange(len(order))
    if (rank < 0).any():
        raise DistilError("the id table is not a permutation of the vocabulary")
    return rank


def _varint_frames(values: np.ndarray, vocab_size: int) -> list[bytes]:
    """Ranks (0..vocab_size) as a low byte stream (bit 7 set: more follows) and the high parts' planes."""
    v = values.reshape(-1).astype(np.int64)
    big = v >= 128
    low = np.where(big, (v & 127) | 128, v).astype(np.uint8)
    high = (v[big] >> 7).astype(_high_dtype(vocab_size))
    return [low.tobytes()] + _planes(high)


def _unvarint(frames: list[bytes], vocab_size: int, shape) -> np.ndarray:
    low = np.frombuffer(frames[0], dtype=np.uint8).astype(np.int64)
    if low.size != int(np.prod(shape)):
        raise DistilError("corrupt top-k block: the id stream has the wrong length")
    big = low >= 128
    dtype = _high_dtype(vocab_size)
    high = _unplanes(frames[1:], dtype, (int(big.sum()),)).astype(np.int64)
    out = low.copy()
    out[big] = (low[big] & 127) | (high << 7)
    return out.reshape(shape)


def _high_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if (vocab_size >> 7) < 65535 else np.dtype(np.uint32)


def _compressor(level: int):
    import zstandard

    return zstandard.ZstdCompressor(level=level)


def encode_block(tokens: np.ndarray, ids: np.ndarray, logprobs: np.ndarray, tail: np.ndarray, *, vocab_size: int,
                 encoding: str = "compact", level: int = LEVEL, id_rank: np.ndarray | None = None) -> bytes:
    """One sequence: ``tokens`` [n + 1], ``ids`` / ``logprobs`` [n, k] (ids < 0 absent), ``tail`` [n].
    ``ranked`` needs ``id_rank`` (``ranks_of`` the cache's table)."""
    n, k = ids.shape
    if logprobs.shape != (n, k) or tail.shape != (n,) or tokens.shape != (n + 1,):
        raise DistilError(f"top-k block shapes do not agree: tokens {tokens.shape}, ids {ids.shape}, "
                          f"logprobs {logprobs.shape}, tail {tail.shape}")
    logprobs = np.minimum(np.asarray(logprobs, dtype=np.float32), 0.0)
    absent = ids < 0
    logprobs = np.where(absent, -np.inf, logprobs)
    order = np.argsort(-logprobs, axis=1, kind="stable")  # descending; absent entries last
    ids = np.take_along_axis(ids, order, 1)
    logprobs = np.take_along_axis(logprobs, order, 1)
    if encoding == "ranked":
        if id_rank is None or len(id_rank) != vocab_size:
            raise DistilError(f"the ranked encoding needs an id table of {vocab_size} entries")
        id_frames = _varint_frames(np.where(ids < 0, vocab_size, id_rank[np.maximum(ids, 0)]), vocab_size)
    else:
        dtype = id_dtype(vocab_size)
        id_frames = _planes(np.where(ids < 0, np.iinfo(dtype).max, ids).astype(dtype))
    if encoding in ("compact", "ranked"):
        codes = quantize(logprobs).astype(np.int32)
        deltas = np.diff(codes, axis=1, prepend=0).astype(np.uint16)
        values = _planes(deltas) + _planes(quantize(np.minimum(tail, 0.0)))
    elif encoding == "exact":
        values = _planes(logprobs.astype(np.float32)) + _planes(np.asarray(tail, dtype=np.float32))
    else:
        raise DistilError(f"unknown cache encoding {encoding!r}; choose one of {', '.join(ENCODINGS)}")
    compress = _compressor(level).compress
    frames = [compress(p) for p in _planes(tokens.astype(np.uint32)) + id_frames + values]
    header = struct.pack(f"<III{len(frames)}I", n, k, len(frames), *map(len, frames))
    return header + b"".join(frames)


def decode_block(data: bytes | memoryview, *, vocab_size: int, encoding: str = "compact",
                 id_order: np.ndarray | None = None):
    """(tokens [n + 1] int64, ids [n, k] int64 with -1 absent, logprobs [n, k] float32, tail [n] float32).
    ``ranked`` needs ``id_order``, the cache's table."""
    import zstandard

    try:
        n, k, count = struct.unpack_from("<III", data, 0)
        lengths = struct.unpack_from(f"<{count}I", data, 12)
        offset = 12 + 4 * count
        decompress = zstandard.ZstdDecompressor().decompress
        frames = []
        for length in lengths:
            frames.append(decompress(bytes(data[offset : offset + length])))
            offset += length
    except (struct.error, zstandard.ZstdError) as e:
        raise DistilError(f"corrupt top-k block: {e}") from e
    tokens = _unplanes(frames[:4], np.dtype(np.uint32), (n + 1,)).astype(np.int64)
    if encoding == "ranked":
        if id_order is None or len(id_order) != vocab_size:
            raise DistilError(f"the ranked encoding needs the cache's id table of {vocab_size} entries")
        width = 1 + _high_dtype(vocab_size).itemsize
        ranks = _unvarint(frames[4 : 4 + width], vocab_size, (n, k))
        if ranks.max(initial=0) > vocab_size:
            raise DistilError("corrupt top-k block: an id rank is outside the vocabulary")
        absent = ranks == vocab_size
        ids = np.where(absent, -1, np.asarray(id_order, dtype=np.int64)[np.minimum(ranks, vocab_size - 1)])
    else:
        dtype = id_dtype(vocab_size)
        width = dtype.itemsize
        ids = _unplanes(frames[4 : 4 + width], dtype, (n, k))
        absent = ids == np.iinfo(dtype).max
        ids = np.where(absent, -1, ids.astype(np.int64))
    rest = frames[4 + width :]
    if len(rest) != (4 if encoding in ("compact", "ranked") else 8):
        raise DistilError(f"corrupt top-k block: {len(frames)} frames do not fit the {encoding} encoding")
    if encoding in ("compact", "ranked"):
        codes = np.cumsum(_unplanes(rest[:2], np.dtype(np.uint16), (n, k)).astype(np.int64), axis=1)
        logprobs = dequantize(codes)
        tail = dequantize(_unplanes(rest[2:4], np.dtype(np.uint16), (n,)))
    else:
        logprobs = _unplanes(rest[:4], np.dtype(np.float32), (n, k)).copy()
        tail = _unplanes(rest[4:8], np.dtype(np.float32), (n,)).copy()
    logprobs = np.where(absent, np.float32(ABSENT_LOGPROB), logprobs).astype(np.float32)
    return tokens, ids, logprobs, tail
