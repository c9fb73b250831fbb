"""Closed-form per-token losses and logit gradients, shared by the fused and the parallel losses.

Every softmax-based divergence L(p_s) has the logit gradient

    dL/dz_j = h_j - p_s_j * sum_v h_v,      h_v = p_s_v * dL/dp_s_v

so each kind only defines its loss and ``h`` (below, derived by hand and checked against autograd
on ``kd_loss`` in tests/test_losses.py). ``h`` may differ from the table by a per-token multiple of
p_s, which leaves the gradient unchanged (jsd uses this). Under vocabulary parallelism ``sum_v h_v`` is the one
extra all-reduce. Compared with autograd this skips saving and replaying a dozen [tokens x vocab]
intermediates.

=================  ========================================================================
forward_kl         L = sum p_t (lp_t - lp_s)             h = -p_t
reverse_kl         L = sum p_s (lp_s - lp_t)             h = p_s (lp_s - lp_t + 1)
jsd                m = b p_t + (1-b) p_s                 h = (1-b) p_s (lp_s - lm)
skew_forward_kl    r = a p_t + (1-a) p_s                 h = -(1-a) p_s p_t / r
skew_reverse_kl    r = a p_s + (1-a) p_t                 h = p_s (lp_s - lr + 1 - a p_s / r)
tvd                L = 1/2 sum |p_t - p_s|               h = 1/2 p_s sign(p_s - p_t)
=================  ========================================================================
"""

from __future__ import annotations

import math

import torch

from distil.losses.divergences import LOG_FLOOR


def divergence_and_h(logp_s: torch.Tensor, logp_t: torch.Tensor, kind: str, *, beta: float, skew: float):
    """Per-token partial loss (a sum over the given vocabulary columns), h, and p_s, for the columns given.

    ``logp_*`` are (clamped) log-probabilities over the full vocabulary or one rank's slice of it.
    """
    p_t, p_s = logp_t.exp(), logp_s.exp()
    if kind == "forward_kl":
        loss = torch.linalg.vecdot(p_t, logp_t - logp_s)
        return loss, p_t.neg_(), p_s
    if kind == "reverse_kl":
        diff = logp_s - logp_t
        return torch.linalg.vecdot(p_s, diff), p_s * diff.add_(1.0), p_s
    if kind == "jsd":
        # log m from the probabilities already at hand: one log instead of logaddexp's exp + log1p.
        # Only terms with p ~ 0 lose relative precision, and those are weighted by p. With
        # c = log(1 - b), m = (1 - b)(p_s + b/(1 - b) p_t), so log m = L + c from one fused add and
        # an in-place log; the constant c is folded into the sums (few [tokens x vocab] passes).
        c = math.log1p(-beta)
        big_l = torch.add(p_s, p_t, alpha=beta / (1.0 - beta)).log_().clamp_min_(LOG_FLOOR - c)
        diff_s = logp_s - big_l  # log p_s - log m + c
        loss = (beta * (torch.linalg.vecdot(p_t, logp_t) - torch.linalg.vecdot(p_t, big_l) - c * p_t.sum(-1))
                + (1.0 - beta) * (torch.linalg.vecdot(p_s, diff_s) - c * p_s.sum(-1)))
        # h = (1 - b) p_s (log p_s - log m) + (1 - b) c p_s: the last term, a multiple of p_s, cancels
        # in the softmax gradient h - p_s sum(h) (sum p_s = 1 over the whole vocabulary).
        return loss, diff_s.mul_(p_s).mul_(1.0 - beta), p_s
    if kind == "skew_forward_kl":
        log_r = _log_prob_mix(p_t, p_s, skew)
        h = (p_s * p_t).div_(torch.exp(log_r)).nan_to_num_(0.0).mul_(-(1.0 - skew))
        return torch.linalg.vecdot(p_t, logp_t - log_r), h, p_s
    if kind == "skew_reverse_kl":
        log_r = _log_prob_mix(p_s, p_t, skew)
        diff = logp_s - log_r
        ratio = torch.exp(diff.clamp_max(0.0 if skew == 0 else -math.log(skew)))
        return torch.linalg.vecdot(p_s, diff), p_s * (diff + 1.0 - skew * ratio), p_s
    if kind == "tvd":
        diff = p_s - p_t
        return 0.5 * diff.abs().sum(-1), 0.5 * p_s * torch.sign(diff), p_s
    raise ValueError(f"no closed form for kind {kind!r}")


def _log_prob_mix(p_a: torch.Tensor, p_b: torch.Tensor, weight_a: float) -> torch.Tensor:
    """log(weight_a * p_a + (1 - weight_a) * p_b), clamped to the finite floor where it is 0."""
    return torch.log(p_a * weight_a + p_b * (1.0 - weight_a)).clamp_min_(LOG_FLOOR)


def softmax_grad(p_s: torch.Tensor, h: torch.Tensor, h_sum: torch.Tensor) -> torch.Tensor:
    """dL/dz = h - p_s * sum(h), written in place into h."""
    return h.addcmul_(p_s, h_sum.unsqueeze(-1), value=-1.0)


def mse_and_grad(student_z: torch.Tensor, teacher_z: torch.Tensor, count: torch.Tensor | None = None):
    """Partial sum of squares over the given columns / count, and its gradient. ``count`` defaults
    to the finite columns here (the parallel form passes the global count)."""
    finite = torch.isfinite(student_z) & torch.isfinite(teacher_z)
    diff = torch.where(finite, student_z - teacher_z, torch.zeros((), dtype=student_z.dtype, device=student_z.device))
    if count is None:
        count = finite.sum(-1).clamp_min(1)
    count = count.to(diff.dtype).unsqueeze(-1)
    return (diff.pow(2) / count).sum(-1), 2.0 * diff / count
