"""Vocabulary-parallel and sequence-parallel distillation losses that equal the single-device loss.

    # each rank holds a contiguous slice of the vocabulary (its columns of the logits)
    loss = vocab_parallel_kd_loss(student_logits_local, teacher_logits_local, "reverse_kl", group=tp_group)
    # each rank holds a slice of the tokens, full vocabulary
    loss = sequence_parallel_kd_loss(student_logits_local, teacher_logits_local, "reverse_kl", group=sp_group)

Every rank gets the loss of the full tensors; each rank's gradient is its slice of the full
gradient. tests/test_parallel_losses.py checks both against ``kd_loss`` on the gathered tensors,
in 2 and 3 processes, within 1e-10 in float64.

Four ways a tensor-parallel KD loss goes wrong, and what this module does instead:

1. A softmax per shard: here the max and the log-sum-exp are global (all-reduce MAX, then SUM).
2. Autograd through ``all_reduce``: here the backward is analytic (:mod:`distil.losses.analytic`:
   dL/dz = h - p_s * sum(h)), with the global sum(h) reduced in the forward pass. No gradient ever
   flows through a collective.
3. Cross terms divided by the world size: partial sums over vocabulary slices are added, never
   averaged.
4. Masked tokens normalised per rank: the sequence-parallel mean divides by the global count of
   counted tokens, and a rank whose tokens are all masked still takes part in every collective.

Communication per token (fp32 or fp64 scalars per call; the backward pass communicates nothing):

=========================  ==============================================================
vocab, softmax kinds       3 all-reduces: max (2), sum-exp (2), [loss, sum h] (2) -> 6 values
vocab, mse                 2 all-reduces: finite count (1), sum of squares (1) -> 2 values
vocab, cross-entropy       3 all-reduces: max (1), sum-exp (1), target log-prob (1) -> 3 values
vocab, top-k (k entries)   3 all-reduces: max (1), sum-exp (1), [k log-probs, tail mass] (k + 1)
sequence, any kind         2 all-reduces of one scalar per call (count, loss sum), none per token
=========================  ==============================================================

The groups are ``torch.distributed`` process groups (or a ``DeviceMesh`` dimension's group); there
is no communication layer of our own.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from distil.errors import DistilError
from distil.losses.analytic import divergence_and_h, mse_and_grad, softmax_grad
from distil.losses.divergences import (
    LOG_FLOOR,
    compute_dtype,
    cross_entropy,
    kd_loss,
    prepare_logits,
    reduce_tokens,
    validate_kind,
)
from distil.losses.topk import TAILS, TOPK_KINDS, log1mexp, topk_kd_loss, topk_token_loss


def _group(group):
    """A process group, or the group of a 1-D DeviceMesh."""
    if group is not None and hasattr(group, "get_group"):
        return group.get_group()
    return group


def _world(group) -> int:
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def _all_reduce(tensor: torch.Tensor, op, group) -> torch.Tensor:
    if _world(group) > 1:
        dist.all_reduce(tensor, op=op, group=group)
    return tensor


def vocab_slice(local_width: int, group) -> tuple[int, int]:
    """(start, end) of this rank's columns in the full vocabulary, from every rank's width."""
    world = _world(group)
    if world == 1:
        return 0, local_width
    widths = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
    dist.all_gather(widths, torch.tensor([local_width], dtype=torch.int64), group=group)
    rank = dist.get_rank(group)
    start = int(sum(w.item() for w in widths[:rank]))
    return start, start + local_width


def _global_log_softmax(z_local: torch.Tensor, group, *, extra: list[torch.Tensor] | None = None):
    """log-softmax over the full vocabulary from a column slice [..., V_r]: two all-reduces.

    ``extra`` slices are normalised alongside, sharing the same two collectives.
    """
    tensors = [z_local, *(extra or [])]
    local_max = torch.stack([t.amax(-1) if t.shape[-1] else torch.full(t.shape[:-1], -torch.inf, dtype=t.dtype, device=t.device)
                             for t in tensors])
    global_max = _all_reduce(local_max.clone(), dist.ReduceOp.MAX, group)
    # A row that is -inf on every column (nothing to normalise) must not produce inf - inf.
    global_max = torch.where(torch.isfinite(global_max), global_max, torch.zeros_like(global_max))
    sum_exp = torch.stack([torch.exp(t - m.unsqueeze(-1)).sum(-1) for t, m in zip(tensors, global_max)])
    sum_exp = _all_reduce(sum_exp, dist.ReduceOp.SUM, group)
    lse = sum_exp.log() + global_max
    return [(t - row_lse.unsqueeze(-1)).clamp_min(LOG_FLOOR) for t, row_lse in zip(tensors, lse)]


def _pad_mask(start: int, end: int, vocab_size: int | None, device) -> torch.Tensor | None:
    """Columns of this slice that lie beyond the real vocabulary (padding rows), or None."""
    if vocab_size is None or end <= vocab_size:
        return None
    return torch.arange(start, end, device=device) >= vocab_size


class _VocabParallelKD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student_logits, teacher_logits, opts):
        group, kind = opts["group"], opts["kind"]
        dtype = compute_dtype(student_logits, teacher_logits)
        softcap, temperature = opts["softcap"], opts["temperature"]
        capped = prepare_logits(student_logits, temperature=1.0, softcap=softcap, dtype=dtype)
        student_z = capped / temperature if temperature != 1.0 else capped
        teacher_z = prepare_logits(teacher_logits, temperature=temperature, softcap=softcap, dtype=dtype)
        start, end = vocab_slice(student_z.shape[-1], group)
        padding = _pad_mask(start, end, opts["vocab_size"], student_z.device)
        if padding is not None:
            student_z = student_z.masked_fill(padding, -torch.inf)
            teacher_z = teacher_z.masked_fill(padding, -torch.inf)
        if kind == "mse":
            finite = (torch.isfinite(student_z) & torch.isfinite(teacher_z)).sum(-1).to(dtype)
            count = _all_reduce(finite, dist.ReduceOp.SUM, group).clamp_min(1)
            partial, grad_z = mse_and_grad(student_z, teacher_z, count)
            per_token = _all_reduce(partial, dist.ReduceOp.SUM, group)
        else:
            logp_s, logp_t = _global_log_softmax(student_z, group, extra=[teacher_z])
            partial, h, p_s = divergence_and_h(logp_s, logp_t, kind, beta=opts["beta"], skew=opts["skew"])
            reduced = _all_reduce(torch.stack([partial, h.sum(-1)]), dist.ReduceOp.SUM, group)
            per_token, h_sum = reduced[0], reduced[1]
            grad_z = softmax_grad(p_s, h, h_sum)
        if padding is not None:
            grad_z = grad_z.masked_fill(padding, 0.0)
        grad = grad_z / temperature
        if softcap is not None:
            grad = grad * (1.0 - (capped / softcap).pow(2))
        loss, weights = _reduce_with_weights(per_token, opts["mask"], opts["reduction"])
        ctx.save_for_backward(grad, weights)
        ctx.input_dtype = student_logits.dtype
        ctx.reduction = opts["reduction"]
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        grad, weights = ctx.saved_tensors
        # "mean"/"sum": grad_output is a scalar; "none": one value per token. Either way row i
        # of the gradient is grad_output_i * weight_i * dL_i/dz_i.
        scale = (grad_output.to(weights.dtype) * weights).unsqueeze(-1)
        return (grad * scale).to(ctx.input_dtype), None, None


def _reduce_with_weights(per_token: torch.Tensor, mask, reduction: str):
    """The reduced loss and the per-token weights its gradient carries (mask / count)."""
    weights = torch.ones_like(per_token) if mask is None else mask.to(per_token.dtype)
    if reduction == "mean":
        weights = weights / weights.sum().clamp_min(1)
    out = reduce_tokens(per_token, mask, reduction)
    return out, weights


def vocab_parallel_kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    kind: str = "forward_kl",
    *,
    group=None,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    beta: float = 0.5,
    skew: float = 0.1,
    reduction: str = "mean",
    vocab_size: int | None = None,
    logit_softcap: float | None = None,
) -> torch.Tensor:
    """``kd_loss`` when each rank holds a contiguous column slice [..., V_r] of both logits.

    Slices may be unequal. ``vocab_size`` is the real vocabulary when the sharded logits carry
    padding columns at the end; those columns are masked out on both sides. Every rank passes the
    same ``mask`` (all tokens live on every rank).
    """
    validate_kind(kind, beta, skew)
    if student_logits.shape != teacher_logits.shape:
        raise DistilError(f"student slice {tuple(student_logits.shape)} and teacher slice {tuple(teacher_logits.shape)} "
                          "must cover the same tokens and vocabulary columns")
    opts = dict(group=_group(group), kind=kind, mask=mask, temperature=temperature, beta=beta, skew=skew,
                reduction=reduction, vocab_size=vocab_size, softcap=logit_softcap)
    return _VocabParallelKD.apply(student_logits, teacher_logits, opts)


class _VocabParallelCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, opts):
        group = opts["group"]
        dtype = compute_dtype(logits)
        capped = prepare_logits(logits, temperature=1.0, softcap=opts["softcap"], dtype=dtype)
        start, end = vocab_slice(capped.shape[-1], group)
        z = capped
        padding = _pad_mask(start, end, opts["vocab_size"], z.device)
        if padding is not None:
            z = z.masked_fill(padding, -torch.inf)
        ignore = labels == -100
        owned = (labels >= start) & (labels < end) & ~ignore
        local_target = (labels - start).clamp(0, max(end - start - 1, 0))
        (logp,) = _global_log_softmax(z, group)
        target_logp = torch.where(owned, logp.gather(-1, local_target.unsqueeze(-1)).squeeze(-1) if z.shape[-1] else
                                  torch.zeros_like(labels, dtype=dtype), torch.zeros((), dtype=dtype, device=z.device))
        target_logp = _all_reduce(target_logp, dist.ReduceOp.SUM, group)
        per_token = -target_logp
        valid = ~ignore if opts["mask"] is None else (~ignore & opts["mask"].bool())
        loss, weights = _reduce_with_weights(per_token, valid, opts["reduction"])
        grad = logp.exp()
        if z.shape[-1]:
            grad.scatter_add_(-1, local_target.unsqueeze(-1), -owned.to(dtype).unsqueeze(-1))
        if padding is not None:
            grad = grad.masked_fill(padding, 0.0)
        if opts["softcap"] is not None:
            grad = grad * (1.0 - (capped / opts["softcap"]).pow(2))
        ctx.save_for_backward(grad, weights)
        ctx.input_dtype = logits.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        grad, weights = ctx.saved_tensors
        return (grad * (grad_output.to(weights.dtype) * weights).unsqueeze(-1)).to(ctx.input_dtype), None, None


def vocab_parallel_cross_entropy(logits, labels, *, group=None, mask=None, reduction="mean", vocab_size=None,
                                 logit_softcap=None) -> torch.Tensor:
    """Hard-label cross-entropy on column-sliced logits; equals ``cross_entropy`` on the full ones."""
    opts = dict(group=_group(group), mask=mask, reduction=reduction, vocab_size=vocab_size, softcap=logit_softcap)
    return _VocabParallelCE.apply(logits, labels, opts)


class _VocabParallelTopK(torch.autograd.Function):
    """Each rank owns the top-k entries whose ids fall in its slice.

    The k student log-probs and the tail mass are assembled on every rank (one all-reduce); the
    small [tokens, k] loss is then computed redundantly everywhere, its gradient w.r.t. those
    log-probs taken by autograd on replicated tensors, and chained analytically to each slice:
    d lp_k / dz_v = [v = id_k] - p_v and d log tail / dz_v = [v outside top-k] p_v / tail - p_v.
    """

    @staticmethod
    def forward(ctx, student_logits, topk_ids, topk_logprobs, tail_logprob, opts):
        group = opts["group"]
        dtype = compute_dtype(student_logits, topk_logprobs)
        capped = prepare_logits(student_logits, temperature=1.0, softcap=opts["softcap"], dtype=dtype)
        z = capped / opts["temperature"] if opts["temperature"] != 1.0 else capped
        start, end = vocab_slice(z.shape[-1], group)
        padding = _pad_mask(start, end, opts["vocab_size"], z.device)
        if padding is not None:
            z = z.masked_fill(padding, -torch.inf)
        valid = topk_ids >= 0
        owned = valid & (topk_ids >= start) & (topk_ids < end)
        local_ids = (topk_ids - start).clamp(0, max(end - start - 1, 0)).long()
        in_topk = torch.zeros(z.shape, dtype=torch.int32, device=z.device)
        if z.shape[-1]:
            in_topk.scatter_add_(-1, local_ids, owned.to(torch.int32))
        (logp,) = _global_log_softmax(z, group)
        gathered = torch.where(owned, logp.gather(-1, local_ids) if z.shape[-1] else torch.zeros_like(topk_logprobs, dtype=dtype),
                               torch.zeros((), dtype=dtype, device=z.device))
        tail_part = (logp.exp() * (in_topk == 0)).sum(-1)  # this slice's student mass outside the top-k
        packed = _all_reduce(torch.cat([gathered, tail_part.unsqueeze(-1)], -1), dist.ReduceOp.SUM, group)
        logp_s_k = torch.where(valid, packed[..., :-1], LOG_FLOOR).clamp_min(LOG_FLOOR)
        tail_s = packed[..., -1]
        with torch.enable_grad():
            lp_k = logp_s_k.detach().requires_grad_(True)
            log_tail_s = tail_s.clamp_min(0).log().clamp_min(LOG_FLOOR).detach().requires_grad_(True)
            logp_t_k = torch.where(valid, topk_logprobs.to(dtype), LOG_FLOOR).clamp_min(LOG_FLOOR)
            if tail_logprob is None:
                log_tail_t = log1mexp(torch.logsumexp(logp_t_k, dim=-1))
            else:
                log_tail_t = tail_logprob.to(dtype).clamp_min(LOG_FLOOR)
            log_tail_t = torch.where(log_tail_s <= LOG_FLOOR / 2, LOG_FLOOR, log_tail_t)
            per_token = topk_token_loss(lp_k, logp_t_k, log_tail_s, log_tail_t, valid, opts["kind"], opts["tail"])
            loss, weights = _reduce_with_weights(per_token, opts["mask"], opts["reduction"])
            # d(sum_tokens w * L) / d lp_k and / d log tail, per token (replicated, small).
            a, b = torch.autograd.grad((per_token * weights).sum(), (lp_k, log_tail_s), allow_unused=True)
        a = torch.zeros_like(lp_k) if a is None else a.detach()
        b = torch.zeros_like(log_tail_s) if b is None else b.detach()
        p = logp.exp()
        grad = -p * (a.sum(-1) + b).unsqueeze(-1)
        if z.shape[-1]:
            grad.scatter_add_(-1, local_ids, torch.where(owned, a, torch.zeros((), dtype=dtype, device=z.device)))
        safe_tail = torch.where(tail_s > 0, tail_s, torch.ones_like(tail_s))
        grad = grad + (in_topk == 0).to(dtype) * p * (b / safe_tail).unsqueeze(-1)
        if padding is not None:
            grad = grad.masked_fill(padding, 0.0)
        grad = grad / opts["temperature"]
        if opts["softcap"] is not None:
            grad = grad * (1.0 - (capped / opts["softcap"]).pow(2))
        # The weights are already inside `grad`; backward only scales by grad_output.
        ctx.save_for_backward(grad, weights)
        ctx.input_dtype = student_logits.dtype
        ctx.reduction = opts["reduction"]
        return loss.detach()

    @staticmethod
    def backward(ctx, grad_output):
        grad, weights = ctx.saved_tensors
        if ctx.reduction == "none":
            # grad holds sum over tokens of w * dL; per-token upstream gradients rescale each row.
            scale = torch.where(weights != 0, grad_output.to(weights.dtype), torch.zeros_like(weights)).unsqueeze(-1)
            return (grad * scale).to(ctx.input_dtype), None, None, None, None
        return (grad * grad_output.to(grad.dtype)).to(ctx.input_dtype), None, None, None, None


def vocab_parallel_topk_kd_loss(student_logits, topk_ids, topk_logprobs, kind="forward_kl", *, group=None, tail="bucket",
                                temperature=1.0, mask=None, reduction="mean", teacher_tail_logprob=None, vocab_size=None,
                                logit_softcap=None) -> torch.Tensor:
    """``topk_kd_loss`` on column-sliced student logits; ``topk_ids`` are global ids, the same on every rank."""
    if kind not in TOPK_KINDS or tail not in TAILS:
        raise DistilError(f"top-k kind {kind!r} / tail {tail!r}: kinds are {', '.join(TOPK_KINDS)}, tails {', '.join(TAILS)}")
    if topk_ids.shape != topk_logprobs.shape:
        raise DistilError(f"topk_ids {tuple(topk_ids.shape)} and topk_logprobs {tuple(topk_logprobs.shape)} differ in shape")
    opts = dict(group=_group(group), kind=kind, tail=tail, temperature=temperature, mask=mask, reduction=reduction,
                vocab_size=vocab_size, softcap=logit_softcap)
    return _VocabParallelTopK.apply(student_logits, topk_ids, topk_logprobs, teacher_tail_logprob, opts)


# ---------------------------------------------------------------------------------------------
# Sequence parallel: each rank holds some tokens with the full vocabulary.


def _sequence_parallel(local_sum: torch.Tensor, local_count: torch.Tensor, group, reduction: str) -> torch.Tensor:
    """The global mean/sum from each rank's local sum, with gradients that flow only locally.

    The value returned on every rank is the global loss; its gradient with respect to this rank's
    inputs is this rank's slice of the full gradient (local sum / global count). Only detached
    tensors cross the collective.
    """
    group = _group(group)
    count = _all_reduce(local_count.detach().to(local_sum.dtype).clone(), dist.ReduceOp.SUM, group)
    contribution = local_sum if reduction == "sum" else local_sum / count.clamp_min(1)
    total = _all_reduce(contribution.detach().clone(), dist.ReduceOp.SUM, group)
    return contribution + (total - contribution).detach()


def _count(mask, shape, device) -> torch.Tensor:
    if mask is None:
        return torch.tensor(float(torch.Size(shape).numel()), device=device)
    return mask.sum().to(torch.float64)


def sequence_parallel_kd_loss(student_logits, teacher_logits, kind="forward_kl", *, group=None, mask=None,
                              temperature=1.0, beta=0.5, skew=0.1, reduction="mean", logit_softcap=None) -> torch.Tensor:
    """``kd_loss`` when each rank holds a slice of the tokens; the mean uses the global token count.

    With ``reduction="none"`` the local per-token values are returned (nothing to reduce).
    """
    local = kd_loss(student_logits, teacher_logits, kind, beta=beta, skew=skew, temperature=temperature, mask=mask,
                    reduction="none" if reduction == "none" else "sum", logit_softcap=logit_softcap)
    if reduction == "none":
        return local
    return _sequence_parallel(local, _count(mask, student_logits.shape[:-1], local.device), group, reduction)


def sequence_parallel_topk_kd_loss(student_logits, topk_ids, topk_logprobs, kind="forward_kl", *, group=None,
                                   tail="bucket", temperature=1.0, mask=None, reduction="mean",
                                   teacher_tail_logprob=None, logit_softcap=None) -> torch.Tensor:
    local = topk_kd_loss(student_logits, topk_ids, topk_logprobs, kind, tail=tail, temperature=temperature, mask=mask,
                         reduction="none" if reduction == "none" else "sum", teacher_tail_logprob=teacher_tail_logprob,
                         logit_softcap=logit_softcap)
    if reduction == "none":
        return local
    return _sequence_parallel(local, _count(mask, student_logits.shape[:-1], local.device), group, reduction)


def sequence_parallel_cross_entropy(logits, labels, *, group=None, mask=None, reduction="mean", logit_softcap=None):
    local = cross_entropy(logits, labels, mask=mask, reduction="none" if reduction == "none" else "sum",
                          logit_softcap=logit_softcap)
    if reduction == "none":
        return local
    valid = labels != -100
    if mask is not None:
        valid = valid & mask.bool()
    return _sequence_parallel(local, valid.sum().to(torch.float64), group, reduction)
