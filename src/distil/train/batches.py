"""Batch sources: where each training step's micro-batches come from, chosen once at setup.

    batches = build_batches(cfg, data, info, tokenizer, teacher=teacher, student=student)
    batch = batches.next_batch()          # a dict of tensors on the training device
    state = batches.state_dict()          # what a checkpoint records; load_state_dict resumes there

Every source yields ``input_ids`` and ``labels`` [rows, seq] (labels -100 where nothing is
predicted) and, as the packing gives them, ``attn_doc_ids`` / ``positions``:

* ``WindowBatches``: concat packing. Every rank draws the same global batch of training windows
  (``WindowSampler``) and keeps its own rows (all of them under a tensor-parallel head).
* ``StreamBatches``: stream packing. Each row walks through one document chunk by chunk; the
  student's (and a stateful teacher's) recurrent / KV state flows from chunk to chunk in
  ``batch["stream"]``, zeroed for rows that start a new document, detached, its KV bounded.
* ``RolloutBatches`` (train/rollout.py): prompts with completions from the dataset, the student's
  samples or the teacher's (``rollout:`` and ``loss.policy``; docs/on-policy.md).
* ``CacheBatches``: concat windows with the teacher's top-k read from a cache
  (``batch["teacher_topk"]``), decoded by ``data.num_workers`` DataLoader workers beside training;
  a cross-tokenizer cache adds the teacher's ids of each window (``batch["teacher_ids"]``).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

from distil.data.packing import StreamBatcher, WindowSampler, batch_tensors, stream_tensors
from distil.data.teacher_cache import TeacherCache
from distil.data.topk_codec import ABSENT_LOGPROB
from distil.errors import DistilError
from distil.models.state import carry, empty_states
from distil.teachers import CacheTeacher
from distil.train.rollout import RolloutBatches


class BatchSource(Protocol):
    def next_batch(self) -> dict: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...

    def close(self) -> None: ...


def build_batches(cfg, data, info, tokenizer, *, local_rows: slice, teacher=None, student=None) -> BatchSource:
    """The configured packing as a batch source; ``local_rows`` is this rank's slice of the global batch."""
    pad_id = tokenizer.eos_token_id or 0
    if cfg.rollout.prompts:  # prompts: the completions are the dataset's, the student's or the teacher's
        return RolloutBatches.from_config(cfg, info, tokenizer, student=student, teacher=teacher,
                                          rows=local_rows.stop - local_rows.start)
    if cfg.data.packing == "stream":
        # Each rank walks its own share of the documents; a row's state flows across its chunks.
        teacher_model = teacher.model if teacher is not None and teacher.carries_state else None
        return StreamBatches(data.train_token_docs[info.rank :: info.world_size], local_rows.stop - local_rows.start,
                             cfg.data.seq_len, seed=cfg.train.seed, pad_id=pad_id, device=info.device,
                             kv_window=cfg.data.stream_kv_window, student=student, teacher_model=teacher_model)
    cached = getattr(teacher, "inner", teacher)  # a cross-tokenizer teacher wraps the cache it reads
    if isinstance(cached, CacheTeacher):
        return CacheBatches(cached.cache, cfg, data, info, pad_id=pad_id)
    return WindowBatches(data, cfg.train.batch_size, local_rows, seed=cfg.train.seed, device=info.device,
                         document_attention=cfg.data.document_attention)


class WindowBatches:
    def __init__(self, data, batch_size: int, rows: slice, *, seed: int, device, document_attention: bool):
        self.data, self.rows, self.device, self.document_attention = data, rows, device, document_attention
        self.sampler = WindowSampler(len(data.train_windows), batch_size, seed=seed)

    def next_batch(self) -> dict:
        index = self.sampler.next_batch()[self.rows]
        return batch_tensors(self.data.train_windows, self.data.train_doc_ids, index, self.device,
                             document_attention=self.document_attention)

    def state_dict(self) -> dict:
        return {"sampler": self.sampler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state["sampler"])

    def close(self) -> None:
        pass


