"""Distillation from the teacher's top-k log-probs only (offline caches, API ``top_logprobs``).

    loss = topk_kd_loss(student_logits, topk_ids, topk_logprobs, "forward_kl", tail="bucket")

The teacher is known at each position by k token ids and their log-probs. Two ways to make the
two distributions comparable:

* ``tail="bucket"``: both distributions are coarsened to the k tokens plus one bucket holding the
  rest of the mass, and the divergence is exact on that k+1 support. Nothing is dropped: a student
  that puts mass outside the teacher's top-k pays for it. With k = V this equals ``kd_loss``.
* ``tail="renormalize"``: both are restricted to the k tokens and renormalised there.

Kinds: ``forward_kl``, ``reverse_kl`` and ``soft_ce`` (-sum_k p_t log p_s, plus the tail term
-p_t(tail) log p_s(tail) with ``"bucket"``).

``topk_logprobs`` are the teacher's log-probs as given (a cache records the temperature they were
taken at); ``temperature`` scales the student's logits only. Entries whose id is negative are
absent (an API token that did not map onto the student's vocabulary) and count as tail mass.
The teacher's tail mass may be passed in (``teacher_tail_logprob``, as caches store it); otherwise
it is 1 - sum of the top-k probabilities.
"""

from __future__ import annotations

import torch

from distil.errors import DistilError
from distil.losses.divergences import LOG_FLOOR, compute_dtype, prepare_logits, reduce_tokens
from distil.spec import TAILS, TOPK_KINDS

