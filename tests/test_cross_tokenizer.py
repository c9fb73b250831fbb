"""Cross-tokenizer losses (distil.losses.cross_tokenizer) against a float64 formula written out group
by group: ULD and the hybrid, both group-merging rules, values and gradients; and the reduction to
the ordinary loss when the tokenizers are the same."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import save_tiny_model, with_sections
from distil.config import config_from_dict
from distil.data.alignment import TokenizerPair
from distil.errors import DistilError
from distil.losses.cross_tokenizer import (
    GroupIndex,
    TeacherSide,
    cross_tokenizer_loss,
    group_sampled_reverse_kl,
    sorted_l1,
    topk_scores,
)
from distil.losses.divergences import cross_entropy, kd_loss
from distil.teachers import Request, load_teacher
from distil.teachers.cross import CrossTokenizerTeacher
from distil.train.loop import train
from test_alignment import sentencepiece_tokenizer
from test_api_teacher import FakeOpenAI

pytestmark = pytest.mark.numerics


def _random_groups(rng, n_s, n_t):
    """Random monotone groups: both sides cut into the same number of runs of 1-3 tokens."""
    s_cuts, t_cuts = [0], [0]
    while s_cuts[-1] < n_s - 3 and t_cuts[-1] < n_t - 3:
        s_cuts.append(s_cuts[-1] + int(rng.integers(1, 4)))
        t_cuts.append(t_cuts[-1] + int(rng.integers(1, 4)))
    s = np.stack([s_cuts[:-1], s_cuts[1:]], 1)
    t = np.stack([t_cuts[:-1], t_cuts[1:]], 1)
    return s, t


def _setup(seed=0, batch=2, n_s=12, n_t=10, v_s=23, v_t=31, hid=8):
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    h = torch.randn(batch, n_s, hid, dtype=torch.float64, generator=g)
    w = torch.randn(v_s, hid, dtype=torch.float64, generator=g)
    th = torch.randn(batch, n_t, hid, dtype=torch.float64, generator=g)
    tw = torch.randn(v_t, hid, dtype=torch.float64, generator=g)
    s_ids = torch.randint(0, v_s, (batch, n_s), generator=g)
    t_ids = torch.randint(0, v_t, (batch, n_t), generator=g)
    labels = torch.cat([s_ids[:, 1:], torch.full((batch, 1), -100)], 1)
    labels[0, 3] = -100  # a position that does not count
    rows = [_random_groups(rng, n_s, n_t) for _ in range(batch)]
    matched = (np.array([0, 3, 5, 7, 11]), np.array([2, 4, 9, 1, 30]))
    return h, w, th, tw, s_ids, t_ids, labels, rows, matched


@pytest.mark.parametrize("merge", ["first", "last"])
@pytest.mark.parametrize("mode,kind", [("uld", "forward_kl"), ("hybrid", "forward_kl"), ("hybrid", "reverse_kl"),
                                       ("hybrid", "jsd")])
def test_chunked_loss_equals_the_group_by_group_formula(mode, merge, kind):
    h, w, th, tw, s_ids, t_ids, labels, rows, matched = _setup()
    batch, n_s, _ = h.shape
    n_t = th.shape[1]
    index = GroupIndex.build(rows, merge=merge, student_len=n_s, teacher_len=n_t, counted=labels != -100)
    assert index.groups > 4 and index.student_scale_rows.numel() > 0  # multi-token groups are exercised
    t_next = torch.cat([t_ids[:, 1:], torch.zeros(batch, 1, dtype=torch.long)], 1).reshape(-1)
    common = dict(mode=mode, kind=kind, matched=matched, ce_weight=0.3, kd_weight=0.7, temperature=1.5)
    h1, w1 = h.clone().requires_grad_(), w.clone().requires_grad_()
    got = cross_tokenizer_loss(h1, w1, labels, TeacherSide(t_next, hidden=th.reshape(-1, th.shape[-1]), weight=tw),
                               index, chunk_size=3, student_next=torch.cat([s_ids[:, 1:], s_ids[:, :1]], 1), **common)
    got.backward()
    h2, w2 = h.clone().requires_grad_(), w.clone().requires_grad_()
    want = reference_loss(h2 @ w2.t(), th @ tw.t(), labels, s_ids, t_ids, rows, merge=merge, **common)
    want.backward()
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(w1.grad, w2.grad, rtol=1e-9, atol=1e-12)


def test_teacher_logits_give_the_same_loss_as_its_head_inputs():
    h, w, th, tw, s_ids, t_ids, labels, rows, matched = _setup(seed=1)
    index = GroupIndex.build(rows, merge="first", student_len=h.shape[1], teacher_len=th.shape[1])
    t_next = torch.cat([t_ids[:, 1:], torch.zeros(2, 1, dtype=torch.long)], 1).reshape(-1)
    flat = th.reshape(-1, th.shape[-1])
    a = cross_tokenizer_loss(h, w, labels, TeacherSide(t_next, hidden=flat, weight=tw), index, matched=matched)
    b = cross_tokenizer_loss(h, w, labels, TeacherSide(t_next, logits=flat @ tw.t()), index, matched=matched)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_sorted_l1_is_uld_distance():
    p = torch.tensor([[0.1, 0.6, 0.3]], dtype=torch.float64)
    q = torch.tensor([[0.5, 0.05, 0.25, 0.2]], dtype=torch.float64)
    # sorted: [.6 .3 .1 0] against [.5 .25 .2 .05]
    assert sorted_l1(p, q).item() == pytest.approx(0.1 + 0.05 + 0.1 + 0.05)
    assert sorted_l1(p, p).item() == 0.0


def test_identical_tokenizers_reduce_the_group_loss_to_the_ordinary_loss(tmp_path, tiny_tokenizer, tiny_docs):
    """Forced through the group path with one tokenizer on both sides: every group is one token,
    every entry is matched, so the hybrid with matched_weight 1 is the ordinary KD + CE."""
    teacher = load_teacher(save_tiny_model(tmp_path / "t", tiny_tokenizer, n_layers=1, seed=3))
    teacher.model.double()
    cross = CrossTokenizerTeacher(teacher, TokenizerPair(tiny_tokenizer, tiny_tokenizer))
    g = torch.Generator().manual_seed(0)
    ids = torch.tensor([tiny_tokenizer(d, add_special_tokens=False)["input_ids"][:17] for d in tiny_docs[:2]])
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}
    signal = cross.signal(batch, Request("groups"))
    assert signal.index.groups == 2 * 15  # every position but the first of each row
    h = torch.randn(2, 16, 32, dtype=torch.float64, generator=g)
    w = torch.randn(len(tiny_tokenizer), 32, dtype=torch.float64, generator=g)
    got = cross_tokenizer_loss(h, w, batch["labels"], signal.teacher, signal.index, mode="hybrid", kind="reverse_kl",
                               matched=signal.matched, matched_weight=1.0, ce_weight=0.5, student_next=signal.student_next)
    t_logits = teacher.logits(batch["input_ids"])
    counted = torch.ones(2, 16, dtype=torch.bool)
    counted[:, 0] = False  # the first token of a sequence has no position before it
    student_logits = h @ w.t()
    keep = torch.tensor([i for i in range(len(tiny_tokenizer)) if i != tiny_tokenizer.eos_token_id])
    shifted = torch.zeros_like(counted)
    shifted[:, :-1] = counted[:, 1:]  # group g is scored at the position before its token
    want = kd_loss(student_logits[..., keep], t_logits[..., keep], "reverse_kl", mask=shifted) + \
        0.5 * cross_entropy(student_logits, batch["labels"])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.fixture
def cross_setup(tmp_path, tiny_tokenizer, tiny_docs, tiny_corpus_file):
    """A teacher in a SentencePiece-style tokenizer; the student in distil's BPE (saved for data.tokenizer)."""
    teacher = save_tiny_model(tmp_path / "teacher", sentencepiece_tokenizer(tiny_docs), n_layers=1, seed=5)
    tiny_tokenizer.save_pretrained(str(tmp_path / "student_tok"))
    base = {"teacher": {"path": teacher},
            "student": {"d_model": 32, "n_layers": 1, "n_heads": 2},
            "data": {"source": "jsonl", "path": str(tiny_corpus_file), "seq_len": 32, "val_fraction": 0.2,
                     "tokenizer": str(tmp_path / "student_tok")},
            "loss": {"kind": "forward_kl", "kd_weight": 1.0, "ce_weight": 0.0},
            "train": {"steps": 8, "batch_size": 2, "lr": 1e-2, "warmup_steps": 1, "progress": False, "val_every": 0,
                      "log_every": 1, "device": "cpu"},
            "eval": {"val_batches": 1}}
    return lambda **sections: config_from_dict(with_sections(base, **sections))


