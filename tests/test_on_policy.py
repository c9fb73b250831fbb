"""On-policy distillation: prompts, rollouts through the batch-source protocol, the policy losses.

References: the losses against naive float64 formulas (values and gradients) and, for the sampled
reverse KL, against the exact reverse KL's gradient in expectation (Monte Carlo within its
standard error); GKD with lmbda 0 against the off-policy run bit for bit; k micro-batches of B/k
rows against one of B; a resumed run against an uninterrupted one.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from conftest import save_tiny_model, with_sections
from distil.config import config_from_dict
from distil.data.prompts import load_prompts
from distil.errors import DistilError
from distil.losses.policy import minillm_loss, sampled_reverse_kl
from distil.models import ModelConfig, TransformerLM
from distil.models.generate import filter_top_p, sample
from distil.train.loop import setup, train_step
from distil.train.rollout import RolloutBatches
from distil.train.run import run_training


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, tiny_tokenizer):
    return save_tiny_model(tmp_path_factory.mktemp("on-policy") / "teacher", tiny_tokenizer, n_layers=2, seed=3)


@pytest.fixture
def prompts_file(tmp_path, tiny_docs):
    path = tmp_path / "prompts.jsonl"
    lines = []
    for i, doc in enumerate(tiny_docs[:12]):
        words = doc.split()
        lines.append(json.dumps({"prompt": " ".join(words[: 3 + i % 4]), "completion": " " + " ".join(words[6:14])}))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def make_cfg(run_config, teacher_dir, prompts_file, tiny_tokenizer):
    def make(policy="on_policy_rkl", *, rollout=None, loss=None, train=None):
        base = run_config()
        return config_from_dict(with_sections(
            base, teacher={"source": "model", "path": teacher_dir},
            data={**base["data"], "tokenizer": teacher_dir, "token_cache": None},
            student={"d_model": 32, "n_layers": 1, "n_heads": 2, "max_seq_len": 128},
            loss={"kind": "reverse_kl", "kd_weight": 1.0, "ce_weight": 0.0, "policy": policy, **(loss or {})},
            rollout={"prompts": str(prompts_file), "max_new_tokens": 6, "num_generations": 2, **(rollout or {})},
            train={"batch_size": 4, "steps": 3, "val_every": 0, "lr": 1e-2, **(train or {})}))

    return make


# -- prompts -----------------------------------------------------------------------------------


def test_prompt_sources(prompts_file, tiny_tokenizer, tmp_path):
    prompts = load_prompts(prompts_file, tiny_tokenizer)
    assert len(prompts) == 12 and all(p.completion for p in prompts)
    assert tiny_tokenizer.decode(list(prompts[0].ids)).strip().split() == json.loads(
        prompts_file.read_text().splitlines()[0])["prompt"].split()
    topics = load_prompts("corpus:topics", tiny_tokenizer, completion_tokens=16)
    assert len(topics) > 50 and all(len(p.completion) <= 16 for p in topics)
    assert any(tiny_tokenizer.decode(list(p.ids)).startswith("Explain ") for p in topics)
    passages = load_prompts("corpus:passages", tiny_tokenizer, prompt_tokens=8, limit=20)
    assert len(passages) == 20 and all(len(p.ids) == 8 for p in passages)
    assert len(load_prompts(prompts_file, tiny_tokenizer, max_prompt_tokens=2)[5].ids) == 2  # the last tokens kept
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "no prompt"}\n')
    with pytest.raises(DistilError, match="bad.jsonl:1"):
        load_prompts(bad, tiny_tokenizer)
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    with pytest.raises(DistilError, match="chat template"):
        load_prompts(bad, tiny_tokenizer)
    with pytest.raises(DistilError, match="corpus:topics"):
        load_prompts("corpus:nope", tiny_tokenizer)


def test_chat_messages_use_the_template(tmp_path, tiny_tokenizer):
    tiny_tokenizer.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                                    "{% if add_generation_prompt %}<assistant>{% endif %}")
    try:
        path = tmp_path / "chat.jsonl"
        path.write_text(json.dumps({"messages": [{"role": "user", "content": "the model"},
                                                 {"role": "assistant", "content": "learns"}]}) + "\n")
        (p,) = load_prompts(path, tiny_tokenizer)
        assert tiny_tokenizer.decode(list(p.ids)) == "<user>the model\n<assistant>"
        assert tiny_tokenizer.decode(list(p.completion[:-1])) == "learns" and p.completion[-1] == tiny_tokenizer.eos_token_id
    finally:
        tiny_tokenizer.chat_template = None


# -- sampling ----------------------------------------------------------------------------------


def test_top_p_keeps_the_smallest_nucleus():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    assert torch.allclose(filter_top_p(probs, 0.7), torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    assert torch.allclose(filter_top_p(probs, 0.5), torch.tensor([[1.0, 0.0, 0.0, 0.0]]))
    assert torch.equal(filter_top_p(probs, 1.0), probs)


def test_draws_follow_the_distribution():
    from distil.models.generate import _draw

    probs = torch.tensor([[0.1, 0.0, 0.45, 0.05, 0.4]]).expand(40000, 5).contiguous()
    tokens = _draw(probs, torch.Generator().manual_seed(0))[:, 0]
    freq = torch.bincount(tokens, minlength=5).double() / len(tokens)
    se = (probs[0].double() * (1 - probs[0].double()) / len(tokens)).sqrt()
    assert freq[1] == 0 and torch.all((freq - probs[0]).abs() <= 4 * se + 1e-12), freq


def test_sampling_matches_the_model_and_the_mixture():
    """The recorded log-prob of each drawn token is the sampling distribution's, computed again whole."""
    torch.manual_seed(0)
    model = TransformerLM(ModelConfig(vocab_size=11, d_model=16, n_layers=2, n_heads=2))
    other = TransformerLM(ModelConfig(vocab_size=11, d_model=16, n_layers=1, n_heads=2))
    from distil.hybrid import hybridize

    hybrid = hybridize(model, [1], init="random", d_state=8, chunk_size=4)  # hybrids roll out with their SSM state
    prompt = torch.randint(0, 11, (3, 4))
    for sampler, mix, alpha in ((model, None, 0.0), (model, other, 0.3), (hybrid, None, 0.0), (hybrid, other, 0.5)):
        tokens, logprobs, lengths = sample(sampler, prompt, max_new_tokens=5, generator=torch.Generator().manual_seed(1),
                                           mix_model=mix, mix_alpha=alpha)
        assert tokens.shape == (3, 5) and torch.equal(lengths, torch.full((3,), 5))
        full = torch.cat([prompt, tokens], 1)
        with torch.no_grad():
            probs = torch.softmax(sampler(full)[:, 3:-1], -1)
            if mix is not None:
                probs = alpha * torch.softmax(mix(full)[:, 3:-1], -1) + (1 - alpha) * probs
        expected = probs.gather(-1, tokens[..., None])[..., 0].log()
        assert torch.allclose(logprobs, expected, atol=1e-5)


