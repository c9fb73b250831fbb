"""``distil cache-teacher``: run the teacher once over the training windows and keep its top-k.

    manifest = write_cache(cfg, "caches/smollm2-k64", k=64)
    stats = cache_stats("caches/smollm2-k64")   # bytes/token, encoding error, reconstruction KL

Sequence i of the cache is training window i of ``build_data(cfg.data)`` (concat packing at
``data.seq_len``), so a run with ``teacher.source: cache`` sees, batch for batch, what the online
teacher would have given with ``loss.topk = k``. The teacher runs at ``--batch-size`` sequences per
forward; encoding and compression run on ``--workers`` threads beside it. The tokenizer is saved in
the cache folder, so training from the cache needs nothing else of the teacher. With the ``ranked``
encoding (the default) the teacher's top-k over the first ``ORDER_SAMPLE`` positions (16384: 64
windows of 256) is held back until the id frequency table is made from it
(``topk_codec.frequency_order``).

With ``loss.cross_tokenizer`` and a teacher of another tokenizer, sequence i is window i re-tokenised
by the teacher (``CrossTokenizerTeacher.topk_rows``): its ids, and at each position the top-k plus
the token produced there, in the teacher's vocabulary. The teacher's tokenizer is saved beside the
data's; training aligns each window again and checks the ids match (docs/cross-tokenizer.md).
"""

from __future__ import annotations

import collections
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from distil.config import Config
from distil.data.alignment import TokenizerPair
from distil.data.packing import batch_tensors
from distil.data.teacher_cache import CacheSettings, CacheWriter, Manifest, TeacherCache, tokens_sha256
from distil.data.tokenize import load_tokenizer, tokenizer_hash
from distil.data.topk_codec import (
    DEFAULT_ENCODING,
    LEVEL,
    ORDER_SAMPLE,
    check_logprobs,
    encode_block,
    frequency_order,
)
from distil.errors import DistilError
from distil.fsutil import atomic_dir
from distil.teachers import ApiTeacher, Request, load_teacher
from distil.teachers.cross import CrossTokenizerTeacher
from distil.train.distributed import init_distributed
from distil.train.loop import prepare

log = logging.getLogger("distil")

DEFAULT_SHARD_TOKENS = 1 << 22


