"""The training loop: golden smoke run, accumulation, the run folder, bad input."""

import json

import numpy as np
import pytest
import torch

from conftest import with_sections
from distil.config import config_from_dict
from distil.data.dataset import build_data
from distil.errors import DistilError
from distil.losses.objective import DistillLoss
from distil.models import ModelConfig, TransformerLM
from distil.models.io import save_native
from distil.run_dir import RunDir, read_metrics
from distil.teachers import ModelTeacher, load_teacher
from distil.train.loop import compute_loss, train

pytestmark = pytest.mark.numerics  # CI runs these again under ATEN_CPU_CAPABILITY=default


def tiny_cfg(tmp_path, **sections):
    base = {
        "teacher": {"source": "none"},
        "student": {"d_model": 32, "n_layers": 2, "n_heads": 2},
        "data": {"source": "jsonl", "path": str(tmp_path / "corpus.jsonl"), "seq_len": 32, "val_fraction": 0.2},
        "loss": {"kd_weight": 0.0, "ce_weight": 1.0},
        "train": {"steps": 6, "batch_size": 4, "lr": 3e-3, "warmup_steps": 2, "progress": False, "val_every": 3,
                  "log_every": 1, "device": "cpu"},
        "eval": {"val_batches": 2},
    }
    return config_from_dict(with_sections(base, **sections))


def make_teacher(tokenizer, path=None) -> ModelTeacher:
    torch.manual_seed(123)
    model = TransformerLM(ModelConfig(vocab_size=len(tokenizer), d_model=48, n_layers=2, n_heads=2))
    if path is not None:
        save_native(model, path)
        tokenizer.save_pretrained(str(path))
    return ModelTeacher(model)


# Per-step training losses of the fixed-seed smoke run below (fp32, CPU). A change that alters
# the maths of the model, loss, data order or optimiser shows here.
GOLDEN_CE = [5.711046, 5.635567, 5.539236, 5.428944, 5.310493, 5.259616]
GOLDEN_FKL = [0.016092, 0.014591, 0.011757, 0.00958, 0.008801, 0.00779]


def _golden_run(tmp_path, tiny_tokenizer, **sections):
    cfg = tiny_cfg(tmp_path, **sections)
    data = build_data(cfg.data, tiny_tokenizer)
    teacher = make_teacher(tiny_tokenizer) if cfg.loss.kd_weight else None
    return train(cfg, tokenizer=tiny_tokenizer, data=data, teacher=teacher)


def test_golden_smoke_run(tmp_path, tiny_tokenizer, tiny_corpus_file):
    ce = _golden_run(tmp_path, tiny_tokenizer)
    np.testing.assert_allclose([h["loss"] for h in ce.history], GOLDEN_CE, rtol=2e-4)
    fkl = _golden_run(tmp_path, tiny_tokenizer, teacher={"source": "model", "path": "unused"},
                      loss={"kd_weight": 1.0, "ce_weight": 0.0, "kind": "forward_kl"})
    np.testing.assert_allclose([h["loss"] for h in fkl.history], GOLDEN_FKL, rtol=2e-4)


def test_same_seed_same_losses_bit_for_bit(tmp_path, tiny_tokenizer, tiny_corpus_file):
    a = _golden_run(tmp_path, tiny_tokenizer)
    b = _golden_run(tmp_path, tiny_tokenizer)
    assert [h["loss"] for h in a.history] == [h["loss"] for h in b.history]


def test_fused_and_materialised_training_agree(tmp_path, tiny_tokenizer, tiny_corpus_file):
    kd = {"kd_weight": 1.0, "ce_weight": 0.3, "kind": "reverse_kl", "temperature": 2.0}
    fused = _golden_run(tmp_path, tiny_tokenizer, teacher={"source": "model", "path": "unused"}, loss={**kd, "fused": True})
    eager = _golden_run(tmp_path, tiny_tokenizer, teacher={"source": "model", "path": "unused"}, loss={**kd, "fused": False})
    np.testing.assert_allclose([h["loss"] for h in fused.history], [h["loss"] for h in eager.history], rtol=1e-4)