@pytest.mark.parametrize("mode", ["uld", "hybrid"])
def test_training_across_tokenizers_lowers_the_cross_tokenizer_loss(cross_setup, mode):
    result = train(cross_setup(loss={"cross_tokenizer": {"mode": mode}}))
    losses = [r["loss"] for r in result.history]
    assert all(np.isfinite(losses)) and len(losses) == 8
    assert np.mean(losses[-3:]) < np.mean(losses[:3])


def test_tokenizer_mismatch_is_refused_for_ordinary_kd_and_names_the_option(cross_setup):
    with pytest.raises(DistilError, match="loss.cross_tokenizer"):
        train(cross_setup())


def test_identical_tokenizers_train_bit_for_bit_like_the_ordinary_loss(cross_setup, tmp_path, tiny_tokenizer):
    teacher = save_tiny_model(tmp_path / "same", tiny_tokenizer, n_layers=1, seed=5)
    plain = train(cross_setup(teacher={"path": teacher}, train={"steps": 3}))
    cross = train(cross_setup(teacher={"path": teacher}, train={"steps": 3}, loss={"cross_tokenizer": {"mode": "hybrid"}}))
    assert [r["loss"] for r in plain.history] == [r["loss"] for r in cross.history]


@pytest.mark.parametrize("sections,message", [
    ({"teacher": {"source": "none"}}, "needs a teacher"),
    ({"loss": {"topk": 8}}, "unset loss.topk"),
    ({"data": {"packing": "stream"}}, "concat packing"),
    ({"loss": {"policy": "minillm"}, "rollout": {"prompts": "corpus:topics"}}, "use loss.policy gkd or on_policy_rkl"),
    ({"loss": {"policy": "on_policy_rkl"}, "rollout": {"prompts": "corpus:topics", "exact": True}},
     "without rollout.exact"),
])
def test_unsupported_cross_tokenizer_settings_are_refused(cross_setup, sections, message):
    loss = {**sections.pop("loss", {}), "cross_tokenizer": {"mode": "uld"}}
    with pytest.raises(DistilError, match=message):
        cross_setup(loss=loss, **sections)


