"""Teacher top-k caches: encoding bounds, writer -> reader, resume, training equality, bad input."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from conftest import with_sections
from distil.config import config_from_dict
from distil.data.teacher_cache import TeacherCache
from distil.data.topk_codec import (
    STEP,
    decode_block,
    dequantize,
    encode_block,
    frequency_order,
    quantize,
    ranks_of,
)
from distil.errors import DistilError
from distil.losses.topk import teacher_topk
from distil.models import ModelConfig, TransformerLM
from distil.models.io import save_native
from distil.train.cache_teacher import cache_stats, write_cache
from distil.train.loop import train

ENV = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


# -- the encoding ------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(hnp.arrays(np.float32, hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=12),
                  elements=st.floats(-40.0, 0.0, width=32)),
       st.integers(16, 200_000), st.sampled_from(["ranked", "compact", "exact"]), st.integers(0, 2**31))
def test_encoding_round_trip_and_error_bound(values, vocab_size, encoding, seed):
    rng = np.random.default_rng(seed)
    n, k = values.shape
    ids = np.stack([rng.choice(vocab_size, size=k, replace=False) for _ in range(n)])
    ids[rng.random((n, k)) < 0.1] = -1  # absent entries
    tokens = rng.integers(0, vocab_size, size=n + 1)
    tail = np.minimum(rng.normal(-3, 2, size=n), 0).astype(np.float32)
    order = rng.permutation(vocab_size).astype(np.uint32) if encoding == "ranked" else None
    rank = ranks_of(order) if order is not None else None
    data = encode_block(tokens, ids, values, tail, vocab_size=vocab_size, encoding=encoding, id_rank=rank)
    out_tokens, out_ids, out_lp, out_tail = decode_block(data, vocab_size=vocab_size, encoding=encoding, id_order=order)
    np.testing.assert_array_equal(out_tokens, tokens)
    if encoding == "ranked":  # the same values as compact: only the ids' layout differs
        same = decode_block(encode_block(tokens, ids, values, tail, vocab_size=vocab_size), vocab_size=vocab_size)
        for got, want in zip((out_ids, out_lp, out_tail), same[1:]):
            np.testing.assert_array_equal(got, want)
    for row in range(n):  # entries come back sorted by log-prob, absent ones last
        present = ids[row] >= 0
        got = dict(zip(out_ids[row].tolist(), out_lp[row].tolist()))
        assert (out_ids[row] >= 0).sum() == present.sum() and all(i == -1 for i in out_ids[row][present.sum():])
        assert np.all(np.diff(out_lp[row][: present.sum()]) <= 1e-6)
        for i, v in zip(ids[row][present], values[row][present]):
            err = abs(got[int(i)] - float(v))
            if encoding == "exact":
                assert err == 0.0
            elif v >= np.log(1e-4):
                assert err <= 0.01
            else:
                assert err <= 0.13  # the coarse region below -10 nats
    if encoding == "exact":
        np.testing.assert_array_equal(out_tail, tail)
    else:
        big = tail >= np.log(1e-4)
        assert np.all(np.abs(out_tail - tail)[big] <= 0.01)


def test_frequency_order_ranks_ids_by_count_then_tokens_then_id():
    ids = np.array([[5, 2, -1], [5, 7, 2], [5, 1, -1]])
    order = frequency_order(ids, vocab_size=9, tokens=np.array([8, 8, 3]))
    assert order.tolist() == [5, 2, 1, 7, 8, 3, 0, 4, 6]
    rank = ranks_of(order)
    assert rank[order].tolist() == list(range(9))
    with pytest.raises(DistilError, match="permutation"):
        ranks_of(np.array([0, 0, 1]))


def test_ranked_varint_covers_the_largest_rank_and_absent_marker():
    """Ranks above 2^15 need the high stream's second byte; vocab 2^17 + the absent marker too."""
    for vocab in (40_000, 1 << 17, 300_000):
        order = np.arange(vocab, dtype=np.uint32)[::-1].copy()  # id v has rank vocab - 1 - v
        ids = np.array([[0, 1, vocab - 1, -1], [127, 128, 129, 16383]])
        lp = np.tile(np.array([-0.1, -1.0, -2.0, -3.0], dtype=np.float32), (2, 1))
        tokens = np.array([0, vocab - 1, 5])
        data = encode_block(tokens, ids, lp, np.full(2, -2.0, np.float32), vocab_size=vocab, encoding="ranked",
                            id_rank=ranks_of(order))
        _, got, _, _ = decode_block(data, vocab_size=vocab, encoding="ranked", id_order=order)
        np.testing.assert_array_equal(got, ids)
        with pytest.raises(DistilError, match="id table"):
            decode_block(data, vocab_size=vocab, encoding="ranked")


