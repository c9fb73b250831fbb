"""Closed-form per-token losses and logit gradients, shared by the fused and the parallel losses.

Every softmax-based divergence L(p_s) has the logit gradient

    dL/dz_j = h_j - p_s_j * sum_v h_v,      h_v = p_s_v * dL/dp_s_v

so each kind only defines its loss and ``h`` (below, derived by hand and checked against autograd
on ``kd_loss`` in tests/test_losses.py). Under vocabulary parallelism ``sum_v h_v`` is the one
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
    """Per-token partial loss (a sum over the given vocabulary columns) and h, for the columns given.

    ``logp_*`` are (clamped) log-probabilities over the full vocabulary or one rank's slice of it.
    """
    p_t = logp_t.exp()
    if kind == "forward_kl":
        loss = torch.linalg.vecdot(p_t, logp_t - logp_s)
        return loss, p_t.neg_()
    p_s = logp_s.exp()
    if kind == "reverse_kl":
        diff = logp_s - logp_t
        return (p_s * diff).sum(-1), p_s * (diff + 1.0)
    if kind == "jsd":
        log_m = torch.logaddexp(math.log(beta) + logp_t, math.log1p(-beta) + logp_s)
        loss = beta * (p_t * (logp_t - log_m)).sum(-1) + (1.0 - beta) * (p_s * (logp_s - log_m)).sum(-1)
        return loss, (1.0 - beta) * p_s * (logp_s - log_m)
    if kind == "skew_forward_kl":
        log_r = _log_mix(logp_t, logp_s, skew)
        return (p_t * (logp_t - log_r)).sum(-1), -(1.0 - skew) * torch.exp((logp_s + logp_t - log_r).clamp_min(LOG_FLOOR))
    if kind == "skew_reverse_kl":
        log_r = _log_mix(logp_s, logp_t, skew)
        ratio = torch.exp((logp_s - log_r).clamp_max(0.0 if skew == 0 else -math.log(skew)))
        return (p_s * (logp_s - log_r)).sum(-1), p_s * (logp_s - log_r + 1.0 - skew * ratio)
    if kind == "tvd":
        diff = p_s - p_t
        return 0.5 * diff.abs().sum(-1), 0.5 * p_s * torch.sign(diff)
    raise ValueError(f"no closed form for kind {kind!r}")


def _log_mix(logp_a, logp_b, weight_a: float):
    if weight_a == 0.0:
        return logp_b
    return torch.logaddexp(math.log(weight_a) + logp_a, math.log1p(-weight_a) + logp_b)


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