class StreamBatches:
    def __init__(self, token_docs, rows: int, seq_len: int, *, seed: int, pad_id: int, device, kv_window: int | None,
                 student, teacher_model=None):
        self.sampler = StreamBatcher(token_docs, rows, seq_len, seed=seed, pad_id=pad_id)
        self.device, self.kv_window = device, kv_window
        self.student, self.teacher_model = student, teacher_model
        self.states: dict = {"student": None, "teacher": None}  # written back by each step's forwards

    def next_batch(self) -> dict:
        batch = stream_tensors(self.sampler.next_batch(), self.device)
        reset, rows = batch["reset"], batch["reset"].shape[0]
        # Detach the carried states, zero the rows that start a new document, bound the KV.
        for name, model in (("student", self.student), ("teacher", self.teacher_model)):
            if model is None:
                continue
            if self.states[name] is None:
                self.states[name] = empty_states(model, rows)
            self.states[name] = carry(self.states[name], reset=reset, kv_window=self.kv_window)
        batch["stream"] = self.states
        return batch

    def state_dict(self) -> dict:
        return {"sampler": self.sampler.state_dict(), "stream": self.states}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state["sampler"])
        self.states.update(state["stream"])

    def close(self) -> None:
        pass


# -- teacher caches ------------------------------------------------------------------------------


def cache_rows(cache: TeacherCache, index, *, seq_len: int, pad_id: int = 0):
    """The sequences at ``index`` as padded arrays [rows, seq_len]: tokens, labels (-100 where the
    teacher has no entry or past the end), top-k ids (-1 absent), log-probs, tail."""
    rows, k = len(index), cache.settings.k
    inputs = np.full((rows, seq_len), pad_id, dtype=np.int64)
    labels = np.full((rows, seq_len), -100, dtype=np.int64)
    ids = np.full((rows, seq_len, k), -1, dtype=np.int64)
    logprobs = np.full((rows, seq_len, k), ABSENT_LOGPROB, dtype=np.float32)
    tail = np.zeros((rows, seq_len), dtype=np.float32)
    for row, sequence in enumerate(index):
        tokens, seq_ids, seq_lp, seq_tail = cache.get(int(sequence))
        n = min(seq_len, seq_ids.shape[0])
        inputs[row, :n], ids[row, :n], logprobs[row, :n], tail[row, :n] = tokens[:n], seq_ids[:n], seq_lp[:n], seq_tail[:n]
        labels[row, :n] = np.where((seq_ids[:n] >= 0).any(-1), tokens[1 : n + 1], -100)
    return inputs, labels, ids, logprobs, tail


def cross_cache_rows(cache: TeacherCache, index):
    """A cross-tokenizer cache's sequences at ``index``, right-padded to the longest: the teacher's
    ids [rows, n] (-1 past the end), top ids [rows, n - 1, k] (-1 absent), log-probs, tail."""
    seqs = [cache.get(int(sequence)) for sequence in index]
    n = max(len(s[0]) for s in seqs)
    k = cache.settings.k
    tokens = np.full((len(seqs), n), -1, dtype=np.int64)
    ids = np.full((len(seqs), n - 1, k), -1, dtype=np.int64)
    logprobs = np.full((len(seqs), n - 1, k), ABSENT_LOGPROB, dtype=np.float32)
    tail = np.zeros((len(seqs), n - 1), dtype=np.float32)
    for row, (seq_tokens, seq_ids, seq_lp, seq_tail) in enumerate(seqs):
        m = len(seq_ids)
        tokens[row, :m + 1], ids[row, :m], logprobs[row, :m], tail[row, :m] = seq_tokens, seq_ids, seq_lp, seq_tail
    return tokens, ids, logprobs, tail


