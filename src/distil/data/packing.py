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


def concat_windows(token_docs: list[np.ndarray], seq_len: int, what: str = "the corpus", *,
                   bos: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Windows [num_windows, seq_len + 1] of token ids, and the document index of each position.
    ``what`` names the data in errors (e.g. "the validation split (5% of 20 documents)").

    With ``bos`` (for models that expect a BOS first, :func:`distil.data.tokenize.bos_id`) every window
    starts with it, followed by the next ``seq_len`` tokens of the text (windows then overlap by none):
    a window cut mid-document reads as that model was trained to read. Evaluation windows use this."""
    if not token_docs:
        raise DistilError(f"{what} has no documents to pack")
    tokens, docs = flatten_documents(token_docs)
    if bos is None:
        return strided_windows(tokens, seq_len, what), strided_windows(docs, seq_len, what)
    num = len(tokens) // seq_len
    if num < 1:
        raise DistilError(f"{what} has {len(tokens)} tokens, fewer than one window of data.seq_len = {seq_len}")
    body, body_docs = tokens[: num * seq_len].reshape(num, seq_len), docs[: num * seq_len].reshape(num, seq_len)
    windows = np.concatenate([np.full((num, 1), bos, dtype=tokens.dtype), body], axis=1)
    return windows, np.concatenate([body_docs[:, :1], body_docs], axis=1)


def flatten_documents(token_docs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """All documents' tokens in one array, and the document index of each token."""
    if not token_docs:
        return np.zeros(0, dtype=np.int32), np.zeros(0, dtype=np.int32)
    tokens = np.concatenate(token_docs)
    docs = np.concatenate([np.full(len(d), i, dtype=np.int32) for i, d in enumerate(token_docs)])
    return tokens, docs


def strided_windows(flat: np.ndarray, seq_len: int, what: str = "the corpus") -> np.ndarray:
    """Overlapping windows [n, seq_len + 1] as a read-only view of ``flat`` (no copy, so a
    memory-mapped token file stays on disk until rows are indexed)."""
    num_windows = (len(flat) - 1) // seq_len
    if num_windows < 1:
        raise DistilError(f"{what} has {len(flat)} tokens, fewer than one window of data.seq_len + 1 = {seq_len + 1}")
    step = flat.strides[0]
    return np.lib.stride_tricks.as_strided(flat, shape=(num_windows, seq_len + 1), strides=(seq_len * step, step),
                                           writeable=False)


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


def batch_tensors(windows: np.ndarray, doc_ids: np.ndarray, index: np.ndarray, device, *,
                  document_attention: bool = False) -> dict:
    """Inputs, next-token labels and document ids [batch, seq] for the windows at ``index``.

    With ``document_attention`` the batch also carries ``attn_doc_ids`` (attention stays inside each
    document) and ``positions`` that restart at every document.
    """
    chunk = torch.from_numpy(windows[index].astype(np.int64)).to(device)
    docs = torch.from_numpy(doc_ids[index][:, :-1].astype(np.int64)).to(device)
    batch = {"input_ids": chunk[:, :-1], "labels": chunk[:, 1:], "doc_ids": docs}
    if document_attention:
        index_in_row = torch.arange(docs.shape[1], device=device).expand_as(docs)
        starts = torch.ones_like(docs, dtype=torch.bool)
        starts[:, 1:] = docs[:, 1:] != docs[:, :-1]
        start_of_doc = torch.where(starts, index_in_row, torch.zeros_like(index_in_row)).cummax(dim=1).values
        batch["attn_doc_ids"] = docs
        batch["positions"] = index_in_row - start_of_doc
    return batch


def stream_tensors(batch: dict[str, np.ndarray], device) -> dict:
    return {k: torch.from_numpy(v).to(device) for k, v in batch.items()}


class StreamBatcher:
    """``stream`` packing: each of ``rows`` batch rows walks through one document, chunk by chunk.

    The moment a row's document runs out, that row continues with the next document, so no row
    waits for the others and short documents never leave half-empty batches. A document's last
    chunk is padded (labels -100). Each batch says which rows start a new document (``reset``), so
    the recurrent state of those rows is zeroed, and gives each token its position in its document.
    As in the source diary:  step 1: [A1C1, A1C2], [A2C1, pad], [A3C1, A3C2];
    step 2: [A1C3, A1C4], [A3C3, A3C4] ... the row that finished A2 has moved on to A4.
    """

    def __init__(self, token_docs: list[np.ndarray], rows: int, chunk_len: int, *, seed: int = 0, pad_id: int = 0):
        self.docs = [d for d in token_docs if len(d) >= 2]
        if len(self.docs) < rows:
            raise DistilError(f"stream packing needs at least {rows} documents of 2+ tokens, found {len(self.docs)}")
        self.rows, self.chunk_len, self.seed, self.pad_id = rows, chunk_len, seed, pad_id
        self.epoch, self.cursor = 0, 0
        self._order = self._make_order()
        self.row_doc = [self._take() for _ in range(rows)]
        self.row_offset = [0] * rows

    def _make_order(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.epoch, 7]).permutation(len(self.docs))

    def _take(self) -> int:
        if self.cursor >= len(self._order):
            self.epoch, self.cursor = self.epoch + 1, 0
            self._order = self._make_order()
        doc = int(self._order[self.cursor])
        self.cursor += 1
        return doc

    def next_batch(self) -> dict[str, np.ndarray]:
        inputs = np.full((self.rows, self.chunk_len), self.pad_id, dtype=np.int64)
        labels = np.full((self.rows, self.chunk_len), -100, dtype=np.int64)
        positions = np.zeros((self.rows, self.chunk_len), dtype=np.int64)
        reset = np.zeros(self.rows, dtype=bool)
        for row in range(self.rows):
            doc, offset = self.docs[self.row_doc[row]], self.row_offset[row]
            count = min(self.chunk_len, len(doc) - 1 - offset)  # positions that have a next token
            inputs[row, :count] = doc[offset : offset + count]
            labels[row, :count] = doc[offset + 1 : offset + 1 + count]
            positions[row] = offset + np.arange(self.chunk_len)
            reset[row] = offset == 0
            offset += self.chunk_len
            if offset >= len(doc) - 1:
                self.row_doc[row], offset = self._take(), 0
            self.row_offset[row] = offset
        return {"input_ids": inputs, "labels": labels, "positions": positions, "reset": reset}

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "row_doc": list(self.row_doc), "row_offset": list(self.row_offset)}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.cursor = state["epoch"], state["cursor"]
        self._order = self._make_order()
        self.row_doc, self.row_offset = list(state["row_doc"]), list(state["row_offset"])