def test_on_policy_gkd_across_tokenizers_grades_the_students_samples(cross_setup):
    """λ = 1: every step the student writes completions to corpus prompts; they are re-tokenised for
    the teacher and compared group by group (prompt positions do not count)."""
    cfg = cross_setup(loss={"policy": "gkd", "cross_tokenizer": {"mode": "hybrid"}},
                      rollout={"prompts": "corpus:topics", "max_new_tokens": 8, "lmbda": 1.0, "limit": 16},
                      student={"max_seq_len": 128}, train={"steps": 3, "batch_size": 4})
    result = train(cfg)
    losses = [r["loss"] for r in result.history]
    assert len(losses) == 3 and all(np.isfinite(losses)) and all(v > 0 for v in losses)


def test_topk_scores_list_the_entries_and_spread_the_tail_evenly():
    logp = torch.log_softmax(torch.randn(3, 11, dtype=torch.float64, generator=torch.Generator().manual_seed(0)), -1)
    top = logp.topk(4, dim=-1)
    ids = torch.cat([top.indices, torch.full((3, 1), -1)], 1)  # an absent slot
    lp = torch.cat([top.values, torch.full((3, 1), -1e9, dtype=torch.float64)], 1)
    tail = torch.log1p(-top.values.exp().sum(-1))
    got = topk_scores(ids, lp, tail, 11).double()
    torch.testing.assert_close(got.gather(1, top.indices), top.values.float().double())
    unlisted = torch.ones(3, 11, dtype=torch.bool).scatter(1, top.indices, False)
    rest = got[unlisted].reshape(3, 7).exp()
    torch.testing.assert_close(rest, (tail.exp() / 7)[:, None].expand(3, 7), rtol=1e-6, atol=0)
    whole = torch.full((3,), float("-inf"), dtype=torch.float64)  # every entry listed: the distribution itself
    torch.testing.assert_close(topk_scores(logp.topk(11).indices, logp.topk(11).values, whole, 11).double(),
                               logp.float().double())