def write_cache(cfg: Config, out: str | Path, *, k: int = 64, encoding: str = DEFAULT_ENCODING, batch_size: int = 8,
                workers: int = 2, overwrite: bool = False, level: int = LEVEL, shard_tokens: int = DEFAULT_SHARD_TOKENS,
                progress: bool = True, device: str | None = None, teacher=None, tokenizer=None, data=None,
                plan: bool = True) -> Manifest:
    """Write (or finish) the cache of ``cfg``'s teacher over its training windows into ``out``; with
    ``plan``, first say what it caches against what a run of ``cfg`` reads (:func:`cache_plan`)."""
    if cfg.teacher.source not in ("model", "api"):
        raise DistilError(f"cache-teacher needs teacher.source 'model' or 'api', not {cfg.teacher.source!r}")
    if batch_size < 1 or workers < 1:
        raise DistilError("--batch-size and --workers must be >= 1")
    info = init_distributed(device or cfg.train.device)
    # The cache covers the training windows only: a validation split too small for a window is fine here.
    teacher, tokenizer, data = prepare(cfg, None, teacher=teacher, tokenizer=tokenizer, data=data, info=info,
                                       need_val=False)
    if cfg.teacher.source == "api":
        teacher = teacher or ApiTeacher.from_config(cfg.api, tokenizer)
        k = min(k, cfg.api.topk)
        vocab_size, name, temperature = len(tokenizer), teacher.name, 1.0
    else:
        name = teacher.name
        if Path(name).exists():  # a local checkpoint: absolute, so --stats finds it from anywhere
            name = str(Path(name).resolve())
        vocab_size, temperature = teacher.vocab_size, cfg.loss.temperature
    request = Request("topk", k=k, temperature=temperature)
    cross = cross_teacher(cfg, teacher, tokenizer)
    windows = data.train_windows
    settings = CacheSettings(teacher=name, tokenizer_hash=tokenizer_hash(tokenizer), vocab_size=vocab_size,
                             k=k + 1 if cross else k, temperature=temperature, encoding=encoding,
                             source="api" if cfg.teacher.source == "api" else "teacher", seq_len=cfg.data.seq_len,
                             document_attention=cfg.data.document_attention, tokens_sha256=tokens_sha256(windows),
                             level=level,
                             teacher_tokenizer_hash=tokenizer_hash(cross.pair.teacher.tokenizer) if cross else None)
    out = Path(out)
    writer = CacheWriter(out, settings, total_sequences=len(windows),
                         sequences_per_shard=max(1, shard_tokens // cfg.data.seq_len), overwrite=overwrite)
    for folder, tok in (("tokenizer", tokenizer), ("teacher_tokenizer", cross.pair.teacher.tokenizer if cross else None)):
        if tok is not None and not (out / folder).is_dir():
            with atomic_dir(out / folder, overwrite=True) as tmp:
                tok.save_pretrained(str(tmp))
    start = writer.next_sequence
    if plan:
        log.info("%s", cache_plan(cfg, len(windows), start))
    bar = tqdm(total=len(windows) * cfg.data.seq_len, initial=start * cfg.data.seq_len, unit="tok", unit_scale=True,
               desc="cache-teacher", disable=not progress, dynamic_ncols=True)
    pending: collections.deque = collections.deque()
    held: list[tuple] = []  # ranked: sequences waiting for the id table

    def submit(rows) -> None:
        for tokens, ids, logprobs, tail in rows:
            pending.append(pool.submit(_encode, tokens, ids, logprobs, tail, vocab_size, encoding, level,
                                       writer.id_rank))

    def fix_id_order() -> None:
        writer.set_id_order(frequency_order(np.concatenate([h[1] for h in held]), vocab_size=vocab_size,
                                            tokens=np.concatenate([h[0] for h in held])))
        submit(held)
        held.clear()

    def drain(limit: int) -> None:
        while len(pending) > limit:
            block, positions = pending.popleft().result()
            writer.add_block(block, positions)
            bar.update(cfg.data.seq_len)  # a block is one window (a cross-tokenizer one has the teacher's count)

    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for first in range(start, len(windows), batch_size):
                index = np.arange(first, min(first + batch_size, len(windows)))
                batch = batch_tensors(windows, data.train_doc_ids, index, info.device,
                                      document_attention=cfg.data.document_attention)
                began = time.perf_counter()
                if cross:  # the teacher's re-tokenisation of each window, its top-k and produced token
                    rows = cross.topk_rows(batch["input_ids"], k, temperature)
                    for (_, ids, logprobs, _), sequence in zip(rows, index):
                        check_logprobs(logprobs, f"teacher output for sequence {sequence}", ids >= 0)
                else:
                    ids, logprobs, tail = (t.cpu().numpy() for t in teacher.signal(batch, request))
                    check_logprobs(logprobs, f"teacher output for sequences {index[0]}..{index[-1]}", ids >= 0)
                    rows = [(np.asarray(windows[sequence], dtype=np.int64), ids[row], logprobs[row], tail[row])
                            for row, sequence in enumerate(index)]
                if first == start + batch_size:  # the second batch's speed (the first warms up) gives the estimate
                    rate = len(index) * cfg.data.seq_len / max(time.perf_counter() - began, 1e-9)
                    log.info("the teacher runs at about %.0f tokens/s: about %s for the %d windows left",
                             rate, _minutes((len(windows) - first) * cfg.data.seq_len / rate), len(windows) - first)
                if writer.needs_id_order:
                    held.extend(rows)
                    if len(held) * cfg.data.seq_len >= ORDER_SAMPLE or len(held) == len(windows) - start:
                        fix_id_order()
                else:
                    submit(rows)
                drain(4 * workers * batch_size)
            if held:
                fix_id_order()
            drain(0)
    except BaseException:
        writer.abort()
        bar.close()
        raise
    bar.close()
    manifest = writer.finish()
    log.info("cache written to %s: %d sequences, %d tokens, %.1f bytes/token", out, manifest.num_sequences,
             manifest.num_tokens, manifest.bytes / max(1, manifest.num_tokens))
    return manifest


def cross_teacher(cfg: Config, teacher, tokenizer) -> CrossTokenizerTeacher | None:
    """``loss.cross_tokenizer`` with a teacher of another tokenizer: the teacher wrapped for alignment
    (the cache then holds its re-tokenisation of each window); None for an ordinary cache."""
    if cfg.loss.cross_tokenizer.mode == "off" or cfg.teacher.source != "model":
        return None
    pair = TokenizerPair(tokenizer, load_tokenizer(cfg.loss.cross_tokenizer.teacher_tokenizer or cfg.teacher.path))
    if pair.identical:
        return None
    return CrossTokenizerTeacher(teacher, pair)


def cache_plan(cfg: Config, windows: int, done: int = 0) -> str:
    """The line cache-teacher says before it starts: what it caches, and what a run of ``cfg`` reads.

    The cache covers every training window because a run draws its batches from all of them (the
    order depends on the seed and the epoch), so a short run reads only part of it."""
    total = windows * cfg.data.seq_len
    reads = cfg.train.steps * cfg.train.batch_size * cfg.train.grad_accum * cfg.data.seq_len
    text = (f"caching the teacher over all {windows:,} training windows ({total:,} tokens"
            + (f"; {done:,} windows already done" if done else "") + f"); a run of this config reads {reads:,} tokens "
            "(train.steps x batch_size x grad_accum x seq_len), drawn from all of them")
    if reads < total // 2:
        text += (f": {reads / total:.0%} of the cache. Fewer documents (data.max_docs) make a smaller cache and a "
                 "shorter wait")
    return text


def _minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def _encode(tokens, ids, logprobs, tail, vocab_size, encoding, level, id_rank):
    block = encode_block(tokens, ids, logprobs, tail, vocab_size=vocab_size, encoding=encoding, level=level,
                         id_rank=id_rank)
    return block, ids.shape[0]


P_MIN = 1e-4  # the encoding's error bound holds for entries at least this likely


@torch.no_grad()
def cache_stats(path: str | Path, *, teacher_path: str | None = None, sample: int = 8, device="cpu",
                verify: bool = True) -> dict:
    """Size, and (when the teacher can be loaded) the encoding error and the reconstruction KL.

    On ``sample`` sequences spread over the cache the teacher is run again on the cached tokens:
    ``max_abs_logprob_error`` is the largest |stored - exact| log-prob over entries with p >= 1e-4;
    ``reconstruction_kl`` is the mean per token of KL(teacher || reconstruction), where the
    reconstruction is the stored top-k plus the stored tail mass spread evenly over the other tokens.
    """
    cache = TeacherCache(path)
    if verify:
        cache.verify()
    m, s = cache.manifest, cache.settings
    stats = {"sequences": m.num_sequences, "tokens": m.num_tokens, "bytes": m.bytes, "k": s.k,
             "encoding": s.encoding, "bytes_per_token": m.bytes / max(1, m.num_tokens),
             "bytes_per_entry": m.bytes / max(1, m.num_tokens * s.k), "max_abs_logprob_error": None,
             "reconstruction_kl": None, "sampled_tokens": 0, **m.stats}
    teacher_path = teacher_path or (s.teacher if s.source == "teacher" else None)
    if teacher_path is None:
        stats["note"] = "no teacher model to compare against (pass --teacher)"
        return stats
    teacher = load_teacher(teacher_path, device=device)
    if teacher.vocab_size < s.vocab_size:
        raise DistilError(f"teacher {teacher_path} has {teacher.vocab_size} tokens; the cache has {s.vocab_size}")
    picks = np.unique(np.linspace(0, len(cache) - 1, num=min(sample, len(cache))).round().astype(np.int64))
    max_err, kl_sum, count = 0.0, 0.0, 0
    for sequence in picks:
        tokens, ids, logprobs, tail = cache.get(int(sequence))
        input_ids = torch.as_tensor(tokens[:-1], device=device)[None]
        positions = None
        if s.document_attention:
            raise DistilError("--stats does not rebuild document-attention masks; compare on a cache without them")
        exact = torch.log_softmax(teacher.logits(input_ids, None, positions)[0].double() / s.temperature, -1)
        exact = exact[:, : s.vocab_size]
        ids_t, lp_t = torch.as_tensor(ids, device=device), torch.as_tensor(logprobs, dtype=torch.float64, device=device)
        present = ids_t >= 0
        truth = exact.gather(-1, ids_t.clamp_min(0))
        big = present & (truth >= math.log(P_MIN))
        if big.any():
            max_err = max(max_err, (lp_t - truth).abs()[big].max().item())
        # Reconstruction: stored top-k, stored tail spread over the remaining tokens.
        rest = s.vocab_size - present.sum(-1, keepdim=True)
        tail_t = torch.as_tensor(tail, dtype=torch.float64, device=device)
        recon = (tail_t[:, None] - torch.log(rest.clamp_min(1).double())).expand_as(exact).clone()
        recon.scatter_(-1, ids_t.clamp_min(0), torch.where(present, lp_t, recon.gather(-1, ids_t.clamp_min(0))))
        recon = recon - torch.logsumexp(recon, -1, keepdim=True)  # the quantised parts need not sum to exactly 1
        kl_sum += (exact.exp() * (exact - recon)).sum().item()
        count += exact.shape[0]
    stats.update(max_abs_logprob_error=max_err, reconstruction_kl=kl_sum / max(1, count), sampled_tokens=count,
                 teacher=str(teacher_path))
    return stats
