"""Tokenizers: load any transformers tokenizer, or train a byte-level BPE with ``tokenizers``.

    tok = train_bpe_tokenizer(train_docs, vocab_size=4096, out_dir=run / "tokenizer")
    tok = load_tokenizer("path/or/hub-id")          # AutoTokenizer
    token_docs = tokenize_documents(tok, docs)      # list of int32 arrays, EOS appended (BOS first where
                                                    # the tokenizer adds one itself: Gemma, Llama 3)

A trained tokenizer is saved in the standard format, so ``AutoTokenizer.from_pretrained`` loads it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from distil.errors import DistilError
from distil.gguf import resolve_model_path

EOS = "<|endoftext|>"


def train_bpe_tokenizer(docs: list[str], vocab_size: int, out_dir: str | Path | None = None):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=EOS, unk_token=None, model_max_length=10**9
    )
    if out_dir is not None:
        fast.save_pretrained(str(out_dir))
    return fast


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    path = resolve_model_path(path)
    try:
        tok = AutoTokenizer.from_pretrained(str(path))
    except Exception as e:
        raise DistilError(f"could not load a tokenizer from {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
    tok.model_max_length = 10**9  # we cut sequences ourselves; silence the length warning
    return tok


def has_tokenizer(path: str | Path) -> bool:
    path = Path(resolve_model_path(path))
    return path.is_dir() and any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))


def eos_id(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise DistilError("the tokenizer has no EOS token; documents cannot be separated")
    return int(tokenizer.eos_token_id)


def bos_id(tokenizer) -> int | None:
    """The BOS id when the tokenizer puts one before every text by itself (Gemma, Llama 3: their models
    expect it; Gemma 3 270M's held-out loss is 4.41 without it against 3.11 with it), else None."""
    bos = getattr(tokenizer, "bos_token_id", None)  # tokenizer-like objects without special tokens have none
    if bos is None:
        return None
    with_special = tokenizer("a")["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    return int(bos) if with_special[:1] == [bos] and with_special[1:] == without else None


def tokenize_documents(tokenizer, docs: list[str], *, batch_size: int = 256) -> list[np.ndarray]:
    """Token ids of each document with EOS appended, as int32 arrays; BOS first where the tokenizer
    adds one itself (:func:`bos_id`)."""
    eos, bos = eos_id(tokenizer), bos_id(tokenizer)
    first = [] if bos is None else [bos]
    out = []
    for start in range(0, len(docs), batch_size):
        batch = tokenizer(docs[start : start + batch_size], add_special_tokens=False)["input_ids"]
        out.extend(np.asarray([*first, *ids, eos], dtype=np.int32) for ids in batch)
    return out


def tokenizer_hash(tokenizer) -> str:
    """A short hash of the tokenizer's vocabulary, to check caches and checkpoints against."""
    vocab = tokenizer.get_vocab()
    blob = json.dumps(sorted(vocab.items(), key=lambda kv: kv[1]), ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