def test_quantizer_bound_is_tight_and_monotone():
    v = np.linspace(-10.0, 0.0, 200_001)
    err = np.abs(dequantize(quantize(v)) - v)
    assert err.max() <= STEP / 2 + 1e-6 < 0.01
    assert err.max() > STEP / 2 - 1e-4  # the bound is what the step gives, not looser
    assert np.all(np.diff(quantize(v[::-1]).astype(int)) >= 0)


def test_compact_encoding_is_at_most_2_bytes_per_entry_on_a_trained_lm(tiny_tokenizer, tiny_docs):
    """A teacher that has learnt the corpus (sharp, Zipf-like top-k, as real LMs are): <= 2 B/entry."""
    from distil.data.packing import concat_windows
    from distil.data.tokenize import tokenize_documents

    windows, _ = concat_windows(tokenize_documents(tiny_tokenizer, tiny_docs), 64)
    x = torch.from_numpy(windows[:, :-1].astype(np.int64))
    torch.manual_seed(0)
    model = TransformerLM(ModelConfig(vocab_size=len(tiny_tokenizer), d_model=64, n_layers=2, n_heads=2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(60):
        batch = torch.from_numpy(windows[(np.arange(8) + 8 * step) % len(windows)].astype(np.int64))
        loss = torch.nn.functional.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        ids, lp, tail = teacher_topk(model(x[:16]), 64)
    size = sum(len(encode_block(windows[i].astype(np.int64), ids[i].numpy(), lp[i].numpy(), tail[i].numpy(),
                                vocab_size=len(tiny_tokenizer))) for i in range(16))
    per_entry = size / (16 * 64 * 64)
    assert per_entry <= 2.0, per_entry
    naive = 12  # an int64 id and an fp32 value per entry
    assert per_entry < naive / 6
    rank = ranks_of(frequency_order(ids[:4].numpy(), vocab_size=len(tiny_tokenizer)))
    ranked = sum(len(encode_block(windows[i].astype(np.int64), ids[i].numpy(), lp[i].numpy(), tail[i].numpy(),
                                  vocab_size=len(tiny_tokenizer), encoding="ranked", id_rank=rank)) for i in range(16))
    assert ranked < size  # a table from the first 4 sequences already pays


# -- writer -> reader --------------------------------------------------------------------------


def cfg_dict(root, corpus, **sections):
    base = {
        "teacher": {"source": "model", "path": str(root / "teacher")},
        "student": {"d_model": 32, "n_layers": 2, "n_heads": 2},
        "data": {"source": "jsonl", "path": str(corpus), "seq_len": 32, "val_fraction": 0.2, "token_cache": None},
        "loss": {"kind": "forward_kl", "kd_weight": 1.0, "ce_weight": 0.0},
        "train": {"steps": 6, "batch_size": 4, "lr": 3e-3, "warmup_steps": 2, "progress": False, "val_every": 3,
                  "log_every": 1, "device": "cpu"},
        "eval": {"val_batches": 2},
    }
    return with_sections(base, **sections)


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_tokenizer, tiny_docs):
    root = tmp_path_factory.mktemp("cache")
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in tiny_docs))
    torch.manual_seed(123)
    teacher = TransformerLM(ModelConfig(vocab_size=len(tiny_tokenizer), d_model=48, n_layers=2, n_heads=2))
    save_native(teacher, root / "teacher")
    tiny_tokenizer.save_pretrained(str(root / "teacher"))
    cfg = lambda **s: config_from_dict(cfg_dict(root, corpus, **s))
    caches = {enc: root / f"cache-{enc}" for enc in ("exact", "compact", "ranked")}
    for enc, path in caches.items():
        write_cache(cfg(), path, k=16, encoding=enc, shard_tokens=32 * 40, progress=False, batch_size=5, workers=2)
    return {"root": root, "corpus": corpus, "cfg": cfg, "caches": caches, "teacher": teacher}