def test_gradient_accumulation_equals_larger_batch(tmp_path, tiny_tokenizer, tiny_corpus_file):
    cfg = tiny_cfg(tmp_path, teacher={"source": "model", "path": "unused"},
                   loss={"kd_weight": 1.0, "ce_weight": 0.5, "kind": "forward_kl"})
    data = build_data(cfg.data, tiny_tokenizer)
    teacher = make_teacher(tiny_tokenizer)
    torch.manual_seed(0)
    model = TransformerLM(ModelConfig(vocab_size=len(tiny_tokenizer), d_model=32, n_layers=2, n_heads=2))
    ids = torch.from_numpy(data.train_windows[:8].astype(np.int64))
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}
    model.zero_grad()
    loss = DistillLoss.from_config(cfg.loss, teacher_gives=teacher.gives)
    compute_loss(model, teacher, batch, loss).backward()
    whole = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    for half in (slice(0, 4), slice(4, 8)):
        (compute_loss(model, teacher, {k: v[half] for k, v in batch.items()}, loss) / 2).backward()
    for a, b in zip(whole, [p.grad for p in model.parameters()]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_run_folder_is_never_overwritten_unless_asked(tmp_path):
    run = RunDir.create(tmp_path / "r")
    run.log(step=1, tokens=10, split="train", name="loss", value=1.0)
    run.close()
    with pytest.raises(DistilError, match="already exists"):
        RunDir.create(tmp_path / "r")
    assert read_metrics(tmp_path / "r" / "metrics.jsonl")[0]["value"] == 1.0
    RunDir.create(tmp_path / "r", overwrite=True)
    assert not (tmp_path / "r" / "metrics.jsonl").exists()


def test_metrics_records_have_the_documented_fields(tmp_path):
    run = RunDir.create(tmp_path / "r")
    run.log(step=3, tokens=96, split="val", name="loss", value=2.5)
    run.close()
    record = read_metrics(run.metrics_path)[0]
    assert set(record) == {"step", "tokens", "split", "name", "value", "time"}
    with open(run.metrics_path, "a") as f:
        f.write('{"step": 4, "tok')  # a writer killed mid-line
    assert len(read_metrics(run.metrics_path)) == 1


def test_incomplete_run_does_not_look_complete(tmp_path):
    run = RunDir.create(tmp_path / "r")
    assert not run.complete
    run.mark_complete({"x": 1})
    assert run.complete and json.loads(run.summary_path.read_text())["complete"] is True


def test_vocabulary_mismatch_names_both_sizes(tmp_path, tiny_tokenizer, tiny_corpus_file):
    cfg = tiny_cfg(tmp_path, teacher={"source": "model", "path": "unused"}, loss={"kd_weight": 1.0, "ce_weight": 0.0})
    data = build_data(cfg.data, tiny_tokenizer)
    torch.manual_seed(0)
    teacher = ModelTeacher(TransformerLM(ModelConfig(vocab_size=5000, d_model=16, n_layers=1, n_heads=2)))
    student = TransformerLM(ModelConfig(vocab_size=len(tiny_tokenizer), d_model=16, n_layers=1, n_heads=2))
    with pytest.raises(DistilError, match=f"5000.*{len(tiny_tokenizer)}|{len(tiny_tokenizer)}.*5000"):
        train(cfg, tokenizer=tiny_tokenizer, data=data, teacher=teacher, student=student)


def test_padded_teacher_vocabulary_is_accepted(tmp_path, tiny_tokenizer, tiny_corpus_file):
    cfg = tiny_cfg(tmp_path, teacher={"source": "model", "path": "unused"}, loss={"kd_weight": 1.0, "ce_weight": 0.0},
                   train={"steps": 2, "val_every": 0})
    data = build_data(cfg.data, tiny_tokenizer)
    torch.manual_seed(0)
    padded = TransformerLM(ModelConfig(vocab_size=len(tiny_tokenizer) + 64, d_model=16, n_layers=1, n_heads=2))
    student = TransformerLM(ModelConfig(vocab_size=len(tiny_tokenizer), d_model=16, n_layers=1, n_heads=2))
    result = train(cfg, tokenizer=tiny_tokenizer, data=data, teacher=ModelTeacher(padded), student=student)
    assert np.isfinite(result.history[-1]["loss"])


def test_empty_corpus_is_a_user_error(tmp_path, tiny_tokenizer):
    (tmp_path / "corpus.jsonl").write_text("")
    cfg = tiny_cfg(tmp_path)
    with pytest.raises(DistilError, match="empty"):
        train(cfg, tokenizer=tiny_tokenizer)


def test_teacher_from_transformers_directory(tmp_path, tiny_tokenizer, tiny_corpus_file):
    """A teacher saved by transformers (Llama) loads natively; an unsupported one runs through transformers."""
    import transformers

    torch.manual_seed(0)
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2))
    llama.save_pretrained(tmp_path / "llama")
    teacher = load_teacher(tmp_path / "llama")
    assert teacher.native
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=len(tiny_tokenizer), n_embd=32, n_layer=1, n_head=2))
    gpt2.save_pretrained(tmp_path / "gpt2")
    other = load_teacher(tmp_path / "gpt2")
    assert not other.native
    ids = torch.randint(0, len(tiny_tokenizer), (1, 8))
    torch.testing.assert_close(other.logits(ids), gpt2.eval()(ids).logits)
    cfg = tiny_cfg(tmp_path, teacher={"source": "model", "path": str(tmp_path / "gpt2")},
                   loss={"kd_weight": 1.0, "ce_weight": 0.0}, train={"steps": 2, "val_every": 0})
    result = train(cfg, tokenizer=tiny_tokenizer, teacher=other)
    assert np.isfinite(result.history[-1]["loss"]) and "kl_to_teacher" in result.val


