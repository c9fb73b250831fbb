"""Losses on the student's own samples: per-token on-policy reverse KL and MiniLLM's policy gradient.

    loss = sampled_reverse_kl(student_logits, teacher_logits, tokens, mask)
    loss = minillm_loss(student_logits, teacher_logits, tokens, mask, sample_logprobs, max_weight=5.0)

``student_logits`` / ``teacher_logits`` [batch, seq, vocab] predict ``tokens`` [batch, seq] (the
sampled completion, -100 or masked where nothing is predicted); ``mask`` [batch, seq] marks the
positions that count (never prompt tokens). Both return the mean over counted positions of a
surrogate whose *gradient* is the estimator; its value is reported as is.

**On-policy reverse KL** (per token, discount 0, as in the 2025 on-policy distillation recipe):
with ``A_t = log p_T(y_t | y_<t) - log q(y_t | y_<t)`` held constant,

    L = - mean_t  A_t * log q(y_t | y_<t),

whose gradient, for ``y_t ~ q``, is in expectation ``grad KL(q(. | y_<t) || p_T(. | y_<t))`` at each
sampled prefix (``sum_y q grad log q = 0`` removes the baseline term). The exact form sums over
the whole vocabulary instead of sampling ``y_t`` (``kd_loss(..., "reverse_kl")`` at the sampled
prefixes, which the fused loss computes without materialising the logits).

**MiniLLM** (Gu et al., "MiniLLM: Knowledge Distillation of Large Language Models", ICLR 2024,
Sec. 2.2): the sequence-level reverse KL's policy gradient, Eq. (3), split into a single-step
part, computed exactly over the vocabulary, and a long-horizon part with the reward-to-go
``R_{t+1}``; samples come from the teacher-mixed distribution ``p~ = alpha p + (1 - alpha) q``,
Eq. (4), corrected by per-token importance weights ``w_t ~ q(y_t) / p~(y_t)``, Eq. (5); the
reward-to-go is length-normalised, Eq. (6): ``R^Norm_{t+1}`` is the mean of
``r_t' = log p(y_t') / q(y_t')`` over the positions ``t' > t`` of the sequence (0 at the last one).
The gradient, summed in the paper, is here averaged over counted tokens:

    grad L = - mean_t  w_t [ grad sum_y q(y) log (p(y) / q(y))  +  R^Norm_{t+1} grad log q(y_t) ],

with ``w_t`` clipped at ``max_weight`` (the paper clips for stability) and ``w_t`` and ``R`` constants.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """float32 at least (float64 stays float64, for the reference tests)."""
    return x if x.dtype == torch.float64 else x.float()


def _token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-softmax [batch, seq, vocab], the log-prob of each token [batch, seq]; 0 where token < 0)."""
    logp = F.log_softmax(_upcast(logits), dim=-1)
    return logp, logp.gather(-1, tokens.clamp_min(0).unsqueeze(-1)).squeeze(-1)


def _mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1)


def sampled_reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor | None, tokens: torch.Tensor,
                       mask: torch.Tensor, *, teacher_token_logprobs: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token on-policy reverse KL (see the module docstring). The teacher's log-prob of each
    sampled token comes from ``teacher_logits`` or, for a server teacher, ``teacher_token_logprobs``."""
    vocab = student_logits.shape[-1] if teacher_logits is None else min(student_logits.shape[-1],
                                                                         teacher_logits.shape[-1])
    _, student_lp = _token_logprobs(student_logits[..., :vocab], tokens)
    if teacher_token_logprobs is None:
        _, teacher_lp = _token_logprobs(teacher_logits[..., :vocab], tokens)
    else:
        teacher_lp = _upcast(teacher_token_logprobs)
    advantage = (teacher_lp - student_lp).detach()
    return _mean(-advantage * student_lp, mask)


def minillm_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tokens: torch.Tensor,
                 mask: torch.Tensor, sample_logprobs: torch.Tensor, *, max_weight: float = 5.0) -> torch.Tensor:
    """MiniLLM's surrogate on samples from the teacher-mixed distribution (see the module docstring).
    ``sample_logprobs`` [batch, seq]: log p~(y_t), the probability each token was drawn with."""
    vocab = min(student_logits.shape[-1], teacher_logits.shape[-1])
    student_logp, student_lp = _token_logprobs(student_logits[..., :vocab], tokens)
    teacher_logp, teacher_lp = _token_logprobs(teacher_logits[..., :vocab], tokens)
    mask = mask.to(student_lp.dtype)
    with torch.no_grad():
        weight = (student_lp - _upcast(sample_logprobs)).exp().clamp(max=max_weight)
        reward = (teacher_lp - student_lp) * mask
        # Reward-to-go after t, length-normalised: the mean of r over the counted positions t' > t.
        after = reward.flip(-1).cumsum(-1).flip(-1) - reward
        count = mask.flip(-1).cumsum(-1).flip(-1) - mask
        reward_to_go = after / count.clamp_min(1)
    single = (student_logp.exp() * (student_logp - teacher_logp)).sum(-1)  # KL(q || p) at each prefix
    return _mean(weight * (single - reward_to_go * student_lp), mask)
