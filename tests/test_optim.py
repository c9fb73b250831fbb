"""Schedules, activation checkpointing and FSDP2 wrapping: the pieces `parallelize` applies from outside."""

import pytest
import torch

from distil.config import TrainConfig
from distil.models import ModelConfig, TransformerLM
from distil.train.distributed import DistInfo, parallelize
from distil.train.schedule import lr_multiplier


def test_schedules():
    kw = dict(total_steps=100, warmup_steps=10, min_ratio=0.1)
    assert lr_multiplier(0, schedule="cosine", **kw) == pytest.approx(0.1)
    assert lr_multiplier(9, schedule="cosine", **kw) == pytest.approx(1.0)
    assert lr_multiplier(10, schedule="cosine", **kw) == pytest.approx(1.0)
    assert lr_multiplier(55, schedule="cosine", **kw) == pytest.approx(0.55)
    assert lr_multiplier(100, schedule="cosine", **kw) == pytest.approx(0.1)
    assert [lr_multiplier(s, schedule="constant", **kw) for s in (10, 50, 99)] == [1.0, 1.0, 1.0]
    wsd = [lr_multiplier(s, schedule="wsd", decay_fraction=0.2, **kw) for s in (10, 79, 80, 90, 100)]
    assert wsd == pytest.approx([1.0, 1.0, 1.0, 0.55, 0.1])


def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = TransformerLM(ModelConfig(vocab_size=40, d_model=32, n_layers=2, n_heads=2))
    ids = torch.randint(0, 40, (2, 9))
    model(ids).sum().backward()
    plain = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    wrapped = parallelize(model, TrainConfig(activation_checkpointing=True), DistInfo())
    wrapped(ids).sum().backward()
    for a, p in zip(plain, model.parameters()):
        torch.testing.assert_close(p.grad, a)


def test_compile_is_ignored_on_cpu(caplog):
    model = TransformerLM(ModelConfig(vocab_size=40, d_model=32, n_layers=1, n_heads=2))
    assert parallelize(model, TrainConfig(compile=True), DistInfo()) is model
    assert "CPU always runs the eager reference" in caplog.text