# Reverse KL needs a teacher tail > 0 wherever the student keeps tail mass; a quantised cache can
# sum its top-k to slightly over 1. The floor bounds that term at p_s(tail) * log(p_s(tail) / 1e-10).
REVERSE_TAIL_FLOOR = 1e-10


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, stable on both ends; values of x >= 0 give LOG_FLOOR."""
    x = x.clamp_max(0.0)
    small = x > -0.6931  # log 2: use expm1 near 0, log1p(-exp) further out (Maechler 2012)
    out = torch.where(small, torch.log(-torch.expm1(torch.where(small, x, -1.0))), torch.log1p(-torch.exp(torch.where(small, -1.0, x))))
    return torch.nan_to_num(out, neginf=LOG_FLOOR).clamp_min(LOG_FLOOR)


def topk_terms(student_z: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor, teacher_tail_logprob=None):
    """Gather what both tail modes need. Returns (logp_s_k, logp_t_k, log_tail_s, log_tail_t, valid)."""
    valid = topk_ids >= 0
    ids = topk_ids.clamp_min(0).long()
    lse_s = torch.logsumexp(student_z, dim=-1, keepdim=True)
    logp_s_k = torch.where(valid, student_z.gather(-1, ids) - lse_s, LOG_FLOOR).clamp_min(LOG_FLOOR)
    logp_t_k = torch.where(valid, topk_logprobs.to(student_z.dtype), LOG_FLOOR).clamp_min(LOG_FLOOR)
    # The student's tail exactly: logsumexp over the entries outside the top-k, not 1 - sum.
    in_topk = torch.zeros(student_z.shape, dtype=torch.int32, device=student_z.device)
    in_topk.scatter_add_(-1, ids, valid.to(torch.int32))
    outside = student_z.masked_fill((in_topk > 0) | torch.isneginf(student_z), LOG_FLOOR)
    log_tail_s = (torch.logsumexp(outside, dim=-1) - lse_s.squeeze(-1)).clamp_min(LOG_FLOOR)
    if teacher_tail_logprob is None:
        log_tail_t = log1mexp(torch.logsumexp(logp_t_k, dim=-1))
    else:
        log_tail_t = teacher_tail_logprob.to(student_z.dtype).clamp_min(LOG_FLOOR)
    # Where no token lies outside the top-k (k = V), the tail is structurally empty on both sides;
    # the teacher's few ulps of rounding there are not mass.
    empty = log_tail_s <= LOG_FLOOR / 2
    log_tail_t = torch.where(empty, LOG_FLOOR, log_tail_t)
    return logp_s_k, logp_t_k, log_tail_s, log_tail_t, valid


def topk_token_loss(logp_s_k, logp_t_k, log_tail_s, log_tail_t, valid, kind: str, tail: str) -> torch.Tensor:
    """Per-token loss from the gathered terms (shared with the fused and parallel forms)."""
    if tail == "renormalize":
        logp_s_k = torch.where(valid, logp_s_k - torch.logsumexp(logp_s_k, -1, keepdim=True), LOG_FLOOR)
        logp_t_k = torch.where(valid, logp_t_k - torch.logsumexp(logp_t_k, -1, keepdim=True), LOG_FLOOR)
    p_s_k, p_t_k = logp_s_k.exp(), logp_t_k.exp()
    if kind == "forward_kl":
        loss = (p_t_k * (logp_t_k - logp_s_k)).sum(-1)
        if tail == "bucket":
            loss = loss + log_tail_t.exp() * (log_tail_t - log_tail_s)
    elif kind == "reverse_kl":
        loss = (p_s_k * (logp_s_k - logp_t_k)).sum(-1)
        if tail == "bucket":
            floored = torch.maximum(log_tail_t, torch.full_like(log_tail_t, REVERSE_TAIL_FLOOR).log())
            loss = loss + log_tail_s.exp() * (log_tail_s - floored)
    elif kind == "soft_ce":
        loss = -(p_t_k * logp_s_k).sum(-1)
        if tail == "bucket":
            loss = loss - log_tail_t.exp() * log_tail_s
    else:
        raise DistilError(f"unknown top-k loss kind {kind!r}; choose one of {', '.join(TOPK_KINDS)}")
    return loss


def validate_topk(kind: str, tail: str, lead_shape, vocab_size: int, topk_ids: torch.Tensor, topk_logprobs) -> None:
    if kind not in TOPK_KINDS:
        raise DistilError(f"unknown top-k loss kind {kind!r}; choose one of {', '.join(TOPK_KINDS)}")
    if tail not in TAILS:
        raise DistilError(f"unknown tail mode {tail!r}; choose one of {', '.join(TAILS)}")
    if topk_ids.shape != topk_logprobs.shape:
        raise DistilError(f"topk_ids {tuple(topk_ids.shape)} and topk_logprobs {tuple(topk_logprobs.shape)} differ in shape")
    if tuple(topk_ids.shape[:-1]) != tuple(lead_shape):
        raise DistilError(f"top-k entries {tuple(topk_ids.shape)} do not line up with the student's tokens {tuple(lead_shape)}")
    if topk_ids.shape[-1] > vocab_size:
        raise DistilError(f"k = {topk_ids.shape[-1]} is larger than the vocabulary ({vocab_size})")


def topk_kd_loss(
    student_logits: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    kind: str = "forward_kl",
    *,
    tail: str = "bucket",
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
    teacher_tail_logprob: torch.Tensor | None = None,
    logit_softcap: float | None = None,
) -> torch.Tensor:
    """Divergence between the student and a teacher known by its top-k (see the module docstring).

    Args:
        student_logits: [..., V].
        topk_ids: [..., k] int, teacher token ids (negative = absent).
        topk_logprobs: [..., k] teacher log-probs of those ids.
        teacher_tail_logprob: [...] optional log of the teacher's mass outside the top-k.
    """
    validate_topk(kind, tail, student_logits.shape[:-1], student_logits.shape[-1], topk_ids, topk_logprobs)
    dtype = compute_dtype(student_logits, topk_logprobs)
    student_z = prepare_logits(student_logits, temperature=temperature, softcap=logit_softcap, dtype=dtype)
    terms = topk_terms(student_z, topk_ids, topk_logprobs, teacher_tail_logprob)
    per_token = topk_token_loss(*terms, kind, tail)
    return reduce_tokens(per_token, mask, reduction)


@torch.no_grad()
def teacher_topk(teacher_logits: torch.Tensor, k: int, *, temperature: float = 1.0, chunk_size: int = 4096):
    """The teacher as a top-k cache holds it: (ids [..., k], log-probs [..., k], tail log-mass [...]).

    Log-probs are fp32 at ``temperature``. The tail is the exact log of the mass outside the top-k
    (a logsumexp over the other tokens, not 1 - sum, which loses everything below fp32's epsilon).
    Rows are processed ``chunk_size`` at a time, so only [chunk, V] fp32 is ever extra memory.
    """
    vocab = teacher_logits.shape[-1]
    if k > vocab:
        raise DistilError(f"k = {k} is larger than the vocabulary ({vocab})")
    flat = teacher_logits.reshape(-1, vocab)
    ids = torch.empty(flat.shape[0], k, dtype=torch.long, device=flat.device)
    logprobs = torch.empty(flat.shape[0], k, dtype=torch.float32, device=flat.device)
    tail = torch.empty(flat.shape[0], dtype=torch.float32, device=flat.device)
    for start in range(0, flat.shape[0], chunk_size):
        logp = torch.log_softmax(flat[start : start + chunk_size].float() / temperature, dim=-1)
        values, index = logp.topk(k, dim=-1)
        ids[start : start + chunk_size], logprobs[start : start + chunk_size] = index, values
        tail[start : start + chunk_size] = torch.logsumexp(logp.scatter(-1, index, float("-inf")), dim=-1)
    lead = teacher_logits.shape[:-1]
    return ids.view(*lead, k), logprobs.view(*lead, k), tail.view(lead)