def test_a_cross_tokenizer_cache_lists_the_produced_token_and_the_exact_tail(cross_setup, tmp_path):
    from distil.data.teacher_cache import TeacherCache
    from distil.train.cache_teacher import write_cache

    cfg = cross_setup(loss={"cross_tokenizer": {"mode": "hybrid"}})
    write_cache(cfg, tmp_path / "xcache", k=4, encoding="exact", progress=False, batch_size=3)
    cache = TeacherCache(tmp_path / "xcache")
    assert cache.settings.k == 5 and cache.settings.teacher_tokenizer_hash and cache.manifest.version == 3
    assert (tmp_path / "xcache" / "teacher_tokenizer" / "tokenizer.json").is_file()
    teacher = load_teacher(cfg.teacher.path)
    for sequence in (0, len(cache) - 1):
        tokens, ids, logprobs, tail = cache.get(sequence)
        assert (ids == tokens[1:, None]).any(-1).all()  # the produced token is always listed
        exact = torch.log_softmax(teacher.logits(torch.as_tensor(tokens[None, :-1]))[0].double(), -1)
        listed = ids >= 0
        truth = exact.gather(1, torch.as_tensor(ids).clamp_min(0)).numpy()
        np.testing.assert_allclose(logprobs[listed], truth[listed], rtol=0, atol=1e-5)
        rest = exact.scatter(1, torch.as_tensor(np.where(listed, ids, 0)), float("-inf"))
        rest[:, 0] = torch.where(torch.as_tensor(listed & (ids == 0)).any(-1), float("-inf"), exact[:, 0])
        np.testing.assert_allclose(tail, rest.logsumexp(-1).numpy(), rtol=0, atol=1e-5)
        assert (~listed[:, :4]).sum() == 0 and (listed[:, 4] == ~(ids[:, :4] == tokens[1:, None]).any(-1)).all()


def test_training_from_a_cross_tokenizer_cache_equals_the_online_teacher(cross_setup, tmp_path):
    """Every entry of the teacher's vocabulary cached (k = V, exact encoding): the run read from the
    cache is the run with the teacher online, step for step."""
    from distil.train.cache_teacher import write_cache

    online_cfg = cross_setup(loss={"cross_tokenizer": {"mode": "hybrid"}, "ce_weight": 0.5}, train={"steps": 3})
    vocab = load_teacher(online_cfg.teacher.path).vocab_size
    write_cache(online_cfg, tmp_path / "full", k=vocab, encoding="exact", progress=False)
    cached_cfg = cross_setup(loss={"cross_tokenizer": {"mode": "hybrid"}, "ce_weight": 0.5}, train={"steps": 3},
                             teacher={"source": "cache", "cache": str(tmp_path / "full")})
    online = [r["loss"] for r in train(online_cfg).history]
    cached = [r["loss"] for r in train(cached_cfg).history]
    np.testing.assert_allclose(cached, online, rtol=1e-5)
    write_cache(online_cfg, tmp_path / "k8", k=8, progress=False)  # a real top-k: close, not equal, and training
    small = [r["loss"] for r in train(cross_setup(loss={"cross_tokenizer": {"mode": "hybrid"}, "ce_weight": 0.5},
                                                  teacher={"source": "cache", "cache": str(tmp_path / "k8")})).history]
    assert all(np.isfinite(small)) and np.mean(small[-3:]) < np.mean(small[:3])


def test_a_cross_tokenizer_cache_needs_the_cross_tokenizer_loss(cross_setup, tmp_path):
    from distil.train.cache_teacher import write_cache

    write_cache(cross_setup(loss={"cross_tokenizer": {"mode": "uld"}}), tmp_path / "c", k=4, progress=False)
    with pytest.raises(DistilError, match="a cross-tokenizer cache.*loss.cross_tokenizer.mode"):
        train(cross_setup(teacher={"source": "cache", "cache": str(tmp_path / "c")}))


