"""Distillation divergences on full-vocabulary logits: the reference every other loss is checked against.

    loss = kd_loss(student_logits, teacher_logits, "reverse_kl", temperature=2.0, mask=mask)

With p_t = softmax(teacher / T) and p_s = softmax(student / T):

=================  ================================================================
forward_kl         sum p_t (log p_t - log p_s)
reverse_kl         sum p_s (log p_s - log p_t)                       (MiniLLM)
jsd                beta KL(p_t || m) + (1 - beta) KL(p_s || m),  m = beta p_t + (1 - beta) p_s
skew_forward_kl    KL(p_t || skew p_t + (1 - skew) p_s)              (DistiLLM)
skew_reverse_kl    KL(p_s || skew p_s + (1 - skew) p_t)              (DistiLLM)
tvd                1/2 sum |p_t - p_s|
mse                mean over the vocabulary of (z_s - z_t)^2 on logits / T (logit matching)
=================  ================================================================

No T^2 factor is applied here; the trainer's ``loss.t2_scale`` does that. The maths runs in fp32
(or fp64 for fp64 inputs) whatever the input dtype. ``-inf`` logits (masked or padded vocabulary)
are allowed: their log-probabilities are clamped to a finite floor, so ``0 * log 0`` terms are 0
rather than NaN in both the value and the gradient.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from distil.errors import DistilError
from distil.spec import KINDS, shared_vocab

REDUCTIONS = ("mean", "sum", "none")

# Finite stand-in for log(0). exp() of it is exactly 0, and differences of two of them are 0, so
# masked entries contribute nothing and produce no NaN gradients (unlike -inf - -inf).
LOG_FLOOR = -1e30


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """fp64 stays fp64 (for reference checks); everything else computes in fp32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def validate_kind(kind: str, beta: float, skew: float, kinds=KINDS) -> None:
    if kind not in kinds:
        raise DistilError(f"unknown loss kind {kind!r}; choose one of {', '.join(kinds)}")
    if kind == "jsd":
        if beta <= 0.0 or beta >= 1.0:
            hint = " (beta=0 is reverse_kl's limit: use kind='reverse_kl')" if beta <= 0 else ""
            hint = " (beta=1 is forward_kl's limit: use kind='forward_kl')" if beta >= 1 else hint
            raise DistilError(f"jsd needs beta strictly in (0, 1), got {beta}{hint}")
    if kind.startswith("skew") and not 0.0 <= skew < 1.0:
        raise DistilError(f"{kind} needs skew in [0, 1), got {skew}")


def prepare_logits(logits: torch.Tensor, *, temperature: float, softcap: float | None, dtype: torch.dtype):
    """Upcast, soft-cap (Gemma: cap * tanh(z / cap)) and divide by the temperature."""
    if temperature <= 0:
        raise DistilError(f"temperature must be > 0, got {temperature}")
    z = logits.to(dtype)
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    if temperature != 1.0:
        z = z / temperature
    return z


def safe_log_softmax(z: torch.Tensor) -> torch.Tensor:
    out = F.log_softmax(z, dim=-1)
    if out.requires_grad:
        return out.clamp_min(LOG_FLOOR)
    return out.clamp_min_(LOG_FLOOR)  # in place when no autograd graph needs the original


def token_divergence(
    student_z: torch.Tensor,
    teacher_z: torch.Tensor,
    kind: str,
    *,
    beta: float = 0.5,
    skew: float = 0.1,
) -> torch.Tensor:
    """Per-token divergence [...] from temperature-scaled logits [..., V] (already upcast)."""
    if kind == "mse":
        finite = torch.isfinite(student_z) & torch.isfinite(teacher_z)
        diff = torch.where(finite, student_z - teacher_z, torch.zeros((), dtype=student_z.dtype))
        count = finite.sum(-1).clamp_min(1)
        return diff.pow(2).sum(-1) / count
    logp_s, logp_t = safe_log_softmax(student_z), safe_log_softmax(teacher_z)
    p_s, p_t = logp_s.exp(), logp_t.exp()
    if kind == "forward_kl":
        return (p_t * (logp_t - logp_s)).sum(-1)
    if kind == "reverse_kl":
        return (p_s * (logp_s - logp_t)).sum(-1)
    if kind == "jsd":
        log_m = torch.logaddexp(math.log(beta) + logp_t, math.log1p(-beta) + logp_s)
        kl_t = (p_t * (logp_t - log_m)).sum(-1)
        kl_s = (p_s * (logp_s - log_m)).sum(-1)
        return beta * kl_t + (1.0 - beta) * kl_s
    if kind == "skew_forward_kl":
        log_mix = _log_mix(logp_t, logp_s, skew)
        return (p_t * (logp_t - log_mix)).sum(-1)
    if kind == "skew_reverse_kl":
        log_mix = _log_mix(logp_s, logp_t, skew)
        return (p_s * (logp_s - log_mix)).sum(-1)
    if kind == "tvd":
        return 0.5 * (p_t - p_s).abs().sum(-1)
    raise DistilError(f"unknown loss kind {kind!r}; choose one of {', '.join(KINDS)}")