def test_multiple_choice_is_scored_at_the_end_of_training(tmp_path, tiny_tokenizer, tiny_corpus_file):
    mc = tmp_path / "mc.jsonl"
    mc.write_text("".join(json.dumps({"context": "The model", "choices": [" learns", " x", " y", " z"], "label": 0}) + "\n"
                          for _ in range(3)))
    cfg = tiny_cfg(tmp_path, train={"steps": 2, "val_every": 0}, eval={"multiple_choice": str(mc)})
    run = RunDir.create(tmp_path / "run")
    result = train(cfg, run=run, tokenizer=tiny_tokenizer)
    assert {"mc_acc", "mc_acc_norm"} <= set(result.val)
    assert {r["name"] for r in read_metrics(run.metrics_path) if r["split"] == "val"} >= {"mc_acc", "mc_acc_norm"}


def test_parquet_and_hf_dataset_sources(tmp_path, tiny_docs):
    from types import SimpleNamespace

    from distil.data.corpus import load_documents

    pa = pytest.importorskip("pyarrow")
    datasets = pytest.importorskip("datasets")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": tiny_docs[:10]}), tmp_path / "docs.parquet")
    cfg = SimpleNamespace(source="parquet", path=str(tmp_path / "docs.parquet"), text_field="body", max_docs=None, split="train")
    assert load_documents(cfg) == [d.strip() for d in tiny_docs[:10]]
    datasets.Dataset.from_dict({"text": tiny_docs[:7]}).save_to_disk(str(tmp_path / "ds"))
    cfg = SimpleNamespace(source="hf", path=str(tmp_path / "ds"), text_field="text", max_docs=5, split="train")
    assert load_documents(cfg) == [d.strip() for d in tiny_docs[:5]]
    cfg.text_field = "missing"
    with pytest.raises(DistilError, match="no field 'missing'"):
        load_documents(cfg)


def test_token_cache_is_memory_mapped_and_equal_to_fresh_tokenisation(tmp_path, tiny_tokenizer, tiny_corpus_file):
    fresh_cfg = tiny_cfg(tmp_path, data={"token_cache": None})
    cached_cfg = tiny_cfg(tmp_path, data={"token_cache": str(tmp_path / "cache")})
    fresh = build_data(fresh_cfg.data, tiny_tokenizer)
    first = build_data(cached_cfg.data, tiny_tokenizer)  # writes the cache
    again = build_data(cached_cfg.data, tiny_tokenizer)  # reads it back, memory-mapped
    assert len(list((tmp_path / "cache").iterdir())) == 1
    for a, b, c in ((fresh.train_windows, first.train_windows, again.train_windows),
                    (fresh.val_windows, first.val_windows, again.val_windows),
                    (fresh.train_doc_ids, first.train_doc_ids, again.train_doc_ids)):
        assert np.array_equal(a, b) and np.array_equal(a, c)
    assert isinstance(again.train_token_docs[0], np.memmap)  # views of the token file on disk
    assert again.val_docs == fresh.val_docs
    assert all(np.array_equal(x, y) for x, y in zip(fresh.train_token_docs, again.train_token_docs))
    # A changed corpus file is a different cache entry.
    tiny_corpus_file.write_text(tiny_corpus_file.read_text() + json.dumps({"text": "one more document here"}) + "\n")
    build_data(cached_cfg.data, tiny_tokenizer)
    assert len(list((tmp_path / "cache").iterdir())) == 2


def test_tensorboard_receives_the_same_metrics(tmp_path, tiny_tokenizer, tiny_corpus_file):
    pytest.importorskip("tensorboard", reason="TensorBoard is the optional extra distil[tb]")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = tiny_cfg(tmp_path, train={"steps": 3, "val_every": 0})
    run = RunDir.create(tmp_path / "run")
    run.add_sinks(tensorboard=True)
    train(cfg, run=run, tokenizer=tiny_tokenizer)
    run.mark_complete({})
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    logged = [e.value for e in events.Scalars("train/loss")]
    expected = [r["value"] for r in read_metrics(run.metrics_path) if r["split"] == "train" and r["name"] == "loss"]
    assert logged == pytest.approx(expected) and len(logged) == 3


def test_bf16_autocast_trains_on_cpu(tmp_path, tiny_tokenizer, tiny_corpus_file):
    cfg = tiny_cfg(tmp_path, teacher={"source": "model", "path": "unused"}, loss={"kd_weight": 1.0, "ce_weight": 0.5},
                   train={"steps": 8, "dtype": "bfloat16", "val_every": 0, "lr": 5e-3})
    result = train(cfg, tokenizer=tiny_tokenizer, teacher=make_teacher(tiny_tokenizer))
    losses = [h["loss"] for h in result.history]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]


def test_wandb_offline_receives_metrics(tmp_path, tiny_tokenizer, tiny_corpus_file, monkeypatch):
    pytest.importorskip("wandb", reason="Weights & Biases is optional (pip install wandb)")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = tiny_cfg(tmp_path, train={"steps": 2, "val_every": 0})
    run = RunDir.create(tmp_path / "run")
    run.add_sinks(wandb_project="distil-test")
    train(cfg, run=run, tokenizer=tiny_tokenizer)
    run.mark_complete({})
    offline_runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert offline_runs and any(p.suffix == ".wandb" for p in offline_runs[0].iterdir())