def test_writer_reader_round_trip(world, tiny_tokenizer):
    from distil.data.dataset import build_data

    cfg = world["cfg"]()
    data = build_data(cfg.data, tiny_tokenizer)
    cache = TeacherCache(world["caches"]["exact"])
    m = cache.manifest
    assert m.num_sequences == len(data.train_windows) and m.num_tokens == m.num_sequences * 32
    assert len(m.shards) == -(-m.num_sequences // 40) > 1
    assert m.settings.k == 16 and m.settings.vocab_size == len(tiny_tokenizer) and m.settings.temperature == 1.0
    assert all(len(s["sha256"]) == 64 and s["bytes"] > 0 for s in m.shards)
    assert m.dtype.startswith("float32") and TeacherCache(world["caches"]["compact"]).manifest.dtype.startswith("uint16")
    cache.verify()
    compact = TeacherCache(world["caches"]["compact"])
    assert compact.manifest.bytes < 0.6 * m.bytes
    for sequence in (0, 41, m.num_sequences - 1):  # first, second shard, last
        window = torch.from_numpy(data.train_windows[sequence].astype(np.int64))
        ids, lp, tail = teacher_topk(world["teacher"](window[None, :-1])[0], 16)
        tokens, c_ids, c_lp, c_tail = cache.get(sequence)
        np.testing.assert_array_equal(tokens, window.numpy())
        np.testing.assert_array_equal(c_ids, ids.numpy())
        np.testing.assert_array_equal(c_lp, lp.numpy())
        np.testing.assert_array_equal(c_tail, tail.numpy())
        _, q_ids, q_lp, _ = compact.get(sequence)
        same = (q_ids == ids.numpy()).all(-1)  # near-ties may swap order after quantisation
        assert same.mean() > 0.9
        assert np.abs(q_lp - lp.numpy())[same].max() <= 0.01
        for got, want in zip(TeacherCache(world["caches"]["ranked"]).get(sequence), compact.get(sequence)):
            np.testing.assert_array_equal(got, want)  # ranked = compact, decoded


@pytest.mark.slow
def test_stats_report_size_error_and_reconstruction_kl(world):
    stats = cache_stats(world["caches"]["compact"], sample=4)
    assert stats["max_abs_logprob_error"] <= 0.01
    assert 0 <= stats["reconstruction_kl"] < 0.05
    assert stats["bytes_per_token"] == pytest.approx(stats["bytes"] / stats["tokens"])
    exact = cache_stats(world["caches"]["exact"], sample=4)
    assert exact["max_abs_logprob_error"] < 1e-5
    assert exact["reconstruction_kl"] <= stats["reconstruction_kl"] + 1e-3
    out = subprocess.run([sys.executable, "-m", "distil", "cache-teacher", "--stats", str(world["caches"]["compact"]),
                          "--json", "--sample", "2"], capture_output=True, text=True, env=ENV, timeout=120)
    assert out.returncode == 0, out.stderr
    printed = json.loads(out.stdout)
    assert {"bytes_per_token", "max_abs_logprob_error", "reconstruction_kl"} <= set(printed)
    assert printed["bytes_per_token"] == pytest.approx(stats["bytes_per_token"])


def test_ranked_cache_keeps_its_id_table_and_refuses_a_damaged_one(world, tmp_path):
    import shutil

    ranked = TeacherCache(world["caches"]["ranked"])
    m = ranked.manifest
    assert m.settings.encoding == "ranked" and m.version == 2 and m.id_order["file"] == "id_order.npy"
    assert "varint ranks" in m.dtype
    copy = tmp_path / "ranked"
    shutil.copytree(world["caches"]["ranked"], copy)
    order = np.load(copy / "id_order.npy")
    np.save(copy / "id_order.npy", order[::-1].copy())
    with pytest.raises(DistilError, match="id table .* SHA-256"):
        TeacherCache(copy)
    (copy / "id_order.npy").unlink()
    with pytest.raises(DistilError, match="id table .* is missing"):
        TeacherCache(copy)


def test_a_version_1_cache_still_reads(world, tmp_path):
    import shutil

    copy = tmp_path / "v1"
    shutil.copytree(world["caches"]["compact"], copy)
    raw = json.loads((copy / "manifest.json").read_text())
    raw["version"] = 1
    del raw["id_order"]
    (copy / "manifest.json").write_text(json.dumps(raw))
    for got, want in zip(TeacherCache(copy).get(3), TeacherCache(world["caches"]["compact"]).get(3)):
        np.testing.assert_array_equal(got, want)


def test_resume_after_an_interrupted_write_gives_the_same_cache(world, monkeypatch, tmp_path):
    from distil.data import teacher_cache

    cfg = world["cfg"]()
    reference = world["caches"]["ranked"]
    target = tmp_path / "cache"
    calls = {"n": 0}
    real_add = teacher_cache._ShardFile.add

    def dying_add(self, block, positions):
        calls["n"] += 1
        if calls["n"] == 100:  # in the middle of the third shard (40 sequences each)
            raise KeyboardInterrupt
        real_add(self, block, positions)

    monkeypatch.setattr(teacher_cache._ShardFile, "add", dying_add)
    with pytest.raises(KeyboardInterrupt):
        write_cache(cfg, target, k=16, shard_tokens=32 * 40, progress=False, batch_size=5)
    monkeypatch.setattr(teacher_cache._ShardFile, "add", real_add)
    assert not (target / "manifest.json").exists() and (target / "id_order.npy").is_file()
    assert sorted(p.name for p in target.glob("shard-*.bin")) == ["shard-00000.bin", "shard-00001.bin"]
    (target / ".shard-00002.bin.tmp").write_bytes(b"half a shard")  # as a SIGKILL would leave it
    with pytest.raises(DistilError, match="other settings"):
        write_cache(cfg, target, k=8, shard_tokens=32 * 40, progress=False)
    # batch_size 3: a resumed writer must take the kept table, not make one from other first batches
    write_cache(cfg, target, k=16, shard_tokens=32 * 40, progress=False, batch_size=3)
    assert not (target / ".shard-00002.bin.tmp").exists() and not (target / "progress.json").exists()
    a, b = TeacherCache(reference).manifest, TeacherCache(target).manifest
    assert [s["sha256"] for s in a.shards] == [s["sha256"] for s in b.shards]  # byte-identical shards
    with pytest.raises(DistilError, match="already holds a complete cache"):
        write_cache(cfg, target, k=16, progress=False)


# -- training from a cache -----------------------------------------------------------------------


def _losses(result):
    return [h["loss"] for h in result.history]


def test_training_on_a_cache_equals_the_online_teacher_at_the_same_k(world):
    cfg = world["cfg"]
    online = train(cfg(loss={"topk": 16}))
    exact = train(cfg(teacher={"source": "cache", "cache": str(world["caches"]["exact"])}))
    assert _losses(exact) == _losses(online)  # bit for bit, step for step
    for name, p in online.student.state_dict().items():
        torch.testing.assert_close(exact.student.state_dict()[name], p, rtol=0, atol=0)
    compact = train(cfg(teacher={"source": "cache", "cache": str(world["caches"]["compact"])}))
    # Each stored log-prob is within 0.01 nats, so each token's KL moves by at most ~0.01.
    np.testing.assert_allclose(_losses(compact), _losses(online), atol=0.012)
    unfused = train(cfg(teacher={"source": "cache", "cache": str(world["caches"]["exact"])}, loss={"fused": False}))
    # Fused and unfused take the head's product in different orders (fused.head_logits): fp32 rounding
    # only, compounded over the steps.
    np.testing.assert_allclose(_losses(unfused), _losses(online), rtol=1e-4)
    for kind in ("reverse_kl", "soft_ce"):
        ref = train(cfg(loss={"topk": 16, "kind": kind, "ce_weight": 0.5}))
        got = train(cfg(teacher={"source": "cache", "cache": str(world["caches"]["exact"])},
                        loss={"kind": kind, "ce_weight": 0.5}))
        assert _losses(got) == _losses(ref), kind


def test_dataloader_workers_and_ranks_read_the_same_batches(world, tiny_tokenizer):
    from distil.data.dataset import build_data

    cfg = world["cfg"]
    cache_dir = str(world["caches"]["exact"])
    one = train(cfg(teacher={"source": "cache", "cache": cache_dir}))
    two = train(cfg(teacher={"source": "cache", "cache": cache_dir}, data={"num_workers": 2}))
    assert _losses(two) == _losses(one)
    # Two ranks: each rank's slice of the global batch, together the single-process batch.
    data = build_data(cfg().data, tiny_tokenizer)
    cache = TeacherCache(cache_dir)
    kw = dict(batch_size=4, seed=0, sampler_state=None, seq_len=32, windows=data.train_windows,
              doc_ids=data.train_doc_ids)
    from distil.train.batches import CacheDataset

    whole = iter(CacheDataset(cache, **kw))
    ranks = [iter(CacheDataset(cache, rank=r, world_size=2, **kw)) for r in range(2)]
    for _ in range(5):
        full, parts = next(whole), [next(r) for r in ranks]
        torch.testing.assert_close(torch.cat([p["input_ids"] for p in parts]), full["input_ids"])
        for j in range(3):
            torch.testing.assert_close(torch.cat([p["teacher_topk"][j] for p in parts]), full["teacher_topk"][j])
        assert parts[0]["sampler_state"] == full["sampler_state"]


@pytest.mark.slow
def test_two_processes_train_on_a_cache_like_one(world, tmp_path):
    cfg = cfg_dict(world["root"], world["corpus"], teacher={"source": "cache", "cache": str(world["caches"]["exact"])},
                   data={"num_workers": 1}, train={"checkpoint_every": 3})
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    runs = {}
    for name, launcher in (("one", [sys.executable, "-m", "distil"]),
                           ("two", [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                                    "-m", "distil"])):
        out = subprocess.run([*launcher, "train", str(path), "--run-dir", str(tmp_path / name)], capture_output=True,
                             text=True, env=ENV, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        runs[name] = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    losses = {n: [r["value"] for r in recs if r["split"] == "train" and r["name"] == "loss"] for n, recs in runs.items()}
    assert len(losses["one"]) == 6
    np.testing.assert_allclose(losses["two"], losses["one"], rtol=1e-4, atol=1e-7)


# -- bad input ---------------------------------------------------------------------------------


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_damaged_caches_are_clear_errors(world, tmp_path):
    cfg = world["cfg"]
    src = world["caches"]["compact"]

    truncated = _copy(src, tmp_path / "truncated")
    shard = truncated / "shard-00001.bin"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(DistilError, match="shard-00001.bin has .* bytes but the manifest says .*truncated or corrupt"):
        train(cfg(teacher={"source": "cache", "cache": str(truncated)}))

    flipped = _copy(src, tmp_path / "flipped")
    shard = flipped / "shard-00000.bin"
    data = bytearray(shard.read_bytes())
    data[200] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(DistilError, match="SHA-256"):
        TeacherCache(flipped).verify()
    cache = TeacherCache(flipped)
    with pytest.raises(DistilError, match="CRC32"):
        for i in range(40):
            cache.get(i)
    # Read by DataLoader workers, the same error comes back as its own one line, not a worker traceback.
    with pytest.raises(DistilError) as e:
        train(cfg(teacher={"source": "cache", "cache": str(flipped)}, data={"num_workers": 2}, train={"steps": 40}))
    assert "CRC32" in str(e.value) and "\n" not in str(e.value) and "Traceback" not in str(e.value)

    missing = _copy(src, tmp_path / "missing")
    (missing / "shard-00002.bin").unlink()
    with pytest.raises(DistilError, match="shard-00002.bin is missing"):
        TeacherCache(missing)

    with pytest.raises(DistilError, match="no cache manifest"):
        TeacherCache(tmp_path)


def test_cache_that_does_not_match_the_data_names_both_sides(world, tiny_docs, tmp_path):
    from distil.data.tokenize import tokenizer_hash, train_bpe_tokenizer

    cfg = world["cfg"]
    cache_dir = str(world["caches"]["compact"])
    other_tok = train_bpe_tokenizer(tiny_docs, 280, tmp_path / "other-tok")
    with pytest.raises(DistilError, match=f"tokenizer .* but the data uses tokenizer {tokenizer_hash(other_tok)[:12]}"):
        train(cfg(teacher={"source": "cache", "cache": cache_dir}, data={"tokenizer": str(tmp_path / "other-tok")}))
    with pytest.raises(DistilError, match=r"holds \d+ sequences but the data has \d+ training windows"):
        train(cfg(teacher={"source": "cache", "cache": cache_dir}, data={"max_docs": 40}))
    with pytest.raises(DistilError, match="data.seq_len 32 but data.seq_len is 24"):
        train(cfg(teacher={"source": "cache", "cache": cache_dir}, data={"seq_len": 24}))
    with pytest.raises(DistilError, match="temperature 1.0 but loss.temperature is 2.0"):
        train(cfg(teacher={"source": "cache", "cache": cache_dir}, loss={"temperature": 2.0}))
    with pytest.raises(DistilError, match="loss.topk = 8 but the cache .* holds k = 16"):
        train(cfg(teacher={"source": "cache", "cache": cache_dir}, loss={"topk": 8}))
    with pytest.raises(DistilError, match="vocabulary size 300 but the student's is 600"):
        TeacherCache(cache_dir).check_against(tokenizer_hash=TeacherCache(cache_dir).settings.tokenizer_hash,
                                              vocab_size=600, temperature=1.0)
    with pytest.raises(DistilError, match="loss.kind must be one of"):
        cfg(teacher={"source": "cache", "cache": cache_dir}, loss={"kind": "jsd"})


def test_writer_rejects_nan_logprobs_and_k_larger_than_the_vocabulary(world, monkeypatch, tmp_path):
    cfg = world["cfg"]()
    with pytest.raises(DistilError, match="k = 301 is larger than the vocabulary"):
        write_cache(cfg, tmp_path / "big-k", k=301, progress=False)
    from distil.teachers import model as model_teacher

    def nan_topk(logits, k, temperature=1.0):
        ids, lp, tail = teacher_topk(logits, k, temperature=temperature)
        lp[0, 3, 2] = float("nan")
        return ids, lp, tail

    monkeypatch.setattr(model_teacher, "teacher_topk", nan_topk)
    with pytest.raises(DistilError, match=r"log-prob nan at entry \(0, 3, 2\)"):
        write_cache(cfg, tmp_path / "nan", k=4, progress=False)
    assert not (tmp_path / "nan" / "manifest.json").exists()
    assert not list((tmp_path / "nan").glob("shard-*"))


@pytest.mark.slow
def test_cli_bad_input_is_one_line_and_exit_2(world, tmp_path):
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg_dict(world["root"], world["corpus"])))
    for args, message in (
        (["cache-teacher", str(cfg_path), "--out", str(tmp_path / "c"), "--k", "999"], "larger than the vocabulary"),
        (["cache-teacher", "--stats", str(tmp_path / "nowhere")], "no cache manifest"),
        (["cache-teacher", str(cfg_path)], "pass --out DIR or set teacher.cache"),
    ):
        out = subprocess.run([sys.executable, "-m", "distil", *args], capture_output=True, text=True, env=ENV, timeout=120)
        assert out.returncode == 2, out.stderr
        assert out.stderr.strip().splitlines()[-1].startswith("distil: error:") and message in out.stderr
        assert "Traceback" not in out.stderr