def test_prompts_of_different_lengths_sample_as_one_batch():
    """Ragged prompts (one batch, attention caches left-padded and masked, SSM states stacked): each
    row's recorded log-probs are those of its own prompt and samples run whole, alone."""
    torch.manual_seed(0)
    model = TransformerLM(ModelConfig(vocab_size=11, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1))
    other = TransformerLM(ModelConfig(vocab_size=11, d_model=16, n_layers=1, n_heads=2))
    from distil.hybrid import hybridize

    hybrid = hybridize(model, [1], init="random", d_state=8, chunk_size=4)
    prompts = [torch.randint(0, 11, (n,)).tolist() for n in (4, 2, 6, 4, 1)]
    for sampler, mix, alpha in ((model, None, 0.0), (model, other, 0.3), (hybrid, None, 0.0), (hybrid, other, 0.5)):
        tokens, logprobs, lengths = sample(sampler, prompts, max_new_tokens=5, generator=torch.Generator().manual_seed(1),
                                           mix_model=mix, mix_alpha=alpha)
        assert tokens.shape == (5, 5) and torch.equal(lengths, torch.full((5,), 5))
        for row, prompt in enumerate(prompts):
            full = torch.tensor([prompt + tokens[row].tolist()])
            n = len(prompt)
            with torch.no_grad():
                probs = torch.softmax(sampler(full)[0, n - 1:-1], -1)
                if mix is not None:
                    probs = alpha * torch.softmax(mix(full)[0, n - 1:-1], -1) + (1 - alpha) * probs
            expected = probs.gather(-1, tokens[row, :, None])[:, 0].log()
            assert torch.allclose(logprobs[row], expected, atol=1e-5), (row, logprobs[row], expected)


# -- losses against float64 references ---------------------------------------------------------


