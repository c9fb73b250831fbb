"""From a DataConfig to packed train and validation windows.

    data = build_data(cfg.data, tokenizer)
    data.train_windows   # [n, seq_len + 1] int32
    data.val_docs        # held-out documents (text), for multiple-choice items
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from distil.data.corpus import load_documents, split_documents
from distil.data.packing import flatten_documents, strided_windows
from distil.data.tokenize import tokenize_documents, tokenizer_hash
from distil.errors import DistilError
from distil.fsutil import atomic_dir, cache_path

log = logging.getLogger("distil")


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


def _windows(tokens, doc_ids, seq_len, split: str, num_docs: int, data_cfg, need: bool):
    """Windows of one split; with ``need=False`` a split shorter than one window gives none."""
    if split == "train":
        what = f"the training split ({num_docs} documents)"
    else:
        what = f"the validation split (data.val_fraction = {data_cfg.val_fraction}: {num_docs} documents)"
    if not need and (len(tokens) - 1) // seq_len < 1:
        empty = np.zeros((0, seq_len + 1), dtype=np.int32)
        return empty, empty
    return strided_windows(tokens, seq_len, what), strided_windows(doc_ids, seq_len, what)


def build_data(data_cfg, tokenizer, *, docs: tuple[list[str], list[str]] | None = None,
               need_val: bool = True) -> TokenizedData:
    """Tokenise (once: with ``data.token_cache`` the token files are memory-mapped from the cache on
    later runs) and pack into windows. ``need_val=False`` (cache-teacher) accepts a validation split
    too short for one window. Errors about too little data name the split and the numbers."""
    cache = _cache_dir(data_cfg, tokenizer) if docs is None else None
    if cache is not None and (cache / "done").is_file():
        try:
            data = _from_cache(cache, data_cfg, need_val)
            log.info("tokens from the cache %s", cache)
            return data
        except DistilError:
            raise  # the data itself (too few tokens for a window): tokenising again would not help
        except (OSError, ValueError, EOFError) as e:  # truncated or damaged files
            log.warning("the token cache %s is damaged (%s); tokenising again", cache, str(e).splitlines()[0])
    train_docs, val_docs = docs if docs is not None else split_corpus(data_cfg)
    train_tokens = tokenize_documents(tokenizer, train_docs)
    val_tokens = tokenize_documents(tokenizer, val_docs)
    if cache is not None:
        _write_cache(cache, train_tokens, val_tokens, val_docs)
        return _from_cache(cache, data_cfg, need_val)
    windows = {}
    for split, token_docs, need in (("train", train_tokens, True), ("val", val_tokens, need_val)):
        flat, doc_ids = flatten_documents(token_docs)
        windows[split] = _windows(flat, doc_ids, data_cfg.seq_len, split, len(token_docs), data_cfg, need)
    (train_windows, train_doc_ids), (val_windows, val_doc_ids) = windows["train"], windows["val"]
    return TokenizedData(train_windows, train_doc_ids, val_windows, val_doc_ids, train_docs, val_docs, train_tokens)


CACHE_VERSION = 1


def _cache_dir(data_cfg, tokenizer) -> Path | None:
    """The cache folder for this corpus and tokenizer: a hash of everything that changes the tokens."""
    if not data_cfg.token_cache:
        return None
    if data_cfg.source == "embedded":
        import sys
        import sysconfig

        origin = {"python": sys.version, "stdlib": sysconfig.get_paths()["stdlib"]}
    elif data_cfg.source == "hf" and not Path(data_cfg.path).exists():
        origin = {"hub": data_cfg.path}
    else:
        path = Path(data_cfg.path)
        files = sorted(path.rglob("*")) if path.is_dir() else [path]
        origin = {"files": [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file()]}
    key = {"version": CACHE_VERSION, "tokenizer": tokenizer_hash(tokenizer), "eos": tokenizer.eos_token_id,
           "source": data_cfg.source, "field": data_cfg.text_field, "split": getattr(data_cfg, "split", None),
           "max_docs": data_cfg.max_docs, "val_fraction": data_cfg.val_fraction, "seed": data_cfg.seed, **origin}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20]
    return cache_path(data_cfg.token_cache) / digest


def _write_cache(cache: Path, train_tokens, val_tokens, val_docs) -> None:
    with atomic_dir(cache, overwrite=True) as tmp:
        for split, token_docs in (("train", train_tokens), ("val", val_tokens)):
            np.save(tmp / f"{split}_tokens.npy", np.concatenate(token_docs).astype(np.uint32))
            np.save(tmp / f"{split}_offsets.npy", np.cumsum([0] + [len(d) for d in token_docs]).astype(np.int64))
        (tmp / "val_docs.json").write_text(json.dumps(val_docs))
        (tmp / "done").write_text("complete\n")


def _from_cache(cache: Path, data_cfg, need_val: bool = True) -> TokenizedData:
    out = {}
    for split in ("train", "val"):
        tokens = np.load(cache / f"{split}_tokens.npy", mmap_mode="r")
        offsets = np.load(cache / f"{split}_offsets.npy")
        doc_ids = np.repeat(np.arange(len(offsets) - 1, dtype=np.int32), np.diff(offsets))
        windows = _windows(tokens, doc_ids, data_cfg.seq_len, split, len(offsets) - 1, data_cfg,
                           split == "train" or need_val)
        out[split] = (*windows, [tokens[offsets[i] : offsets[i + 1]] for i in range(len(offsets) - 1)])
    val_docs = json.loads((cache / "val_docs.json").read_text())
    return TokenizedData(out["train"][0], out["train"][1], out["val"][0], out["val"][1], [], val_docs, out["train"][2])