class CacheDataset(torch.utils.data.IterableDataset):
    """An endless iterable of training batches with the teacher's top-k read from a cache, for a
    ``torch.utils.data.DataLoader(..., batch_size=None, num_workers=N)``.

    Batch order is the ``WindowSampler``'s; every rank draws the same global batch and keeps its
    slice, and DataLoader worker w builds batches w, w + N, w + 2N ... which the DataLoader hands
    out in order, so the stream is the same for any number of workers. Each batch carries the
    sampler state after it (``sampler_state``), which is what a checkpoint must record: workers
    read ahead of training.

    ``windows`` given (a cache written from the data): tokens come from the data windows and must
    equal the cached ones. ``windows`` None (an imported cache): the cache's own sequences, padded.
    """

    def __init__(self, cache: TeacherCache, *, batch_size: int, seed: int, sampler_state: dict | None, rank: int = 0,
                 world_size: int = 1, seq_len: int, windows=None, doc_ids=None, document_attention: bool = False,
                 pad_id: int = 0):
        self.cache, self.batch_size, self.seed, self.sampler_state = cache, batch_size, seed, sampler_state
        self.rank, self.world_size, self.seq_len = rank, world_size, seq_len
        self.windows, self.doc_ids, self.document_attention, self.pad_id = windows, doc_ids, document_attention, pad_id

    def __iter__(self):
        worker = torch.utils.data.get_worker_info()
        worker_id, num_workers = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        sampler = WindowSampler(len(self.cache), self.batch_size, seed=self.seed)
        if self.sampler_state is not None:
            sampler.load_state_dict(self.sampler_state)
        local = self.batch_size // self.world_size
        count = 0
        while True:
            index = sampler.next_batch()
            state = sampler.state_dict()
            if count % num_workers == worker_id:
                yield {**self.make_batch(index[self.rank * local : (self.rank + 1) * local]), "sampler_state": state}
            count += 1

    def make_batch(self, index) -> dict:
        if self.cache.settings.teacher_tokenizer_hash is not None:  # the teacher's own ids: aligned by the teacher
            batch = batch_tensors(self.windows, self.doc_ids, index, "cpu", document_attention=self.document_attention)
            tokens, ids, logprobs, tail = cross_cache_rows(self.cache, index)
            batch["teacher_ids"] = torch.from_numpy(tokens)
            batch["teacher_topk"] = (torch.from_numpy(ids), torch.from_numpy(logprobs), torch.from_numpy(tail))
            return batch
        inputs, labels, ids, logprobs, tail = cache_rows(self.cache, index, seq_len=self.seq_len, pad_id=self.pad_id)
        if self.windows is not None:
            batch = batch_tensors(self.windows, self.doc_ids, index, "cpu", document_attention=self.document_attention)
            if not np.array_equal(batch["input_ids"].numpy(), inputs):
                bad = int(index[np.flatnonzero((batch["input_ids"].numpy() != inputs).any(1))[0]])
                raise DistilError(f"cache sequence {bad} holds other tokens than training window {bad}: the cache "
                                  f"{self.cache.path} does not belong to this data")
        else:
            batch = {"input_ids": torch.from_numpy(inputs), "labels": torch.from_numpy(labels)}
        batch["teacher_topk"] = (torch.from_numpy(ids), torch.from_numpy(logprobs), torch.from_numpy(tail))
        return batch


def worker_error_line(message: str) -> str:
    """The original one-line message of an error a DataLoader worker raised (the DataLoader re-raises
    it as 'Caught DistilError in DataLoader worker process 0. Original Traceback ...')."""
    lines = [line for line in message.splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].startswith("Caught "):
        last = lines[-1]
        return last.split("DistilError: ", 1)[1] if "DistilError: " in last else last
    return message


class CacheBatches:
    """Training batches from a teacher cache through a DataLoader (``data.num_workers`` workers).

    ``state_dict`` is the position after the last batch *consumed* (workers read ahead), and
    ``load_state_dict`` restarts the loader from there."""

    def __init__(self, cache: TeacherCache, cfg, data, info, *, pad_id: int):
        self.cache, self.cfg, self.data, self.info, self.pad_id = cache, cfg, data, info, pad_id
        self.state = WindowSampler(len(cache), cfg.train.batch_size, seed=cfg.train.seed).state_dict()
        self._it = None

    def state_dict(self) -> dict:
        return {"sampler": dict(self.state)}

    def load_state_dict(self, state: dict) -> None:
        self.close()
        self.state = dict(state["sampler"])

    def close(self) -> None:
        self._it = None  # the DataLoader iterator shuts its workers down when dropped

    def next_batch(self) -> dict:
        device = self.info.device
        if self._it is None:
            own = self.cache.settings.source == "import"
            dataset = CacheDataset(self.cache, batch_size=self.cfg.train.batch_size, seed=self.cfg.train.seed,
                                   sampler_state=self.state, rank=self.info.rank, world_size=self.info.world_size,
                                   seq_len=self.cfg.data.seq_len, windows=None if own else self.data.train_windows,
                                   doc_ids=None if own else self.data.train_doc_ids,
                                   document_attention=self.cfg.data.document_attention, pad_id=self.pad_id)
            workers = self.cfg.data.num_workers
            loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers,
                                                 pin_memory=device.type == "cuda",
                                                 prefetch_factor=4 if workers else None)
            self._it = iter(loader)
        try:
            batch = next(self._it)
        except DistilError as e:  # from a worker: the DataLoader puts the worker's whole traceback in the message
            raise DistilError(worker_error_line(str(e))) from None
        self.state = batch.pop("sampler_state")
        topk = tuple(t.to(device, non_blocking=True) for t in batch.pop("teacher_topk"))
        batch = {name: t.to(device, non_blocking=True) for name, t in batch.items()}
        batch["teacher_topk"] = topk
        return batch