@pytest.mark.parametrize("merge", ["first", "last"])
def test_group_sampled_reverse_kl_equals_the_group_by_group_formula(merge):
    """- mean_g (log p(g) - log q(g)).detach() * log q(g), each side's log-prob of a group the sum over
    its own tokens in it, written out on materialised logits in float64 (value and gradients)."""
    h, w, th, tw, s_ids, t_ids, labels, rows, _ = _setup(seed=2)
    batch, n_s, _ = h.shape
    n_t = th.shape[1]
    index = GroupIndex.build(rows, merge=merge, student_len=n_s, teacher_len=n_t, counted=labels != -100)
    t_next = torch.cat([t_ids[:, 1:], torch.zeros(batch, 1, dtype=torch.long)], 1).reshape(-1)
    s_next = torch.cat([s_ids[:, 1:], s_ids[:, :1]], 1)
    h1, w1 = h.clone().requires_grad_(), w.clone().requires_grad_()
    got = group_sampled_reverse_kl(h1, w1, TeacherSide(t_next, hidden=th.reshape(-1, th.shape[-1]), weight=tw),
                                   index, s_next)
    got.backward()
    h2, w2 = h.clone().requires_grad_(), w.clone().requires_grad_()
    s_logp, t_logp = torch.log_softmax(h2 @ w2.t(), -1), torch.log_softmax(th @ tw.t(), -1)
    terms = []
    for b, (s_groups, t_groups) in enumerate(rows):
        for (a, e), (c, d) in zip(s_groups.tolist(), t_groups.tolist()):
            if a < 1 or c < 1 or labels[b, _scored_at(a, e, merge)[0]] == -100:
                continue
            q = sum(s_logp[b, p - 1, s_ids[b, p]] for p in range(a, e))  # every token of the group
            pt = sum(t_logp[b, p - 1, t_ids[b, p]] for p in range(c, d))
            terms.append(-(pt - q).detach() * q)
    want = torch.stack(terms).mean()
    want.backward()
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(w1.grad, w2.grad, rtol=1e-9, atol=1e-12)


def test_on_policy_reverse_kl_across_tokenizers_trains_on_the_students_samples(cross_setup):
    cfg = cross_setup(loss={"policy": "on_policy_rkl", "cross_tokenizer": {"mode": "hybrid"}},
                      rollout={"prompts": "corpus:topics", "max_new_tokens": 8, "limit": 16},
                      student={"max_seq_len": 128}, train={"steps": 3, "batch_size": 4})
    from distil.losses.objective import DistillLoss
    assert "sampled groups" in DistillLoss.from_config(cfg.loss, teacher_gives=("groups",), rollout=cfg.rollout).describe()
    result = train(cfg)
    losses = [r["loss"] for r in result.history]
    assert len(losses) == 3 and all(np.isfinite(losses))


