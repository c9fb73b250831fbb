"""Setup resolves every choice once: the teacher protocol, the loss path, batch sources, the run."""

import ast
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from distil.config import config_from_dict
from distil.data.dataset import build_data
from distil.losses.objective import DistillLoss
from distil.models import ModelConfig, TransformerLM
from distil.spec import Request
from distil.teachers import ApiTeacher, CacheTeacher, HFTeacher, MemoTeacher, ModelTeacher, Teacher
from distil.train.batches import WindowBatches
from distil.train.distributed import DistInfo
from distil.train.loop import setup
from distil.train.run import run_training


def _teacher(tokenizer):
    torch.manual_seed(1)
    return ModelTeacher(TransformerLM(ModelConfig(vocab_size=len(tokenizer), d_model=32, n_layers=1, n_heads=2)))


def test_every_teacher_kind_implements_the_protocol(tiny_tokenizer):
    model = _teacher(tiny_tokenizer).model
    for teacher in (ModelTeacher(model), MemoTeacher(model)):
        assert isinstance(teacher, Teacher) and teacher.gives == ("head", "logits", "topk") and teacher.carries_state
    for cls in (HFTeacher, CacheTeacher, ApiTeacher):
        for name in ("gives", "carries_state", "signal", "to", "close", "vocab_size"):
            assert hasattr(cls, name), (cls.__name__, name)
    assert HFTeacher.gives == ("logits", "topk") and CacheTeacher.gives == ("topk",)
    assert ApiTeacher.gives == ("topk", "token_logprobs", "text")  # sampled tokens; text in its own tokenizer


def test_model_teacher_signals_agree_with_each_other(tiny_tokenizer):
    teacher = _teacher(tiny_tokenizer)
    batch = {"input_ids": torch.randint(0, len(tiny_tokenizer), (2, 12))}
    hidden, weight, bias = teacher.signal(batch, Request("head"))
    logits = teacher.signal(batch, Request("logits"))
    torch.testing.assert_close(hidden @ weight.t(), logits, rtol=1e-5, atol=1e-5)
    ids, logprobs, tail = teacher.signal(batch, Request("topk", k=5, temperature=2.0))
    exact = torch.log_softmax(logits / 2.0, -1)
    torch.testing.assert_close(logprobs, exact.topk(5, -1).values)
    torch.testing.assert_close(tail.exp() + logprobs.exp().sum(-1), torch.ones(2, 12), rtol=1e-5, atol=1e-5)
    memo = MemoTeacher(teacher.model)
    assert torch.equal(memo.signal(batch, Request("logits")), logits)
    assert memo.signal(batch, Request("logits")) is memo.signal(batch, Request("logits"))  # computed once


@pytest.mark.parametrize("loss, gives, path, request_kind", [
    ({"kd_weight": 0.0, "ce_weight": 1.0}, ("head", "logits", "topk"), "ce", None),
    ({}, (), "ce", None),
    ({}, ("head", "logits", "topk"), "head", "head"),
    ({"fused": False}, ("head", "logits", "topk"), "logits", "logits"),
    ({}, ("logits", "topk"), "logits", "logits"),  # a transformers teacher: no head inputs
    ({"topk": 8}, ("head", "logits", "topk"), "topk", "topk"),
    ({}, ("topk",), "topk", "topk"),  # a cache or an API
])
def test_the_loss_path_is_chosen_once_at_construction(loss, gives, path, request_kind):
    cfg = config_from_dict({"teacher": {"source": "model", "path": "t"}, "loss": loss}).loss
    objective = DistillLoss.from_config(cfg, teacher_gives=gives, teacher_k=16)
    assert objective.path == path
    assert (objective.request.kind if objective.request else None) == request_kind
    if request_kind == "topk":
        assert objective.request.k == (cfg.topk or 16) and objective.external_topk == (gives == ("topk",))
    assert objective.describe()


