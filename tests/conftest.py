"""Shared fixtures: tiny random models and a tiny corpus made inside the tests (no network)."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch

TEST_THREADS = str(min(2, os.cpu_count() or 1))
torch.set_num_threads(int(TEST_THREADS))
# A fixed count: the tests compare runs bit for bit, and a float reduction's rounding depends on how
# many threads split it; distil's default follows the machine's load (tests/test_threads.py tests that).
os.environ.setdefault("DISTIL_NUM_THREADS", TEST_THREADS)


def pytest_configure(config):
    """Before any test module is imported (some copy os.environ for their subprocesses): every
    cache distil keeps (token files, API answers, converted GGUFs) goes to a throwaway folder, or
    to $DISTIL_TEST_CACHE_DIR when set (to keep the real teacher's GGUF conversion between runs)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ["DISTIL_CACHE_DIR"] = os.environ.get("DISTIL_TEST_CACHE_DIR") or tempfile.mkdtemp(prefix="distil-test-cache-")

WORDS = ("the model learns to predict the next token from the teacher while the student keeps "
         "its own small size and the loss compares both distributions over the vocabulary").split()


def make_documents(num_docs: int = 60, seed: int = 0) -> list[str]:
    import random

    rng = random.Random(seed)
    docs = []
    for _ in range(num_docs):
        sentences = []
        for _ in range(rng.randint(3, 8)):
            sentences.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 14))).capitalize() + ".")
        docs.append(" ".join(sentences))
    return docs


@pytest.fixture(scope="session")
def tiny_docs() -> list[str]:
    return make_documents()


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory, tiny_docs):
    from distil.data.tokenize import train_bpe_tokenizer

    path = tmp_path_factory.mktemp("tokenizer")
    return train_bpe_tokenizer(tiny_docs, 300, path)


@pytest.fixture
def tiny_corpus_file(tmp_path, tiny_docs):
    import json

    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in tiny_docs))
    return path


def save_tiny_model(path, tokenizer, *, n_layers: int, seed: int, d_model: int = 32, max_seq_len: int = 128) -> str:
    """A random TransformerLM saved with ``tokenizer`` at ``path`` (a teacher folder for the CLI and setup)."""
    from distil.models import ModelConfig, TransformerLM
    from distil.models.io import save_native

    torch.manual_seed(seed)
    save_native(TransformerLM(ModelConfig(vocab_size=len(tokenizer), d_model=d_model, n_layers=n_layers, n_heads=2,
                                          max_seq_len=max_seq_len)), path, tokenizer=tokenizer)
    return str(path)


def with_sections(base: dict, **sections) -> dict:
    """A config dict: ``base`` with each section's keys overridden by ``sections``."""
    out = dict(base)
    for section, values in sections.items():
        out[section] = {**out.get(section, {}), **values}
    return out


@pytest.fixture
def run_config(tmp_path, tiny_corpus_file):
    """``make(**sections)``: a small CE-only config dict over the tiny corpus (4 steps, validation every 2)."""
    corpus = tmp_path / "corpus.jsonl"
    if corpus != tiny_corpus_file:
        corpus.write_text(tiny_corpus_file.read_text())
    base = {
        "teacher": {"source": "none"},
        "student": {"d_model": 32, "n_layers": 1, "n_heads": 2},
        "data": {"source": "jsonl", "path": str(corpus), "seq_len": 32, "val_fraction": 0.2},
        "loss": {"kd_weight": 0.0, "ce_weight": 1.0},
        "train": {"steps": 4, "batch_size": 2, "lr": 3e-3, "warmup_steps": 1, "progress": False, "val_every": 2,
                  "log_every": 1, "device": "cpu"},
        "eval": {"val_batches": 1},
    }
    return lambda **sections: with_sections(base, **sections)
