"""Packing token documents into fixed-length training windows.

``concat``: documents are joined (each already ends in EOS) and cut into windows of ``seq_len + 1``
tokens that overlap by one, so each window gives ``seq_len`` inputs and their next-token labels.
``doc_ids`` records which document each position belongs to, for attention that does not cross
documents.

:class:`WindowSampler` yields batches of window indices in a seeded shuffled order, epoch after
epoch; its position is part of a checkpoint, so a resumed run sees the same batches.
"""

from __future__ import annotations

import numpy as np
import torch

from distil.errors import DistilError


def concat_windows(token_docs: list[np.ndarray], seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Windows [num_windows, seq_len + 1] of token ids, and the document index of each position."""
    if not token_docs:
        raise DistilError("no documents to pack")
    tokens = np.concatenate(token_docs)
    docs = np.concatenate([np.full(len(d), i, dtype=np.int32) for i, d in enumerate(token_docs)])
    num_windows = (len(tokens) - 1) // seq_len
    if num_windows < 1:
        raise DistilError(f"the corpus has {len(tokens)} tokens, fewer than one window of data.seq_len + 1 = {seq_len + 1}")
    idx = np.arange(num_windows)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
    return tokens[idx], docs[idx]


class WindowSampler:
    """Seeded, shuffled batches of window indices, endlessly; ``state_dict`` captures the position."""

    def __init__(self, num_windows: int, batch_size: int, seed: int = 0):
        if num_windows < batch_size:
            raise DistilError(f"only {num_windows} training windows, fewer than train.batch_size = {batch_size}")
        self.num_windows, self.batch_size, self.seed = num_windows, batch_size, seed
        self.epoch, self.position = 0, 0
        self._order = self._make_order()

    def _make_order(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.num_windows)

    def next_batch(self) -> np.ndarray:
        if self.position + self.batch_size > self.num_windows:
            self.epoch, self.position = self.epoch + 1, 0
            self._order = self._make_order()
        batch = self._order[self.position : self.position + self.batch_size]
        self.position += self.batch_size
        return batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = state["epoch"], state["position"]
        self._order = self._make_order()


def batch_tensors(windows: np.ndarray, doc_ids: np.ndarray, index: np.ndarray, device) -> dict:
    """Inputs, next-token labels and document ids [batch, seq] for the windows at ``index``."""
    chunk = torch.from_numpy(windows[index].astype(np.int64)).to(device)
    docs = torch.from_numpy(doc_ids[index][:, :-1].astype(np.int64)).to(device)
    return {"input_ids": chunk[:, :-1], "labels": chunk[:, 1:], "doc_ids": docs}
