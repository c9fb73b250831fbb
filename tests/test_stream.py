"""Stream packing: rows walk through documents; carried state makes chunks equal whole documents."""

import numpy as np
import pytest
import torch

from distil.data.packing import StreamBatcher
from distil.hybrid import hybridize
from distil.models import ModelConfig, TransformerLM
from distil.models.state import carry, empty_states

pytestmark = pytest.mark.numerics  # CI runs these again under ATEN_CPU_CAPABILITY=default


def _docs(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(1, 50, size=n).astype(np.int32) for n in lengths]


def test_rows_move_on_the_moment_their_document_ends():
    docs = _docs([9, 3, 9, 5])  # with chunk 4: doc0 -> 2 chunks, doc1 -> 1, doc2 -> 2, doc3 -> 1
    batcher = StreamBatcher(docs, rows=2, chunk_len=4, seed=0)
    order = [int(i) for i in batcher._order]
    seen = []
    for _ in range(3):
        b = batcher.next_batch()
        seen.append((b["reset"].tolist(), b["labels"].tolist()))
    # Step 1: both rows start documents. A row whose document had one chunk starts the next one at
    # step 2 (reset) while the other row is still inside its document (no reset).
    assert seen[0][0] == [True, True]
    first_lengths = [len(docs[order[0]]), len(docs[order[1]])]
    expected_step2 = [n - 1 <= 4 for n in first_lengths]
    assert seen[1][0] == expected_step2
    # A document's tokens appear in order, each label the next token, padding labelled -100.
    b = StreamBatcher(docs, rows=1, chunk_len=4, seed=0)
    doc = docs[int(b._order[0])]
    labels = np.concatenate([b.next_batch()["labels"][0] for _ in range((len(doc) - 1 + 3) // 4)])
    assert labels[: len(doc) - 1].tolist() == doc[1:].tolist()
    assert (labels[len(doc) - 1 :] == -100).all()


def test_every_document_is_streamed_once_per_epoch():
    docs = _docs([5, 7, 2, 9, 4, 6])
    batcher = StreamBatcher(docs, rows=3, chunk_len=3, seed=1)
    count = 0
    while batcher.epoch == 0:
        count += int(batcher.next_batch()["reset"].sum())
    assert count >= len(docs)


def test_state_dict_round_trip():
    docs = _docs([5, 7, 2, 9, 4, 6])
    a = StreamBatcher(docs, rows=2, chunk_len=3, seed=1)
    for _ in range(4):
        a.next_batch()
    b = StreamBatcher(docs, rows=2, chunk_len=3, seed=1)
    b.load_state_dict(a.state_dict())
    for _ in range(5):
        x, y = a.next_batch(), b.next_batch()
        assert all(np.array_equal(x[k], y[k]) for k in x)


def test_streamed_documents_equal_whole_documents():
    torch.manual_seed(0)
    base = TransformerLM(ModelConfig(vocab_size=50, d_model=32, n_layers=3, n_heads=2)).eval()
    model = hybridize(hybridize(base, [1], chunk_size=4, init="mil_plain"), [2], mixer="discrete_mamba2", chunk_size=4, init="mil_plain").eval()
    assert model.config.pattern == "AMD"
    docs = _docs([11, 6, 14, 3, 9], seed=3)
    batcher = StreamBatcher(docs, rows=2, chunk_len=4, seed=2)
    states = empty_states(model, 2)
    collected = {}
    with torch.no_grad():
        for _ in range(10):
            current = list(batcher.row_doc)
            offsets = list(batcher.row_offset)
            b = batcher.next_batch()
            reset = torch.from_numpy(b["reset"])
            states = carry(states, reset=reset, kv_window=None)
            logits, states = model(torch.from_numpy(b["input_ids"]), positions=torch.from_numpy(b["positions"]),
                                   states=states, return_states=True)
            for row in range(2):
                n = int((b["labels"][row] != -100).sum())
                collected.setdefault(current[row], {}).update(
                    {offsets[row] + t: logits[row, t] for t in range(n)})
        checked = 0
        for doc_index, per_position in collected.items():
            doc = torch.from_numpy(docs[doc_index].astype(np.int64))[None]
            whole = model(doc)[0]
            for position, value in per_position.items():
                torch.testing.assert_close(value, whole[position], atol=1e-5, rtol=1e-5)
                checked += 1
    assert checked > 30 and len(collected) >= 4


def test_stream_training_resumes_exactly(tmp_path, tiny_tokenizer, tiny_corpus_file):
    from distil.config import config_from_dict
    from distil.run_dir import RunDir
    from distil.teachers import ModelTeacher
    from distil.train.loop import train

    torch.manual_seed(0)
    teacher = ModelTeacher(TransformerLM(ModelConfig(vocab_size=len(tiny_tokenizer), d_model=32, n_layers=2, n_heads=2)))

    def cfg(steps):
        return config_from_dict({
            "teacher": {"source": "model", "path": "unused"},
            "student": {"d_model": 32, "n_layers": 2, "n_heads": 2},
            "data": {"source": "jsonl", "path": str(tiny_corpus_file), "seq_len": 16, "val_fraction": 0.2,
                     "packing": "stream"},
            "loss": {"kind": "reverse_kl", "kd_weight": 1.0, "ce_weight": 0.5},
            "train": {"steps": steps, "batch_size": 3, "schedule": "constant", "warmup_steps": 0, "progress": False,
                      "val_every": 0, "checkpoint_every": 3},
        })

    def make_student():
        torch.manual_seed(5)
        base = TransformerLM(ModelConfig(vocab_size=len(tiny_tokenizer), d_model=32, n_layers=2, n_heads=2))
        return hybridize(base, [1], d_state=8, chunk_size=8, init="mil_plain")

    whole = train(cfg(8), run=RunDir.create(tmp_path / "a"), tokenizer=tiny_tokenizer, teacher=teacher,
                  student=make_student())
    run = RunDir.create(tmp_path / "b")
    train(cfg(3), run=run, tokenizer=tiny_tokenizer, teacher=teacher, student=make_student())
    resumed = train(cfg(8), run=RunDir.create(tmp_path / "b", resume=True), tokenizer=tiny_tokenizer, teacher=teacher,
                    student=make_student())
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in whole.history]


def test_document_attention_batches_restart_positions_and_match_separate_documents():
    from distil.data.packing import batch_tensors, concat_windows

    docs = _docs([5, 7, 9], seed=4)
    windows, doc_ids = concat_windows(docs, 16)
    batch = batch_tensors(windows, doc_ids, np.array([0]), "cpu", document_attention=True)
    assert batch["positions"][0].tolist() == list(range(5)) + list(range(7)) + list(range(4))
    torch.manual_seed(0)
    model = TransformerLM(ModelConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=2)).eval()
    with torch.no_grad():
        packed = model(batch["input_ids"], doc_ids=batch["attn_doc_ids"], positions=batch["positions"])
        alone = model(torch.from_numpy(docs[1].astype(np.int64))[None])
    torch.testing.assert_close(packed[0, 5:12], alone[0], atol=1e-5, rtol=1e-5)