class TextServer(FakeOpenAI):
    """/v1/completions taking a text prompt: the teacher's tokenizer (with its BOS) tokenises it, and
    the response gives tokens, text_offset, token_logprobs and top_logprobs, as the OpenAI API does."""

    def __init__(self, model, tokenizer, *, offsets=True):
        super().__init__(model, tokenizer)
        self.offsets, self.prompts = offsets, []

    def answer(self, path, body, auth):
        text, k = body["prompt"], body["logprobs"]
        assert isinstance(text, str)
        self.prompts.append(text)
        enc = self.tokenizer(text, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        with torch.no_grad():
            logp = torch.log_softmax(self.model(torch.tensor([ids]))[0].float(), -1)
        nxt = int(logp[-1].argmax())
        name = self.tokenizer.convert_ids_to_tokens
        tokens = [name(i) for i in ids + [nxt]]
        tops = [None] + [{name(int(j)): float(v) for v, j in zip(*row.topk(k))} for row in logp]
        produced = [None] + [float(logp[i, t]) for i, t in enumerate(ids[1:] + [nxt])]
        logprobs = {"tokens": tokens, "token_logprobs": produced, "top_logprobs": tops}
        if self.offsets:
            logprobs["text_offset"] = [int(a) for a, _ in enc["offset_mapping"]] + [len(text)]
        return 200, {"object": "text_completion", "choices": [{"index": 0, "text": tokens[-1], "logprobs": logprobs}]}, {}


@pytest.fixture
def text_server(tmp_path, tiny_docs):
    teacher_tok = sentencepiece_tokenizer(tiny_docs)
    path = save_tiny_model(tmp_path / "served", teacher_tok, n_layers=1, seed=5)
    server = TextServer(load_teacher(path).model, teacher_tok)
    yield server, path, teacher_tok
    server.close()


def test_an_api_teacher_in_another_tokenizer_scores_like_the_teacher_in_process(text_server, tiny_tokenizer, tiny_docs):
    """The server tokenises the text itself; its text offsets place its tokens, and with every entry
    returned (k = V) the loss equals the in-process teacher's on the same windows."""
    from distil.teachers.api import ApiTeacher

    server, path, teacher_tok = text_server
    pair = TokenizerPair(tiny_tokenizer, teacher_tok)
    texts = [*tiny_docs[:2], "Le café naïve — 東京 ☕ et 🦜 " + tiny_docs[2]]  # characters of 2, 3 and 4 bytes
    rows = [tiny_tokenizer(d, add_special_tokens=False)["input_ids"][:25] for d in texts]
    ids = torch.tensor(rows)
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}
    local = CrossTokenizerTeacher(load_teacher(path), pair).signal(batch, Request("groups"))
    api = ApiTeacher(server.url, "served", teacher_tok, topk=len(teacher_tok), concurrency=2)
    remote = CrossTokenizerTeacher(api, pair).signal(batch, Request("groups"))
    api.close()
    assert len(server.prompts) == 3 and all(isinstance(p, str) for p in server.prompts)  # text, one run per row
    assert torch.equal(remote.index.student_rows, local.index.student_rows) and remote.index.groups > 15
    g = torch.Generator().manual_seed(0)
    h = torch.randn(3, 24, 32, generator=g)
    w = torch.randn(len(tiny_tokenizer), 32, generator=g)
    common = dict(mode="hybrid", kind="forward_kl", matched=local.matched, ce_weight=0.0)
    want = cross_tokenizer_loss(h, w, batch["labels"], local.teacher, local.index, student_next=local.student_next,
                                **common)
    got = cross_tokenizer_loss(h, w, batch["labels"], remote.teacher, remote.index, student_next=remote.student_next,
                               **common)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_training_with_an_api_teacher_in_another_tokenizer(text_server, cross_setup, tmp_path):
    server, _, teacher_tok = text_server
    teacher_tok.save_pretrained(str(tmp_path / "served_tok"))
    api = {"base": server.url, "model": "served", "topk": 8, "cache": None}
    cfg = cross_setup(teacher={"source": "api"}, api=api, train={"steps": 4},
                      loss={"cross_tokenizer": {"mode": "hybrid", "teacher_tokenizer": str(tmp_path / "served_tok")}})
    losses = [r["loss"] for r in train(cfg).history]
    assert len(losses) == 4 and all(np.isfinite(losses)) and server.prompts
    with pytest.raises(DistilError, match="needs the teacher's tokenizer"):
        cross_setup(teacher={"source": "api"}, api=api, loss={"cross_tokenizer": {"mode": "hybrid"}})


def test_a_server_without_text_offsets_is_one_line(tmp_path, tiny_docs, tiny_tokenizer):
    from distil.teachers.api import ApiTeacher

    teacher_tok = sentencepiece_tokenizer(tiny_docs)
    server = TextServer(load_teacher(save_tiny_model(tmp_path / "s", teacher_tok, n_layers=1, seed=1)).model, teacher_tok,
                        offsets=False)
    api = ApiTeacher(server.url, "served", teacher_tok, topk=4)
    ids = torch.tensor([tiny_tokenizer(tiny_docs[0], add_special_tokens=False)["input_ids"][:12]])
    try:
        with pytest.raises(DistilError, match="gives no text_offset"):
            CrossTokenizerTeacher(api, TokenizerPair(tiny_tokenizer, teacher_tok)).signal(
                {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}, Request("groups"))
    finally:
        api.close()
        server.close()


STUDENT_CHAT = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                "{% if add_generation_prompt %}<assistant>{% endif %}")
TEACHER_CHAT = ("{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}\n\n{% endfor %}"
                "{% if add_generation_prompt %}### assistant:{% endif %}")