@pytest.mark.parametrize("token_cache", [False, True])
def test_cache_teacher_needs_no_validation_split_and_training_names_it(world, tmp_path, token_cache):
    """A 5% validation split too short for one window: cache-teacher writes the cache of the training
    windows anyway; training, which needs held-out windows, says which split is short and by how much."""
    from distil.train.loop import prepare

    data = {"val_fraction": 0.02, "seq_len": 512, "token_cache": str(tmp_path / "tokens") if token_cache else None}
    cfg = world["cfg"](data=data)
    manifest = write_cache(cfg, tmp_path / "cache", k=4, progress=False)
    assert manifest.num_sequences > 0
    with pytest.raises(DistilError, match=r"the validation split \(data.val_fraction = 0.02: \d+ documents\) has \d+ tokens, fewer than one window"):
        prepare(cfg, None)


def test_cache_teacher_says_up_front_what_it_caches_and_what_a_run_reads():
    from distil.config import config_from_dict
    from distil.train.cache_teacher import cache_plan

    cfg = config_from_dict({"teacher": {"source": "model", "path": "x"}, "data": {"seq_len": 64},
                            "train": {"steps": 20, "batch_size": 8}})
    line = cache_plan(cfg, 2420)
    assert "all 2,420 training windows (154,880 tokens)" in line and "reads 10,240 tokens" in line
    assert "7% of the cache" in line and "data.max_docs" in line
    cfg = config_from_dict({"teacher": {"source": "model", "path": "x"}, "data": {"seq_len": 64},
                            "train": {"steps": 400, "batch_size": 8}})
    assert "% of the cache" not in cache_plan(cfg, 100, done=40) and "40 windows already done" in cache_plan(cfg, 100, 40)
