"""Shared fixtures: tiny random models and a tiny corpus made inside the tests (no network)."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


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