@pytest.fixture
def chat_setup(tmp_path, tiny_tokenizer, tiny_docs, cross_setup, monkeypatch):
    """Chat prompts, a student tokenizer and a teacher tokenizer with different chat templates."""
    monkeypatch.setattr(tiny_tokenizer, "chat_template", STUDENT_CHAT)
    tiny_tokenizer.save_pretrained(str(tmp_path / "chat_student"))
    teacher_tok = sentencepiece_tokenizer(tiny_docs)
    teacher_tok.chat_template = TEACHER_CHAT
    teacher = save_tiny_model(tmp_path / "chat_teacher", teacher_tok, n_layers=1, seed=5)
    records = [{"messages": [{"role": "user", "content": f"Explain the {word} of the module."},
                             {"role": "assistant", "content": f"The {word} is defined in the module."}]}
               for word in ("value", "name", "class", "function", "object", "list", "type", "method")]
    prompts = tmp_path / "chat.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in records))

    def make(lmbda):
        return cross_setup(teacher={"path": teacher}, data={"tokenizer": str(tmp_path / "chat_student")},
                           loss={"policy": "gkd", "cross_tokenizer": {"mode": "hybrid"}},
                           rollout={"prompts": str(prompts), "max_new_tokens": 8, "lmbda": lmbda},
                           student={"max_seq_len": 128}, train={"steps": 2, "batch_size": 4})
    return make, records, teacher_tok