def test_sampled_reverse_kl_gradient_is_the_exact_gradient_in_expectation():
    """Monte Carlo, float64, vocabulary 5, two positions with fixed prefixes: the mean gradient of the
    sampled form over N draws y ~ q is the exact reverse KL's gradient, within 4 standard errors."""
    torch.manual_seed(0)
    vocab, n = 5, 20000
    student = torch.randn(1, 2, vocab, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(1, 2, vocab, dtype=torch.float64)
    q = torch.softmax(student, -1)
    exact = (q * (q.log() - torch.log_softmax(teacher, -1))).sum()
    (g_exact,) = torch.autograd.grad(exact, student)
    draws = torch.multinomial(q.detach().reshape(-1, vocab), n, replacement=True).reshape(2, n).t()  # [n, 2]
    grads = []
    logits = student.expand(n, 2, vocab)
    for chunk in torch.split(torch.arange(n), 2000):
        x = logits[chunk].detach().clone().requires_grad_(True)
        loss = sampled_reverse_kl(x, teacher.expand(len(chunk), 2, vocab), draws[chunk],
                                  torch.ones(len(chunk), 2, dtype=torch.bool))
        (g,) = torch.autograd.grad(loss * len(chunk) * 2, x)  # undo the mean over counted tokens
        grads.append(g)
    g = torch.cat(grads)  # [n, 2, vocab], one draw's gradient each
    mean, se = g.mean(0), g.std(0) / n**0.5
    assert torch.all((mean - g_exact[0]).abs() <= 4 * se + 1e-12), (mean, g_exact, se)
    assert (mean - g_exact[0]).abs().max() < 0.05


def test_sampled_reverse_kl_value_and_gradient_against_the_formula():
    torch.manual_seed(1)
    s = torch.randn(2, 3, 7, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 3, 7, dtype=torch.float64)
    y = torch.randint(0, 7, (2, 3))
    mask = torch.tensor([[False, True, True], [True, True, False]])
    loss = sampled_reverse_kl(s, t, y, mask)
    (grad,) = torch.autograd.grad(loss, s)
    total, count, ref_grad = 0.0, 0, torch.zeros_like(s)
    for b in range(2):
        for i in range(3):
            if mask[b, i]:
                lq = torch.log_softmax(s[b, i].detach(), -1)
                adv = torch.log_softmax(t[b, i], -1)[y[b, i]] - lq[y[b, i]]
                total += float(-adv * lq[y[b, i]])
                onehot = F.one_hot(y[b, i], 7).double()
                ref_grad[b, i] = -adv * (onehot - lq.exp())
                count += 1
    assert loss.item() == pytest.approx(total / count, rel=1e-12)
    assert torch.allclose(grad, ref_grad / count, atol=1e-12)
    # From a server's per-token log-probs instead of logits: the same.
    teacher_lp = torch.log_softmax(t, -1).gather(-1, y[..., None])[..., 0]
    assert sampled_reverse_kl(s, None, y, mask, teacher_token_logprobs=teacher_lp).item() == pytest.approx(loss.item())


def test_minillm_loss_against_a_naive_loop():
    """Eq. (3)-(6) of MiniLLM written out position by position in float64."""
    torch.manual_seed(2)
    s = torch.randn(2, 4, 6, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 4, 6, dtype=torch.float64)
    y = torch.randint(0, 6, (2, 4))
    mask = torch.tensor([[False, True, True, True], [True, True, True, False]])
    mixed_lp = torch.log_softmax(torch.randn(2, 4, 6, dtype=torch.float64), -1).gather(-1, y[..., None])[..., 0]
    loss = minillm_loss(s, t, y, mask, mixed_lp, max_weight=2.0)
    (grad,) = torch.autograd.grad(loss, s)

    def naive(x):
        total, count = 0.0, 0
        for b in range(2):
            positions = [i for i in range(4) if mask[b, i]]
            lq = torch.log_softmax(x[b], -1)
            lp = torch.log_softmax(t[b], -1)
            r = {i: float((lp[i, y[b, i]] - lq[i, y[b, i]]).detach()) for i in positions}
            for i in positions:
                later = [r[j] for j in positions if j > i]
                big_r = sum(later) / len(later) if later else 0.0
                w = min(float((lq[i, y[b, i]] - mixed_lp[b, i]).exp().detach()), 2.0)
                single = (lq[i].exp() * (lq[i] - lp[i])).sum()
                total = total + w * (single - big_r * lq[i, y[b, i]])
                count += 1
        return total / count

    x = s.detach().clone().requires_grad_(True)
    ref = naive(x)
    (ref_grad,) = torch.autograd.grad(ref, x)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-10)
    assert torch.allclose(grad, ref_grad, atol=1e-10)


