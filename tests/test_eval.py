"""Held-out evaluation (distil.eval.perplexity): chunked through the LM head against the whole,
materialised logits and a naive float64 formula."""

import numpy as np
import pytest
import torch

from distil.eval.perplexity import evaluate_lm
from distil.models.transformer import ModelConfig, TransformerLM
from distil.teachers.model import HFTeacher, ModelTeacher


def tiny(seed: int, vocab: int = 97) -> TransformerLM:
    torch.manual_seed(seed)
    return TransformerLM(ModelConfig(vocab_size=vocab, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                     max_seq_len=64)).double()


def naive(student, teacher, windows: np.ndarray) -> dict:
    ids = torch.from_numpy(windows.astype(np.int64))
    inputs, labels = ids[:, :-1], ids[:, 1:]
    logp_s = torch.log_softmax(student(inputs).double(), -1)
    logp_t = torch.log_softmax(teacher(inputs).double(), -1)
    ce = -logp_s.gather(-1, labels[..., None]).mean().item()
    kl = (logp_t.exp() * (logp_t - logp_s)).sum(-1).mean().item()
    agree = (logp_s.argmax(-1) == logp_t.argmax(-1)).double().mean().item()
    return {"loss": ce, "kl_to_teacher": kl, "top1_agreement": agree}


@pytest.mark.parametrize("chunk_size", [None, 1, 7, 1000])
def test_chunked_evaluation_equals_the_materialised_formula(chunk_size):
    student, teacher = tiny(0), tiny(1)
    windows = np.random.default_rng(0).integers(0, 97, size=(5, 17))
    expected = naive(student, teacher, windows)
    got = evaluate_lm(student, windows, batch_size=2, teacher=ModelTeacher(teacher), chunk_size=chunk_size)
    assert got["tokens"] == 5 * 16
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=2e-6, abs=1e-7), key  # fp32 logits


def test_materialised_logits_take_the_same_path():
    """A model scored through ``logits_fn`` and a teacher that gives only logits (transformers)."""
    student, teacher = tiny(0), tiny(1)
    windows = np.random.default_rng(1).integers(0, 97, size=(3, 9))
    expected = naive(student, teacher, windows)
    only_logits = ModelTeacher(teacher)
    only_logits.gives = ("logits",)
    got = evaluate_lm(student, windows, batch_size=2, teacher=only_logits, logits_fn=lambda ids: student(ids),
                      chunk_size=4)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=2e-6, abs=1e-7), key  # fp32 logits
    assert HFTeacher.gives == ("logits", "topk")  # what the second path serves