@pytest.mark.parametrize("lmbda", [0.0, 1.0])
def test_chat_prompts_reach_the_teacher_in_its_own_template(chat_setup, tiny_tokenizer, monkeypatch, lmbda):
    """Each side reads the messages in its own chat template; the teacher reads the student's reply
    (dataset's at λ = 0, sampled at λ = 1) after its own prompt, and only reply positions are scored."""
    make, records, teacher_tok = chat_setup
    rendered = {teacher_tok.apply_chat_template(r["messages"][:1], tokenize=False, add_generation_prompt=True)
                for r in records}
    own = {tuple(teacher_tok(text, add_special_tokens=False)["input_ids"]) for text in rendered}
    pair = TokenizerPair(tiny_tokenizer, teacher_tok)
    seen = []
    original = CrossTokenizerTeacher.retokenize

    def spy(self, input_ids, labels, teacher_prompts=None):
        t_ids, index = original(self, input_ids, labels, teacher_prompts)
        seen.append((input_ids, labels, teacher_prompts, t_ids, index))
        return t_ids, index
    monkeypatch.setattr(CrossTokenizerTeacher, "retokenize", spy)
    result = train(make(lmbda))
    assert len(result.history) == 2 and all(np.isfinite(r["loss"]) for r in result.history)
    assert seen
    for input_ids, labels, prompts, t_ids, index in seen:
        assert prompts is not None and len(prompts) == input_ids.shape[0]
        for b, (t_prompt, s_len) in enumerate(prompts):
            assert tuple(t_prompt) in own  # the teacher's own template, tokenised by itself
            assert t_ids[b, :len(t_prompt)].tolist() == list(t_prompt)
            assert tiny_tokenizer.decode(input_ids[b, :s_len].tolist()).startswith("<user>")  # the student's template
            assert (labels[b, :s_len - 1] == -100).all() and labels[b, s_len - 1] != -100
            s_reply = [i for i in input_ids[b, s_len:].tolist() + [int(labels[b, -1])] if i != -100]
            reply_bytes = pair.student.join([i for i in s_reply if i != tiny_tokenizer.eos_token_id])
            t_reply = [i for i in t_ids[b, len(t_prompt):].tolist() if i != teacher_tok.eos_token_id]
            if lmbda == 0:  # the dataset's reply, as the teacher reads it (SentencePiece adds its prefix space);
                # a sampled reply may hold stray bytes, which align with nothing (test_alignment)
                assert pair.teacher.join(t_reply).lstrip(b" ") == reply_bytes.lstrip(b" ")
                assert b"The " in reply_bytes
        width, t_width = input_ids.shape[1], t_ids.shape[1]
        assert index.groups > 0
        for b, (t_prompt, s_len) in enumerate(prompts):  # prompt positions are never scored, on either side
            assert (index.student_rows[index.student_rows // width == b] % width >= s_len - 1).all()
            assert (index.teacher_rows[index.teacher_rows // t_width == b] % t_width >= len(t_prompt) - 1).all()


def test_a_chat_template_missing_on_the_teachers_side_is_one_line(chat_setup, tmp_path, tiny_docs):
    make, _, teacher_tok = chat_setup
    teacher_tok.chat_template = None
    bare = save_tiny_model(tmp_path / "bare_teacher", teacher_tok, n_layers=1, seed=5)
    cfg = make(1.0)
    cfg.teacher.path = bare
    with pytest.raises(DistilError, match="the teacher's tokenizer has no chat template"):
        train(cfg)


def test_a_vocabulary_larger_than_memory_allows_is_one_line(cross_setup, tiny_tokenizer, tiny_docs, monkeypatch):
    """The loss's smallest step (head inputs) and a teacher's whole logits (no head inputs) are checked
    against the free memory before they are made."""
    import distil.teachers.cross as cross

    monkeypatch.setattr(cross, "available_memory", lambda device: 100_000)  # 100 kB free
    with pytest.raises(DistilError, match=r"vocabulary entries.*GB free on cpu; use tokenizers with smaller"):
        train(cross_setup(loss={"cross_tokenizer": {"mode": "hybrid"}}))

    class LogitsOnly:  # a teacher that gives whole logits only
        gives, vocab_size, name = ("logits",), 5000, "logits-only"

        def logits(self, ids):
            raise AssertionError("the logits must not be made")
    teacher = CrossTokenizerTeacher(LogitsOnly(), TokenizerPair(tiny_tokenizer, sentencepiece_tokenizer(tiny_docs)))
    ids = torch.tensor([tiny_tokenizer(tiny_docs[0], add_special_tokens=False)["input_ids"][:16]])
    with pytest.raises(DistilError, match=r"teacher's logits for 1 x \d+ tokens over its 5000-entry.*lower train"):
        teacher.signal({"input_ids": ids, "labels": ids}, Request("groups"))


def _scored_at(start, end, merge):
    """The merge rule written out: tokens [start, end) of a group; position p predicts token p + 1.
    first: scored before the first token, times the later tokens' probabilities; last: scored before
    the last token, times the earlier tokens' probabilities."""
    if merge == "first":
        return start - 1, list(range(start, end - 1))
    return end - 2, list(range(start - 1, end - 2))


def reference_loss(student_logits, teacher_logits, labels, student_ids, teacher_ids, rows, *, mode,
                                   merge, kind="forward_kl", matched=None, matched_weight=None, ce_weight=0.0,
                                   kd_weight=1.0, temperature=1.0):
    """The loss written out group by group on materialised logits ([batch, seq, V]), float64.
    ``student_ids`` / ``teacher_ids``: [batch, seq] the tokens each side read."""
    terms = []
    for b, (s_groups, t_groups) in enumerate(rows):
        for (a, e), (c, d) in zip(np.asarray(s_groups).tolist(), np.asarray(t_groups).tolist()):
            if a < 1 or c < 1 or labels[b, _scored_at(a, e, merge)[0]] == -100:
                continue
            vecs = []
            for logits, ids, lo, hi in ((student_logits[b], student_ids[b], a, e), (teacher_logits[b], teacher_ids[b], c, d)):
                logp = torch.log_softmax(logits / temperature, dim=-1)
                row, scale_rows = _scored_at(lo, hi, merge)
                scale = sum((logp[p, ids[p + 1]] for p in scale_rows), torch.zeros((), dtype=logp.dtype))
                vecs.append((logits[row], logp[row], scale))
            (s_logits, s_logp, s_scale), (t_logits, t_logp, t_scale) = vecs
            s_p, t_p = (s_logp + s_scale).exp(), (t_logp + t_scale).exp()
            if mode == "uld":
                terms.append(_sorted_l1_naive(s_p, t_p))
                continue
            s_ids, t_ids = (torch.as_tensor(np.asarray(m)) for m in matched)
            share = len(t_ids) / t_logits.shape[-1] if matched_weight is None else matched_weight
            part = kd_loss(s_logits[s_ids][None], t_logits[t_ids][None], kind, temperature=temperature,
                           reduction="sum")
            s_rest = [i for i in range(len(s_p)) if i not in set(s_ids.tolist())]
            t_rest = [i for i in range(len(t_p)) if i not in set(t_ids.tolist())]
            terms.append(share * part + (1 - share) * _sorted_l1_naive(s_p[s_rest], t_p[t_rest]))
    loss = kd_weight * torch.stack(terms).mean()
    if ce_weight:
        loss = loss + ce_weight * cross_entropy(student_logits, labels)
    return loss


def _sorted_l1_naive(p, q):
    p, q = sorted(p, reverse=True), sorted(q, reverse=True)
    n = max(len(p), len(q))
    zero = torch.zeros((), dtype=torch.float64)
    p, q = p + [zero] * (n - len(p)), q + [zero] * (n - len(q))
    return sum(((x - y).abs() for x, y in zip(p, q)), zero)