def test_the_loss_object_equals_the_formula(tiny_tokenizer):
    """One path end to end against the materialised reference: fused head KD + CE."""
    from distil.losses import cross_entropy, kd_loss

    cfg = config_from_dict({"teacher": {"source": "model", "path": "t"},
                            "loss": {"kind": "reverse_kl", "ce_weight": 0.3, "temperature": 2.0}}).loss
    teacher = _teacher(tiny_tokenizer)
    torch.manual_seed(2)
    student = TransformerLM(ModelConfig(vocab_size=len(tiny_tokenizer), d_model=32, n_layers=1, n_heads=2))
    batch = {"input_ids": torch.randint(0, len(tiny_tokenizer), (2, 16))}
    labels = torch.randint(0, len(tiny_tokenizer), (2, 16))
    objective = DistillLoss.from_config(cfg, teacher_gives=teacher.gives)
    hidden = student(batch["input_ids"], return_hidden=True)
    got = objective(hidden, student.lm_head, labels, teacher.signal(batch, objective.request))
    logits = student.lm_head(hidden)
    want = kd_loss(logits, teacher.logits(batch["input_ids"]), "reverse_kl", temperature=2.0) + 0.3 * cross_entropy(
        logits, labels)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_window_batches_resume_where_their_state_says(tiny_tokenizer, run_config):
    data = build_data(config_from_dict(run_config()).data, tiny_tokenizer)
    a = WindowBatches(data, 4, slice(0, 4), seed=3, device=torch.device("cpu"), document_attention=False)
    for _ in range(5):
        a.next_batch()
    state = json.loads(json.dumps(a.state_dict(), default=lambda o: o.tolist() if hasattr(o, "tolist") else o))
    b = WindowBatches(data, 4, slice(0, 4), seed=3, device=torch.device("cpu"), document_attention=False)
    b.load_state_dict(a.state_dict())
    for _ in range(3):
        assert torch.equal(a.next_batch()["input_ids"], b.next_batch()["input_ids"])
    assert state  # the state is plain data a checkpoint can hold
    half = WindowBatches(data, 4, slice(2, 4), seed=3, device=torch.device("cpu"), document_attention=False)
    whole = WindowBatches(data, 4, slice(0, 4), seed=3, device=torch.device("cpu"), document_attention=False)
    assert torch.equal(half.next_batch()["input_ids"], whole.next_batch()["input_ids"][2:])  # rank 1 of 2


def test_setup_resolves_teacher_batches_loss_and_plan(tiny_tokenizer, run_config):
    cfg = config_from_dict(run_config(teacher={"source": "model", "path": "unused"},
                                      loss={"kd_weight": 1.0, "ce_weight": 0.0, "kind": "reverse_kl"}))
    s = setup(cfg, teacher=_teacher(tiny_tokenizer), tokenizer=tiny_tokenizer)
    assert isinstance(s.teacher, ModelTeacher) and isinstance(s.batches, WindowBatches)
    assert s.loss.path == "head" and s.loss.spec.kind == "reverse_kl" and s.plan.kind == "single"
    assert isinstance(s.info, DistInfo) and s.model is s.student and s.step == 0
    assert "input_ids" in s.batches.next_batch()


def test_run_training_makes_a_complete_run_folder(run_config, tmp_path):
    outcome = run_training(config_from_dict(run_config()), tmp_path / "run")
    assert outcome.result is not None and len(outcome.result.history) == 4
    assert (outcome.run_dir / "summary.json").is_file() and outcome.report.is_file()
    assert (outcome.run_dir / "config.yaml").is_file() and (outcome.run_dir / "checkpoints" / "final").is_dir()
    summary = json.loads((outcome.run_dir / "summary.json").read_text())
    assert summary["steps"] == 4 and np.isfinite(summary["final_val"]["loss"])


def test_a_validation_teacher_scores_kl_for_a_run_without_one(run_config, tmp_path, tiny_tokenizer):
    """A CE-only run (or one on a cache) has no logits teacher: ``val_teacher`` still gives KL curves,
    and it is exactly evaluate_lm's KL with that teacher."""
    from distil.eval.perplexity import evaluate_lm

    teacher = _teacher(tiny_tokenizer)
    cfg = config_from_dict(run_config())
    result = run_training(cfg, tmp_path / "run", tokenizer=tiny_tokenizer, val_teacher=teacher).result
    kl_points = [h["val_kl_to_teacher"] for h in result.history if "val_kl_to_teacher" in h]
    assert len(kl_points) == 2 and "kl_to_teacher" in result.val_start
    data = build_data(cfg.data, tiny_tokenizer)
    expected = evaluate_lm(result.student, data.val_windows, batch_size=cfg.train.batch_size,
                           max_batches=cfg.eval.val_batches, teacher=teacher)["kl_to_teacher"]
    assert result.val["kl_to_teacher"] == pytest.approx(expected, rel=1e-6)
    plain = run_training(cfg, tmp_path / "plain", tokenizer=tiny_tokenizer).result
    assert "kl_to_teacher" not in plain.val  # no teacher, no KL
    assert [h["loss"] for h in plain.history] == [h["loss"] for h in result.history]  # validation changes nothing


def test_the_loop_stays_short():
    """train() and train_step() together stay about 100 lines: choices belong in setup()."""
    tree = ast.parse((Path(__file__).resolve().parents[1] / "src/distil/train/loop.py").read_text())
    lengths = {f.name: f.end_lineno - f.lineno + 1 for f in tree.body if isinstance(f, ast.FunctionDef)}
    assert lengths["train"] + lengths["train_step"] <= 100, lengths
    loop_src = ast.get_source_segment((Path(__file__).resolve().parents[1] / "src/distil/train/loop.py").read_text(),
                                      next(f for f in tree.body if isinstance(f, ast.FunctionDef) and f.name == "train"))
    for choice in ("fsdp", "cfg.teacher.source", "teacher_topk", "tp_group"):
        assert choice not in loop_src, f"train() decides {choice!r}; setup() should"
