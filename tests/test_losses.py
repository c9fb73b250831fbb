"""Losses against a naive float64 formula (values and gradients), fused against materialised, properties."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from distil.errors import DistilError
from distil.losses import KINDS, cross_entropy, fused_linear_kd_loss, kd_loss, topk_kd_loss

pytestmark = pytest.mark.numerics  # CI runs these again under ATEN_CPU_CAPABILITY=default

torch.manual_seed(0)


def naive(student, teacher, kind, *, beta=0.5, skew=0.1, temperature=1.0):
    """Per-token divergence written straight from the definitions, in float64, with explicit loops
    over nothing clever: probabilities, then the formula."""
    s, t = student.double() / temperature, teacher.double() / temperature
    if kind == "mse":
        return ((s - t) ** 2).mean(-1)
    ps, pt = torch.softmax(s, -1), torch.softmax(t, -1)

    def kl(p, q):
        return (p * (p.log() - q.log())).sum(-1)

    if kind == "forward_kl":
        return kl(pt, ps)
    if kind == "reverse_kl":
        return kl(ps, pt)
    if kind == "jsd":
        m = beta * pt + (1 - beta) * ps
        return beta * kl(pt, m) + (1 - beta) * kl(ps, m)
    if kind == "skew_forward_kl":
        return kl(pt, skew * pt + (1 - skew) * ps)
    if kind == "skew_reverse_kl":
        return kl(ps, skew * ps + (1 - skew) * pt)
    if kind == "tvd":
        return 0.5 * (pt - ps).abs().sum(-1)
    raise AssertionError(kind)


def logits(*shape, scale=3.0, dtype=torch.float64):
    return (torch.randn(*shape, dtype=dtype) * scale).requires_grad_()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_values_and_gradients_match_naive_float64(kind, temperature):
    s, t = logits(4, 5, 11), logits(4, 5, 11)
    mask = torch.rand(4, 5) > 0.3
    ours = kd_loss(s, t, kind, temperature=temperature, mask=mask, beta=0.3, skew=0.2)
    ref = naive(s, t, kind, temperature=temperature, beta=0.3, skew=0.2)[mask].mean()
    torch.testing.assert_close(ours, ref, atol=1e-12, rtol=1e-10)
    g_ours = torch.autograd.grad(ours, (s, t))
    g_ref = torch.autograd.grad(ref, (s, t))
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-9)


@pytest.mark.parametrize("kind", KINDS)
def test_gradcheck_float64(kind):
    s, t = logits(3, 7, scale=1.0), logits(3, 7, scale=1.0)
    assert torch.autograd.gradcheck(lambda a, b: kd_loss(a, b, kind, temperature=1.7), (s, t))


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "soft_ce"])
@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
def test_topk_gradcheck_float64(kind, tail):
    s = logits(3, 9, scale=1.0)
    lp, ids = torch.log_softmax(torch.randn(3, 9, dtype=torch.float64), -1).topk(4, -1)
    assert torch.autograd.gradcheck(lambda a: topk_kd_loss(a, ids, lp, kind, tail=tail, temperature=1.3), (s,))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reductions_and_mask(reduction):
    s, t = logits(2, 6, 10), logits(2, 6, 10)
    mask = torch.tensor([[True, False, True, True, False, True], [False] * 6])
    per_token = naive(s, t, "forward_kl")
    out = kd_loss(s, t, mask=mask, reduction=reduction)
    if reduction == "none":
        torch.testing.assert_close(out, torch.where(mask, per_token, 0.0))
    elif reduction == "sum":
        torch.testing.assert_close(out, per_token[mask].sum())
    else:
        torch.testing.assert_close(out, per_token[mask].mean())


@pytest.mark.parametrize("kind", KINDS)
def test_all_masked_mean_is_zero_not_nan(kind):
    s, t = logits(3, 8), logits(3, 8)
    out = kd_loss(s, t, kind, mask=torch.zeros(3, dtype=torch.bool))
    assert out.item() == 0.0
    out.backward()
    assert torch.isfinite(s.grad).all() and (s.grad == 0).all()


def test_jsd_beta_end_points_are_rejected_with_a_pointer():
    s, t = torch.randn(2, 5), torch.randn(2, 5)
    with pytest.raises(DistilError, match="reverse_kl"):
        kd_loss(s, t, "jsd", beta=0.0)
    with pytest.raises(DistilError, match="forward_kl"):
        kd_loss(s, t, "jsd", beta=1.0)


def test_jsd_beta_direction():
    # Near beta -> 1, m -> p_t and the (1 - beta) KL(p_s || m) term dominates the scaled loss:
    # jsd / (1 - beta) -> KL(p_s || p_t) = reverse KL. Near 0 it tends to forward KL / beta.
    # The correction is O(eps * max p_s / p_t), so moderate logits and a small eps.
    s, t = logits(4, 9, scale=1.0), logits(4, 9, scale=1.0)
    eps = 1e-8
    torch.testing.assert_close(kd_loss(s, t, "jsd", beta=1 - eps) / eps, kd_loss(s, t, "reverse_kl"), rtol=1e-5, atol=0)
    torch.testing.assert_close(kd_loss(s, t, "jsd", beta=eps) / eps, kd_loss(s, t, "forward_kl"), rtol=1e-5, atol=0)


def test_skew_zero_is_plain_kl():
    s, t = logits(4, 9), logits(4, 9)
    torch.testing.assert_close(kd_loss(s, t, "skew_forward_kl", skew=0.0), kd_loss(s, t, "forward_kl"))
    torch.testing.assert_close(kd_loss(s, t, "skew_reverse_kl", skew=0.0), kd_loss(s, t, "reverse_kl"))


@pytest.mark.parametrize("kind", KINDS)
def test_large_logits_and_minus_inf_stay_finite(kind):
    s = torch.randn(4, 16, dtype=torch.float32) * 1e4
    t = torch.randn(4, 16, dtype=torch.float32) * 1e4
    s[:, -3:] = -math.inf  # padded vocabulary, masked on both sides
    t[:, -3:] = -math.inf
    s.requires_grad_()
    out = kd_loss(s, t, kind)
    out.backward()
    assert torch.isfinite(out)
    assert torch.isfinite(s.grad).all()
    ref = kd_loss(s.detach()[:, :-3].double(), t[:, :-3].double(), kind)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-3)


def test_padded_vocab_is_masked_not_rejected():
    s, t = logits(3, 40), logits(3, 40)
    s_padded = torch.cat([s, torch.randn(3, 8, dtype=torch.float64)], -1)  # student has 8 padding rows
    torch.testing.assert_close(kd_loss(s_padded, t), kd_loss(s, t))
    with pytest.raises(DistilError, match="40.*4000|4000.*40"):
        kd_loss(torch.randn(3, 4000), torch.randn(3, 40))


def test_softcap_matches_naive():
    s, t = logits(3, 12, scale=20.0), logits(3, 12, scale=20.0)
    cap = 5.0
    ours = kd_loss(s, t, "forward_kl", logit_softcap=cap)
    ref = naive(cap * torch.tanh(s / cap), cap * torch.tanh(t / cap), "forward_kl").mean()
    torch.testing.assert_close(ours, ref)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", KINDS)
def test_half_precision_inputs_compute_in_fp32(dtype, kind):
    s, t = torch.randn(64, 100) * 4, torch.randn(64, 100) * 4
    s_half, t_half = s.to(dtype), t.to(dtype)
    ref = kd_loss(s_half.float(), t_half.float(), kind)  # same rounded inputs, fp32 maths
    out = kd_loss(s_half, t_half, kind)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    # Against unrounded fp32 inputs the only error is the input rounding (bf16: 8 bits of mantissa).
    torch.testing.assert_close(out, kd_loss(s, t, kind), rtol=0.05, atol=0.05 if kind == "mse" else 0.02)


# ---------------------------------------------------------------------------------------------
# top-k


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_topk_with_k_equal_v_equals_full_loss(kind, temperature):
    s, t = logits(3, 4, 17), logits(3, 4, 17)
    lp, ids = torch.log_softmax(t / temperature, -1).topk(17, -1)
    full = kd_loss(s, t, kind, temperature=temperature)
    top = topk_kd_loss(s, ids, lp, kind, temperature=temperature)
    torch.testing.assert_close(top, full, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(torch.autograd.grad(top, s)[0], torch.autograd.grad(full, s)[0], atol=1e-12, rtol=1e-9)


def test_topk_bucket_matches_naive_k_plus_one_support():
    s, t = logits(5, 30), logits(5, 30)
    k = 6
    pt = torch.softmax(t, -1)
    lp, ids = pt.log().topk(k, -1)
    ps = torch.softmax(s, -1)
    ps_k = ps.gather(-1, ids)
    pt_k = pt.gather(-1, ids)
    ps_b = torch.cat([ps_k, 1 - ps_k.sum(-1, keepdim=True)], -1)
    pt_b = torch.cat([pt_k, 1 - pt_k.sum(-1, keepdim=True)], -1)
    fkl = (pt_b * (pt_b.log() - ps_b.log())).sum(-1).mean()
    rkl = (ps_b * (ps_b.log() - pt_b.log())).sum(-1).mean()
    ce = -(pt_b * ps_b.log()).sum(-1).mean()
    torch.testing.assert_close(topk_kd_loss(s, ids, lp, "forward_kl"), fkl)
    torch.testing.assert_close(topk_kd_loss(s, ids, lp, "reverse_kl"), rkl)
    torch.testing.assert_close(topk_kd_loss(s, ids, lp, "soft_ce"), ce)


def test_topk_renormalize_matches_naive():
    s, t = logits(5, 30), logits(5, 30)
    lp, ids = torch.log_softmax(t, -1).topk(6, -1)
    ps = torch.softmax(s.gather(-1, ids), -1)
    pt = torch.softmax(lp, -1)
    torch.testing.assert_close(topk_kd_loss(s, ids, lp, "forward_kl", tail="renormalize"),
                               (pt * (pt.log() - ps.log())).sum(-1).mean())
    torch.testing.assert_close(topk_kd_loss(s, ids, lp, "soft_ce", tail="renormalize"), -(pt * ps.log()).sum(-1).mean())


def test_topk_absent_entries_count_as_tail():
    s, t = logits(2, 20), logits(2, 20)
    lp, ids = torch.log_softmax(t, -1).topk(5, -1)
    dropped_ids, dropped_lp = ids.clone(), lp.clone()
    dropped_ids[:, -1] = -1  # an entry that did not map onto the student's vocabulary
    out = topk_kd_loss(s, dropped_ids, dropped_lp, "forward_kl")
    ref = topk_kd_loss(s, ids[:, :4], lp[:, :4], "forward_kl")
    torch.testing.assert_close(out, ref)


def test_topk_bad_input():
    s = torch.randn(2, 10)
    with pytest.raises(DistilError, match="larger than the vocabulary"):
        topk_kd_loss(s, torch.zeros(2, 11, dtype=torch.long), torch.zeros(2, 11))
    with pytest.raises(DistilError, match="tail"):
        topk_kd_loss(s, torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3), tail="drop")


# ---------------------------------------------------------------------------------------------
# fused


def _fused_case(n=37, hidden=16, vocab=50, student_pad=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    h = torch.randn(n, hidden, dtype=dtype, generator=g).requires_grad_()
    w = torch.randn(vocab + student_pad, hidden, dtype=dtype, generator=g).requires_grad_()
    th = torch.randn(n, hidden + 3, dtype=dtype, generator=g)
    tw = torch.randn(vocab, hidden + 3, dtype=dtype, generator=g)
    labels = torch.randint(0, vocab, (n,), generator=g)
    labels[::7] = -100
    mask = torch.rand(n, generator=g) > 0.25
    return h, w, th, tw, labels, mask


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("options", [dict(), dict(ce_weight=0.7), dict(temperature=2.0, ce_weight=0.4),
                                     dict(logit_softcap=4.0, ce_weight=1.0), dict(student_pad=5, ce_weight=0.2)])
def test_fused_equals_materialised(kind, options):
    options = dict(options)
    h, w, th, tw, labels, mask = _fused_case(student_pad=options.pop("student_pad", 0))
    ce_weight = options.get("ce_weight", 0.0)
    temperature, cap = options.get("temperature", 1.0), options.get("logit_softcap")
    student_logits, teacher_logits = h @ w.t(), th @ tw.t()
    ref = kd_loss(student_logits, teacher_logits, kind, temperature=temperature, mask=mask, logit_softcap=cap)
    if ce_weight:
        ref = ref + ce_weight * cross_entropy(student_logits, labels, mask=mask, logit_softcap=cap)
    fused = fused_linear_kd_loss(h, w, th, tw, kind=kind, labels=labels, chunk_size=8, mask=mask, **options)
    torch.testing.assert_close(fused, ref, atol=1e-12, rtol=1e-10)
    for a, b in zip(torch.autograd.grad(fused, (h, w)), torch.autograd.grad(ref, (h, w))):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-9)


def test_forward_kl_at_t1_takes_the_in_place_chunk(monkeypatch):
    """Forward KL at T = 1 without a soft-cap (the common case) runs in three [chunk x V] buffers;
    test_fused_equals_materialised holds its values and gradients to the materialised loss."""
    import distil.losses.fused as fused

    calls = []
    original = fused._forward_kl_chunk_in_place
    monkeypatch.setattr(fused, "_forward_kl_chunk_in_place", lambda *a, **k: calls.append(1) or original(*a, **k))
    h, w, th, tw, labels, mask = _fused_case()
    fused_linear_kd_loss(h, w, th, tw, labels=labels, ce_weight=0.5, chunk_size=8, mask=mask)
    chunks = -(-int(mask.sum()) // 8)  # masked tokens leave the loss; the rest in chunks of 8
    assert len(calls) == chunks
    fused_linear_kd_loss(h, w, th, tw, labels=labels, chunk_size=8, temperature=2.0)
    fused_linear_kd_loss(h, w, th, tw, kind="reverse_kl", chunk_size=8)
    assert len(calls) == chunks  # other settings take the general path


@pytest.mark.parametrize("case", ["forward_kl", "forward_kl, bias", "reverse_kl", "top-k bucket"])
def test_cpu_chunks_reuse_their_blocks(monkeypatch, case):
    """On CPU the [chunk x V] blocks are made once per call, whatever the number of chunks
    (losses.fused.Workspace); test_fused_equals_materialised and test_fused_topk_equals_materialised
    hold the values of those many-chunk calls to the materialised loss."""
    import distil.losses.fused as fused

    made = []
    original = fused.Workspace.__call__

    def spy(self, name, numel):
        before = self.blocks.get(name)
        block = original(self, name, numel)
        if block is not before:
            made.append(name)
        return block

    monkeypatch.setattr(fused.Workspace, "__call__", spy)
    h, w, th, tw, labels, _ = _fused_case(n=70)  # 70 tokens in chunks of 8: nine chunks, the last short
    if case == "top-k bucket":
        lp, ids = torch.log_softmax(th @ tw.t(), -1).topk(7, -1)
        fused_linear_kd_loss(h, w, teacher_topk=(ids, lp), labels=labels, ce_weight=0.5, chunk_size=8)
        assert made == ["student"]
        return
    kind = case.split(",")[0]
    bias = dict(student_bias=torch.randn(w.shape[0], dtype=w.dtype), teacher_bias=torch.randn(tw.shape[0],
                dtype=tw.dtype)) if "bias" in case else {}
    loss = fused_linear_kd_loss(h, w, th, tw, kind=kind, labels=labels, ce_weight=0.5, chunk_size=8, **bias)
    assert sorted(made) == (["scratch", "student", "teacher"] if kind == "forward_kl" else ["student", "teacher"])
    if bias:
        student, teacher = h @ w.t() + bias["student_bias"], th @ tw.t() + bias["teacher_bias"]
        ref = kd_loss(student, teacher, kind) + 0.5 * cross_entropy(student, labels)
        torch.testing.assert_close(loss, ref, atol=1e-12, rtol=1e-10)


def test_fused_backward_scales_and_hands_over_once():
    """backward hands the fused loss's gradients over (scaled in place when the loss is scaled);
    a second backward through the same loss is refused in one line, not answered with stale values."""
    h, w, th, tw, labels, mask = _fused_case()
    once = torch.autograd.grad(fused_linear_kd_loss(h, w, th, tw, labels=labels, ce_weight=0.5, chunk_size=8,
                                                    mask=mask), (h, w))
    loss = fused_linear_kd_loss(h, w, th, tw, labels=labels, ce_weight=0.5, chunk_size=8, mask=mask)
    scaled = torch.autograd.grad(3.0 * loss, (h, w), retain_graph=True)
    for a, b in zip(scaled, once):
        torch.testing.assert_close(a, 3.0 * b, atol=1e-12, rtol=1e-12)
    with pytest.raises(DistilError, match="second backward"):
        torch.autograd.grad(loss, (h, w))


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "soft_ce"])
@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
def test_fused_topk_equals_materialised(kind, tail):
    h, w, th, tw, labels, mask = _fused_case()
    lp, ids = torch.log_softmax(th @ tw.t(), -1).topk(7, -1)
    ref = topk_kd_loss(h @ w.t(), ids, lp, kind, tail=tail, mask=mask) + 0.5 * cross_entropy(h @ w.t(), labels, mask=mask)
    fused = fused_linear_kd_loss(h, w, teacher_topk=(ids, lp), kind=kind, tail=tail, labels=labels, ce_weight=0.5,
                                 chunk_size=10, mask=mask)
    torch.testing.assert_close(fused, ref, atol=1e-12, rtol=1e-10)
    for a, b in zip(torch.autograd.grad(fused, (h, w)), torch.autograd.grad(ref, (h, w))):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-9)


def test_fused_bias_and_3d_shapes():
    g = torch.Generator().manual_seed(2)
    h = torch.randn(2, 9, 8, dtype=torch.float64, generator=g).requires_grad_()
    w = torch.randn(20, 8, dtype=torch.float64, generator=g).requires_grad_()
    b = torch.randn(20, dtype=torch.float64, generator=g).requires_grad_()
    th, tw = torch.randn(2, 9, 8, dtype=torch.float64, generator=g), torch.randn(20, 8, dtype=torch.float64, generator=g)
    tb = torch.randn(20, dtype=torch.float64, generator=g)
    ref = kd_loss(h @ w.t() + b, th @ tw.t() + tb, "reverse_kl")
    fused = fused_linear_kd_loss(h, w, th, tw, student_bias=b, teacher_bias=tb, kind="reverse_kl", chunk_size=4)
    torch.testing.assert_close(fused, ref)
    for x, y in zip(torch.autograd.grad(fused, (h, w, b)), torch.autograd.grad(ref, (h, w, b))):
        torch.testing.assert_close(x, y)


def test_fused_all_masked_is_zero():
    h, w, th, tw, labels, _ = _fused_case()
    out = fused_linear_kd_loss(h, w, th, tw, mask=torch.zeros(h.shape[0], dtype=torch.bool), labels=labels, ce_weight=1.0)
    out.backward()
    assert out.item() == 0.0 and (h.grad == 0).all()


def test_fused_bf16_close_to_fp32():
    h, w, th, tw, labels, _ = _fused_case(n=64, hidden=32, vocab=300, dtype=torch.float32)
    ref = fused_linear_kd_loss(h, w, th, tw, labels=labels, ce_weight=0.5, chunk_size=16)
    hb, wb = h.detach().bfloat16().requires_grad_(), w.detach().bfloat16().requires_grad_()
    out = fused_linear_kd_loss(hb, wb, th.bfloat16(), tw.bfloat16(), labels=labels, ce_weight=0.5, chunk_size=16)
    out.backward()
    # bf16 matmuls (8-bit mantissa) feed fp32 loss maths: stated tolerance 2% relative on the loss.
    torch.testing.assert_close(out, ref.detach(), rtol=0.02, atol=0.02)
    assert hb.grad.dtype == torch.bfloat16 and torch.isfinite(hb.grad.float()).all()


# ---------------------------------------------------------------------------------------------
# properties

finite_logits = st.integers(min_value=2, max_value=12).flatmap(
    lambda v: st.tuples(
        st.lists(st.floats(-30, 30, allow_nan=False, width=32), min_size=v, max_size=v),
        st.lists(st.floats(-30, 30, allow_nan=False, width=32), min_size=v, max_size=v),
    )
)


@settings(max_examples=60, deadline=None)
@given(finite_logits, st.sampled_from(KINDS))
def test_divergences_are_nonnegative_and_zero_only_when_equal(pair, kind):
    s, t = (torch.tensor(x, dtype=torch.float64) for x in pair)
    value = kd_loss(s, t, kind).item()
    assert value >= -1e-12
    assert kd_loss(t, t, kind).item() == pytest.approx(0.0, abs=1e-12)
    differ = not torch.allclose(torch.softmax(s, -1), torch.softmax(t, -1), atol=1e-6)
    if kind == "mse":
        differ = not torch.allclose(s, t, atol=1e-6)
    if differ:
        assert value > 0


@settings(max_examples=60, deadline=None)
@given(finite_logits)
def test_jsd_symmetric_at_half_and_tvd_at_most_one(pair):
    s, t = (torch.tensor(x, dtype=torch.float64) for x in pair)
    assert kd_loss(s, t, "jsd", beta=0.5).item() == pytest.approx(kd_loss(t, s, "jsd", beta=0.5).item(), abs=1e-12)
    assert kd_loss(s, t, "tvd").item() <= 1.0 + 1e-12
    assert kd_loss(s, t, "jsd", beta=0.5).item() <= math.log(2) + 1e-12


@settings(max_examples=40, deadline=None)
@given(finite_logits, st.sampled_from(["forward_kl", "reverse_kl"]), st.floats(0.5, 3.0))
def test_topk_k_equals_v_property(pair, kind, temperature):
    s, t = (torch.tensor(x, dtype=torch.float64) for x in pair)
    lp, ids = torch.log_softmax(t / temperature, -1).topk(t.shape[-1], -1)
    full = kd_loss(s, t, kind, temperature=temperature).item()
    assert topk_kd_loss(s, ids, lp, kind, temperature=temperature).item() == pytest.approx(full, abs=1e-9, rel=1e-9)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "soft_ce"])
@pytest.mark.parametrize("case", ["plain", "absent entries", "duplicate ids", "given tail", "k = V", "masked, with CE"])
def test_topk_bucket_closed_form_equals_autograd(kind, case):
    """The closed-form top-k chunk with the tail bucket (fused.py) against autograd through the
    reference top-k functions: values and gradients in float64, edge cases included."""
    from distil.losses.fused import _topk_bucket_chunk, _topk_chunk_autograd

    g = torch.Generator().manual_seed(5)
    n, vocab, k = 12, 40, 6
    z = torch.randn(n, vocab, dtype=torch.float64, generator=g) * 3
    teacher = torch.log_softmax(torch.randn(n, vocab, dtype=torch.float64, generator=g) * 2, -1)
    lp, ids = teacher.topk(vocab if case == "k = V" else k, -1)
    tail = None
    if case == "absent entries":  # a cache's padding: id -1, and one row with no entry at all
        ids, lp = ids.clone(), lp.clone()
        ids[:, -2:], ids[3] = -1, -1
    if case == "duplicate ids":  # an imported file may name a token twice
        ids, lp = ids.clone(), lp.clone()
        ids[:, 1], lp[:, 1] = ids[:, 0], lp[:, 0]
    if case == "given tail":
        tail = torch.log1p(-lp.exp().sum(-1).clamp_max(1 - 1e-12)) + 0.01  # a cache's slightly inexact tail
    labels = torch.randint(0, vocab, (n,), generator=g)
    labels[2] = -100
    mask = torch.ones(n, dtype=torch.bool)
    ce_weight = 0.0
    if case == "masked, with CE":
        mask[[1, 7]] = False
        ce_weight = 0.5
    options = dict(kd_weight=0.7, ce_weight=ce_weight, kd_count=mask.sum().double(), ce_count=torch.tensor(9.0))
    loss, grad = _topk_bucket_chunk(z, (ids, lp, tail), labels, mask, kind=kind, **options)
    ref_loss, ref_grad = _topk_chunk_autograd(z, (ids, lp, tail), labels, mask, kind=kind, temperature=1.0,
                                              softcap=None, tail="bucket", **options)
    torch.testing.assert_close(loss, ref_loss, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(grad, ref_grad, atol=1e-12, rtol=1e-9)