def _log_mix(logp_a: torch.Tensor, logp_b: torch.Tensor, weight_a: float) -> torch.Tensor:
    """log(weight_a * p_a + (1 - weight_a) * p_b), stably."""
    if weight_a == 0.0:
        return logp_b
    return torch.logaddexp(math.log(weight_a) + logp_a, math.log1p(-weight_a) + logp_b)


def reduce_tokens(per_token: torch.Tensor, mask: torch.Tensor | None, reduction: str) -> torch.Tensor:
    """Apply the token mask and the reduction. An all-masked batch gives 0 under "mean", not NaN."""
    if reduction not in REDUCTIONS:
        raise DistilError(f"unknown reduction {reduction!r}; choose one of {', '.join(REDUCTIONS)}")
    if mask is not None:
        if mask.shape != per_token.shape:
            raise DistilError(f"mask has shape {tuple(mask.shape)}, expected {tuple(per_token.shape)}")
        zero = torch.zeros((), dtype=per_token.dtype, device=per_token.device)
        per_token = torch.where(mask.bool(), per_token, zero)
    if reduction == "none":
        return per_token
    total = per_token.sum()
    if reduction == "sum":
        return total
    count = per_token.numel() if mask is None else mask.sum()
    if isinstance(count, torch.Tensor):
        count = count.clamp_min(1).to(per_token.dtype)
    else:
        count = max(count, 1)
    return total / count


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    kind: str = "forward_kl",
    *,
    beta: float = 0.5,
    skew: float = 0.1,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
    logit_softcap: float | None = None,
) -> torch.Tensor:
    """Divergence between student and teacher next-token distributions (see the module docstring).

    Args:
        student_logits: [..., V_s] in any float dtype.
        teacher_logits: [..., V_t]; V_t may differ from V_s by padding rows, which are masked out.
        mask: [...] bool, True where the token counts.
        reduction: "mean" over counted tokens, "sum", or "none" (one value per token, fp32/fp64).
        logit_softcap: Gemma-style soft-capping applied to both sides before the temperature.
    """
    validate_kind(kind, beta, skew)
    if student_logits.shape[:-1] != teacher_logits.shape[:-1]:
        raise DistilError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} "
            "differ in their token dimensions"
        )
    vocab = shared_vocab(student_logits.shape[-1], teacher_logits.shape[-1])
    dtype = compute_dtype(student_logits, teacher_logits)
    student_z = prepare_logits(student_logits[..., :vocab], temperature=temperature, softcap=logit_softcap, dtype=dtype)
    teacher_z = prepare_logits(teacher_logits[..., :vocab], temperature=temperature, softcap=logit_softcap, dtype=dtype)
    per_token = token_divergence(student_z, teacher_z, kind, beta=beta, skew=skew)
    return reduce_tokens(per_token, mask, reduction)


def cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
    ignore_index: int = -100,
    logit_softcap: float | None = None,
) -> torch.Tensor:
    """Hard-label cross-entropy in fp32, with the same mask/reduction contract as ``kd_loss``."""
    dtype = compute_dtype(logits)
    z = prepare_logits(logits, temperature=1.0, softcap=logit_softcap, dtype=dtype)
    valid = labels != ignore_index
    if mask is not None:
        valid = valid & mask.bool()
    per_token = F.cross_entropy(
        z.reshape(-1, z.shape[-1]), labels.clamp_min(0).reshape(-1), reduction="none"
    ).view(labels.shape)
    return reduce_tokens(per_token, valid, reduction)
