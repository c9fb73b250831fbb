"""From a DataConfig to packed train and validation windows.

    data = build_data(cfg.data, tokenizer)
    data.train_windows   # [n, seq_len + 1] int32
    data.val_docs        # held-out documents (text), for multiple-choice items
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from distil.data.corpus import load_documents, split_documents
from distil.data.packing import concat_windows
from distil.data.tokenize import tokenize_documents


@dataclass
class TokenizedData:
    train_windows: np.ndarray
    train_doc_ids: np.ndarray
    val_windows: np.ndarray
    val_doc_ids: np.ndarray
    train_docs: list[str]
    val_docs: list[str]
    train_token_docs: list | None = None  # per-document token arrays, for stream packing

    @property
    def num_train_tokens(self) -> int:
        return int(self.train_windows.shape[0] * (self.train_windows.shape[1] - 1))


def split_corpus(data_cfg) -> tuple[list[str], list[str]]:
    docs = load_documents(data_cfg)
    return split_documents(docs, data_cfg.val_fraction, seed=data_cfg.seed)


def build_data(data_cfg, tokenizer, *, docs: tuple[list[str], list[str]] | None = None) -> TokenizedData:
    train_docs, val_docs = docs if docs is not None else split_corpus(data_cfg)
    train_tokens = tokenize_documents(tokenizer, train_docs)
    train_windows, train_doc_ids = concat_windows(train_tokens, data_cfg.seq_len)
    val_windows, val_doc_ids = concat_windows(tokenize_documents(tokenizer, val_docs), data_cfg.seq_len)
    return TokenizedData(train_windows, train_doc_ids, val_windows, val_doc_ids, train_docs, val_docs, train_tokens)