# -- rollout batches ---------------------------------------------------------------------------


def _setup(cfg, tokenizer):
    return setup(cfg, tokenizer=tokenizer, resume=False)


def test_rollout_batches_mask_the_prompt_and_carry_the_samples(make_cfg, tiny_tokenizer):
    s = _setup(make_cfg("minillm"), tiny_tokenizer)
    assert isinstance(s.batches, RolloutBatches)
    batch = s.batches.next_batch()
    ids, labels = batch["input_ids"], batch["labels"]
    assert ids.shape == labels.shape and ids.shape[0] == 4
    prompts = s.batches.prompts
    index = s.batches.sampler._order[:2]  # this step's prompts, two generations each
    for row in range(4):
        prompt = prompts[int(index[row // 2])].ids
        p = len(prompt)
        assert ids[row, :p].tolist() == list(prompt)
        assert (labels[row, : p - 1] == -100).all()  # no prompt token is ever a target
        counted = labels[row] != -100
        assert counted[p - 1]  # the last prompt position predicts the first completion token
        completion = labels[row][counted]
        assert ids[row, p : p + len(completion) - 1].tolist() == completion[:-1].tolist()
        assert (batch["sample_logprobs"][row][counted] < 0).all() and (batch["sample_logprobs"][row][~counted] == 0).all()
    assert batch["loss_scale"] == pytest.approx(1.0)
    # The loop counts the rows' real tokens (prompt + completion), not train.batch_size x data.seq_len.
    expected = sum(len(prompts[int(index[row // 2])].ids) + int((labels[row] != -100).sum()) for row in range(4))
    assert s.batches.step_tokens == expected


def test_prompt_tokens_carry_no_loss(make_cfg, tiny_tokenizer):
    """The loss of a rollout batch equals the formula over completion positions only; counting the
    prompt's positions too (the mutation) changes it."""
    from distil.train.loop import compute_loss

    cfg = make_cfg("on_policy_rkl", rollout={"exact": True}, loss={"fused": False})
    s = _setup(cfg, tiny_tokenizer)
    batch = s.batches.next_batch()
    loss = compute_loss(s.model, s.teacher, batch, s.loss)
    with torch.no_grad():
        q = torch.log_softmax(s.student(batch["input_ids"]), -1)
        p = torch.log_softmax(s.teacher.model(batch["input_ids"]), -1)
        per_token = (q.exp() * (q - p)).sum(-1)
    counted = batch["labels"] != -100
    assert loss.item() == pytest.approx(per_token[counted].mean().item(), rel=1e-5)
    real_tokens = torch.zeros_like(counted)
    for row in range(counted.shape[0]):
        real_tokens[row, : counted[row].nonzero().max() + 1] = True
    assert abs(per_token[real_tokens].mean().item() - loss.item()) > 1e-4  # prompt positions would count


def test_gkd_with_lmbda_zero_is_the_off_policy_run_bit_for_bit(make_cfg, tiny_tokenizer, tmp_path):
    off = run_training(make_cfg("off", loss={"kind": "jsd", "beta": 0.3}), tmp_path / "off",
                       tokenizer=tiny_tokenizer).result
    gkd = run_training(make_cfg("gkd", loss={"kind": "jsd", "beta": 0.3}, rollout={"lmbda": 0.0}), tmp_path / "gkd",
                       tokenizer=tiny_tokenizer).result
    assert [h["loss"] for h in off.history] == [h["loss"] for h in gkd.history]
    assert [h["grad_norm"] for h in off.history] == [h["grad_norm"] for h in gkd.history]
    for a, b in zip(off.student.parameters(), gkd.student.parameters()):
        assert torch.equal(a, b)
    on = run_training(make_cfg("gkd", loss={"kind": "jsd", "beta": 0.3}, rollout={"lmbda": 1.0}), tmp_path / "on",
                      tokenizer=tiny_tokenizer).result
    assert [h["loss"] for h in on.history] != [h["loss"] for h in off.history]


@pytest.mark.parametrize("policy,rollout", [("off", {}), ("gkd", {"lmbda": 1.0}), ("gkd", {"seq_kd": True, "lmbda": 0.0}),
                                            ("on_policy_rkl", {}), ("on_policy_rkl", {"exact": True}),
                                            ("minillm", {})])
def test_gradient_accumulation_one_by_b_equals_k_by_b_over_k(make_cfg, tiny_tokenizer, policy, rollout):
    grads = []
    for batch_size, accum in ((4, 1), (2, 2)):
        cfg = make_cfg(policy, rollout=rollout, train={"batch_size": batch_size, "grad_accum": accum})
        s = _setup(cfg, tiny_tokenizer)
        train_step(s, lr=0.0)
        grads.append(torch.cat([p.grad.flatten() for p in s.student.parameters() if p.grad is not None]))
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-7), (grads[0] - grads[1]).abs().max()


def test_a_resumed_run_draws_the_same_samples(make_cfg, tiny_tokenizer, tmp_path):
    cfg = make_cfg("on_policy_rkl", train={"steps": 4, "checkpoint_every": 2, "keep_checkpoints": 5})
    whole = run_training(cfg, tmp_path / "whole", tokenizer=tiny_tokenizer).result
    # A copy of the run folder as a kill after step 2 leaves it: resumed, it must end the same.
    cut = tmp_path / "cut"
    shutil.copytree(tmp_path / "whole", cut)
    for path in cut.joinpath("checkpoints").iterdir():
        if path.name != "step_00000002":
            shutil.rmtree(path)
    (cut / "summary.json").unlink()
    resumed = run_training(cfg, cut, resume=True, tokenizer=tiny_tokenizer).result
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in whole.history]
    for a, b in zip(whole.student.parameters(), resumed.student.parameters()):
        assert torch.equal(a, b)


def test_bad_on_policy_configs_are_one_clear_error(make_cfg, teacher_dir, tmp_path):
    with pytest.raises(DistilError, match="rollout.prompts"):
        config_from_dict({"teacher": {"source": "model", "path": teacher_dir}, "loss": {"policy": "gkd"}})
    with pytest.raises(DistilError, match="teacher.source must be 'model'"):
        config_from_dict({"teacher": {"source": "none"}, "loss": {"policy": "minillm", "kd_weight": 0.0,
                                                                   "ce_weight": 1.0},
                          "rollout": {"prompts": "corpus:topics"}})
    with pytest.raises(DistilError, match="lie in"):
        config_from_dict({"teacher": {"source": "model", "path": teacher_dir}, "rollout": {"top_p": 1.5}})
    with pytest.raises(DistilError, match="num_generations"):
        setup(make_cfg("on_policy_rkl", rollout={"num_generations": 3}), resume=False)
    (tmp_path / "p.jsonl").write_text('{"prompt": "the model"}\n{"prompt": "the loss"}\n')
    with pytest.raises(DistilError, match="completions"):
        setup(make_cfg("gkd", rollout={"lmbda": 0.5, "prompts": str(tmp_path / "p.jsonl")}), resume=False)


def test_a_server_teacher_grades_the_samples_like_the_model(make_cfg, teacher_dir, tiny_tokenizer, tmp_path):
    """A fake OpenAI-compatible server on 127.0.0.1 serves the same model: on-policy reverse KL from its
    echoed token log-probs equals the in-process teacher's; GKD forward KL uses its top-k + tail."""
    from distil.models import load
    from test_api_teacher import FakeOpenAI

    server = FakeOpenAI(load(teacher_dir).eval(), tiny_tokenizer)
    try:
        api = {"base": server.url, "model": "tiny", "cache": None}
        local = run_training(make_cfg("on_policy_rkl"), tmp_path / "local", tokenizer=tiny_tokenizer).result
        cfg = make_cfg("on_policy_rkl")
        remote_cfg = config_from_dict({**cfg.to_dict(), "teacher": {"source": "api"}, "api": api})
        remote = run_training(remote_cfg, tmp_path / "remote", tokenizer=tiny_tokenizer).result
        assert [h["loss"] for h in remote.history] == pytest.approx([h["loss"] for h in local.history], rel=1e-4)
        gkd = config_from_dict({**make_cfg("gkd", loss={"kind": "forward_kl"}).to_dict(), "teacher": {"source": "api"},
                                "api": {**api, "topk": 5}})
        result = run_training(gkd, tmp_path / "gkd", tokenizer=tiny_tokenizer).result
        assert all(torch.isfinite(torch.tensor(h["loss"])) for h in result.history) and server.requests > 0
        with pytest.raises(DistilError, match="on_policy_rkl"):
            config_from_dict({**make_cfg("gkd").to_dict(), "teacher": {"source": "api"}, "api": api})
    finally:
        server.close()


@pytest.mark.slow
def test_on_policy_training_lowers_kl_on_own_samples(run_config, tiny_tokenizer, tiny_docs, tmp_path):
    """The point of on-policy distillation, small: a teacher trained on the tiny corpus; two copies of a
    student trained for the same steps on the same prompts, on the dataset's continuations or on
    their own samples. On their own samples of held-out prompts, twice as long as in training, the
    on-policy student is closer to the teacher (benchmarks/on_policy.py does this on SmolLM2)."""
    from distil.eval.on_policy import kl_on_own_samples

    base = run_config()
    teacher_cfg = config_from_dict(with_sections(base, student={"d_model": 48, "n_layers": 2, "n_heads": 2},
                                                 train={"steps": 60, "batch_size": 8, "val_every": 0}))
    teacher = run_training(teacher_cfg, tmp_path / "teacher", tokenizer=tiny_tokenizer).result.student.eval()
    from distil.models.io import save_native

    save_native(teacher, tmp_path / "teacher-model", tokenizer=tiny_tokenizer)
    lines = [json.dumps({"prompt": " ".join(d.split()[:4]), "completion": " " + " ".join(d.split()[4:12])})
             for d in tiny_docs]
    (tmp_path / "train.jsonl").write_text("\n".join(lines[:48]) + "\n")
    (tmp_path / "held.jsonl").write_text("\n".join(lines[48:]) + "\n")
    held_out = load_prompts(tmp_path / "held.jsonl", tiny_tokenizer)
    kl = {}
    for policy in ("off", "on_policy_rkl"):
        cfg = config_from_dict(with_sections(
            base, teacher={"source": "model", "path": str(tmp_path / "teacher-model")},
            student={"d_model": 32, "n_layers": 1, "n_heads": 2, "max_seq_len": 128},
            loss={"kind": "reverse_kl", "kd_weight": 1.0, "ce_weight": 0.0, "policy": policy},
            rollout={"prompts": str(tmp_path / "train.jsonl"), "max_new_tokens": 8, "exact": True},
            train={"steps": 40, "batch_size": 8, "lr": 1e-2, "val_every": 0}))
        student = run_training(cfg, tmp_path / policy, tokenizer=tiny_tokenizer).result.student
        kl[policy] = kl_on_own_samples(student, teacher, held_out, max_new_tokens=16, seed=5)["reverse_kl"]
    assert kl["on_policy_rkl"] < kl["off"], kl


@pytest.mark.slow
def test_two_processes_roll_out_like_one(teacher_dir, tmp_path, tiny_corpus_file):
    """Under torchrun each process takes every other prompt of the step; with prompts and completions of
    equal length (every process counts the same tokens) two processes train exactly like one."""
    import subprocess
    import sys

    import yaml

    from distil.run_dir import read_metrics

    cfg = {"teacher": {"source": "model", "path": teacher_dir},
           "student": {"d_model": 32, "n_layers": 1, "n_heads": 2, "max_seq_len": 64},
           "data": {"source": "jsonl", "path": str(tiny_corpus_file), "seq_len": 32, "val_fraction": 0.2,
                    "token_cache": None},
           "loss": {"kind": "reverse_kl", "kd_weight": 1.0, "ce_weight": 0.0, "policy": "gkd"},
           "rollout": {"prompts": "corpus:passages", "prompt_tokens": 8, "completion_tokens": 8, "limit": 64,
                       "lmbda": 0.0},
           "train": {"steps": 4, "batch_size": 8, "lr": 1e-2, "warmup_steps": 1, "log_every": 1, "val_every": 0,
                     "progress": False, "device": "cpu"},
           "eval": {"val_batches": 1}}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**__import__("os").environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    runs = {}
    for name, launcher in (("one", [sys.executable, "-m", "distil"]),
                           ("two", [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                                    "2", "-m", "distil"])):
        out = subprocess.run([*launcher, "train", str(path), "--run-dir", str(tmp_path / name)], capture_output=True,
                             text=True, env=env, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        runs[name] = [r["value"] for r in read_metrics(tmp_path / name / "metrics.jsonl")
                      if r["split"] == "train" and r["name"] == "loss"]
    assert len(runs["one"]) == 4 and runs["two"] == pytest.approx(runs["one"], rel=1e-5)
