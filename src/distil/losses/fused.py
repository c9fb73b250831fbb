"""The LM-head matmul fused with the distillation loss, chunked over tokens.

    loss = fused_linear_kd_loss(student_hidden, model.lm_head.weight,
                                teacher_hidden, teacher.lm_head.weight,
                                kind="forward_kl", labels=labels, ce_weight=0.5)
    loss.backward()   # gradients for student_hidden and student_weight

The [tokens x vocab] logits of student and teacher are never held whole: each chunk of tokens gets
its logits, its loss and the gradient of that loss with respect to its logits, which is folded
straight into the gradients of the hidden states and the head weight (as Liger-Kernel's fused
linear cross-entropy does). Peak memory is O(chunk x vocab) instead of O(tokens x vocab).

The value and gradients equal ``kd_loss`` (or ``topk_kd_loss`` with ``teacher_topk=(ids,
logprobs)``) + ``ce_weight`` * CE on the materialised logits. Full-vocabulary kinds and CE use the
closed-form gradients of :mod:`distil.losses.analytic`; top-k chunks take theirs by autograd through
``topk_kd_loss``'s own terms. tests/test_losses.py checks both against autograd on the reference.
"""

from __future__ import annotations

import torch

from distil.errors import DistilError
from distil.kernels import use_fast_path
from distil.losses.analytic import divergence_and_h, mse_and_grad, softmax_grad
from distil.losses.divergences import (
    LOG_FLOOR,
    compute_dtype,
    cross_entropy,
    prepare_logits,
    reduce_tokens,
    safe_log_softmax,
    shared_vocab,
    validate_kind,
)
from distil.losses.topk import REVERSE_TAIL_FLOOR, log1mexp, topk_terms, topk_token_loss, validate_topk

# Tokens per chunk: one [chunk, vocab] fp32 tensor is about 64 MiB at this budget on CPU (cache-
# and page-fault-friendly), about 1 GiB on CUDA (large matmuls keep the GPU busy; the compiled chunk
# holds few such tensors). benchmarks/kd_loss.py --chunk-size measures other choices.
DEFAULT_CHUNK_ELEMENTS = 2**24
DEFAULT_CHUNK_ELEMENTS_CUDA = 2**28


def default_chunk_size(vocab_size: int, device: torch.device | str = "cpu") -> int:
    """Tokens per chunk: the largest power of two whose [chunk x vocab] fp32 block fits in 64 MiB
    (1 GiB on CUDA), between 64 and 1024 (4096 on CUDA). The loss holds a few such blocks at once
    (three for forward KL at T = 1 on CPU, about seven for the general path), so the chunk sets the
    loss's share of the process's memory: at vocab 49152 on a 2-core CPU, the fused loss at chunk
    256 ran as fast as at 1024 with about 0.9 GB less resident, while 341 (no power of two) was
    20-30% slower (docs/benchmarks.md)."""
    cuda = torch.device(device).type == "cuda"
    budget, top = (DEFAULT_CHUNK_ELEMENTS_CUDA, 4096) if cuda else (DEFAULT_CHUNK_ELEMENTS, 1024)
    fits = max(1, budget // max(1, vocab_size))
    return max(64, min(top, 1 << (fits.bit_length() - 1)))


def head_logits(hidden: torch.Tensor, weight: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """hidden [n, d] @ weight[V, d].T. On CPU computed as (weight @ hidden.T).T: MKL runs that
    orientation about 25% faster at LM-head shapes (2-core CPU, 512 x 1024 x 32768: 195 against 264 ms),
    and the transposed view goes straight into log_softmax. On CUDA the plain product (contiguous
    rows for the compiled chunk). ``out`` (CPU only): a flat buffer of at least V x n elements that
    receives the product instead of a fresh allocation (see ``Workspace``)."""
    if hidden.device.type == "cpu":
        if out is not None:
            target = out[: weight.shape[0] * hidden.shape[0]].view(weight.shape[0], hidden.shape[0])
            return torch.mm(weight, hidden.t(), out=target).t()
        return (weight @ hidden.t()).t()
    return hidden @ weight.t()


class Workspace:
    """The fused loss's [chunk x V] blocks, allocated once per call and reused by every chunk (CPU).

    A fresh block per chunk costs glibc either page faults (blocks above its mmap threshold go back
    to the OS when freed) or a heap that keeps every freed block (distil raises the threshold,
    distil/runtime.py); three blocks made once per call cost neither. Each block is flat, so the
    last, shorter chunk takes a prefix of it."""

    def __init__(self, device: torch.device, dtype: torch.dtype):
        self.device, self.dtype = device, dtype
        self.blocks: dict[str, torch.Tensor] = {}

    def __call__(self, name: str, numel: int) -> torch.Tensor:
        block = self.blocks.get(name)
        if block is None or block.numel() < numel:
            block = self.blocks[name] = torch.empty(numel, dtype=self.dtype, device=self.device)
        return block

    def like(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """A block laid out as ``tensor`` (2-d, contiguous or transposed: the CPU logits are a
        transposed view)."""
        return self(name, tensor.numel()).as_strided(tensor.size(), tensor.stride())


_compiled_chunk = None


def _chunk_function(logits: torch.Tensor, teacher_topk):
    """The one dispatch point of the chunk's elementwise work: on CUDA (with Triton) the
    full-vocabulary path runs through torch.compile, which fuses its dozen [chunk x vocab] passes;
    CPU and top-k chunks take the eager reference."""
    global _compiled_chunk
    if teacher_topk is None and use_fast_path("compile", logits):
        if _compiled_chunk is None:
            _compiled_chunk = torch.compile(_chunk_loss_and_grad, dynamic=False)
        return _compiled_chunk
    return _chunk_loss_and_grad


def _chunk_loss_and_grad(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    teacher_topk,
    labels,
    mask,
    *,
    kind: str,
    kd_weight: float,
    ce_weight: float,
    kd_count: torch.Tensor,
    ce_count: torch.Tensor,
    temperature: float,
    beta: float,
    skew: float,
    softcap: float | None,
    tail: str,
    workspace: Workspace | None = None,
):
    """Loss of one chunk (already divided by the global counts) and its gradient w.r.t. the logits.
    With a ``workspace`` the student's logits are the workspace's own block: the in-place paths
    overwrite them."""
    if teacher_topk is not None:
        if tail == "bucket" and temperature == 1.0 and softcap is None:
            return _topk_bucket_chunk(student_logits, teacher_topk, labels, mask, kind=kind, kd_weight=kd_weight,
                                      ce_weight=ce_weight, kd_count=kd_count, ce_count=ce_count,
                                      in_place=workspace is not None and student_logits.dtype == compute_dtype(
                                          student_logits))
        return _topk_chunk_autograd(student_logits, teacher_topk, labels, mask, kind=kind, kd_weight=kd_weight,
                                    ce_weight=ce_weight, kd_count=kd_count, ce_count=ce_count,
                                    temperature=temperature, softcap=softcap, tail=tail)
    dtype = compute_dtype(student_logits)
    if (kind == "forward_kl" and kd_weight and temperature == 1.0 and softcap is None
            and student_logits.device.type == "cpu" and student_logits.dtype == dtype == teacher_logits.dtype
            and student_logits.shape == teacher_logits.shape):
        return _forward_kl_chunk_in_place(student_logits, teacher_logits, labels, mask, kd_weight=kd_weight,
                                          ce_weight=ce_weight, kd_count=kd_count, ce_count=ce_count,
                                          workspace=workspace)
    capped = prepare_logits(student_logits, temperature=1.0, softcap=softcap, dtype=dtype)  # [chunk, V_s]
    grad = None
    loss = torch.zeros((), dtype=dtype, device=capped.device)
    weights = torch.ones(capped.shape[0], dtype=dtype, device=capped.device) if mask is None else mask.to(dtype)
    logp_s = None
    if kd_weight:
        vocab = shared_vocab(capped.shape[-1], teacher_logits.shape[-1])
        student_z = capped[:, :vocab] / temperature if temperature != 1.0 else capped[:, :vocab]
        teacher_z = prepare_logits(teacher_logits[:, :vocab], temperature=temperature, softcap=softcap, dtype=dtype)
        kd_w = weights * (kd_weight / kd_count)
        if kind == "mse":
            per_token, grad_z = mse_and_grad(student_z, teacher_z)
        else:
            logp_s = safe_log_softmax(student_z)
            per_token, h, p_s = divergence_and_h(logp_s, safe_log_softmax(teacher_z), kind, beta=beta, skew=skew)
            grad_z = softmax_grad(p_s, h, h.sum(-1))
        loss = loss + (per_token * kd_w).sum()
        grad_z.mul_((kd_w / temperature).unsqueeze(-1))
        if vocab == capped.shape[-1]:
            grad = grad_z
        else:  # padded student columns get no gradient
            grad = torch.zeros_like(capped)
            grad[:, :vocab] = grad_z
        if temperature != 1.0 or vocab != capped.shape[-1]:
            logp_s = None  # CE needs the log-softmax at T = 1 over the whole vocabulary
    if ce_weight:
        valid = labels != -100
        ce_w = (weights * valid.to(dtype)) * (ce_weight / ce_count)
        if logp_s is None:
            logp_s = safe_log_softmax(capped)
        targets = labels.clamp_min(0).unsqueeze(-1)
        loss = loss - (logp_s.gather(-1, targets).squeeze(-1) * ce_w).sum()
        # d CE / dz = softmax - onehot(label)
        ce_grad = logp_s.exp().mul_(ce_w.unsqueeze(-1))
        ce_grad.scatter_add_(-1, targets, -ce_w.unsqueeze(-1))
        grad = ce_grad if grad is None else grad.add_(ce_grad)
    if grad is None:
        grad = torch.zeros_like(capped)
    if softcap is not None:
        grad.mul_(1.0 - (capped / softcap).pow(2))  # d/dx c*tanh(x/c) = 1 - tanh^2
    return loss, grad


def _log_softmax_in_place(logits: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """``logits - logsumexp(logits)`` in place, the exponentials in ``scratch`` (torch's logsumexp
    makes a fresh [chunk x V] block for them), computed as torch's logsumexp computes it."""
    top = logits.amax(-1, keepdim=True)
    top.masked_fill_(top.abs() == float("inf"), 0.0)
    lse = torch.sub(logits, top, out=scratch).exp_().sum(-1, keepdim=True).log_().add_(top)
    return logits.sub_(lse)


def forward_kl_sum_in_place(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                            workspace: Workspace | None = None) -> torch.Tensor:
    """sum over rows of KL(teacher || student), as ``kd_loss(..., "forward_kl", reduction="sum")``
    gives it at T = 1, for scoring without gradients: both [rows x V] blocks are overwritten (they
    become the log-softmaxes) and one more block (the workspace's "scratch") holds the rest."""
    logp_s, logp_t, scratch = _both_log_softmaxes_in_place(student_logits, teacher_logits, workspace)
    return torch.sub(logp_t, logp_s, out=scratch).mul_(logp_t.exp_()).sum()


def _both_log_softmaxes_in_place(student_logits, teacher_logits, workspace):
    """(log p_s, log p_t, scratch): both blocks overwritten, floored at LOG_FLOOR; the scratch block
    (the workspace's, laid out as the logits, or a fresh one) is free again for the caller."""
    dense = teacher_logits.is_contiguous() or teacher_logits.t().is_contiguous()  # as the CPU head gives it
    scratch = workspace.like("scratch", teacher_logits) if workspace is not None and dense \
        else torch.empty_like(teacher_logits)
    logp_s = _log_softmax_in_place(student_logits, scratch).clamp_min_(LOG_FLOOR)
    logp_t = _log_softmax_in_place(teacher_logits, scratch).clamp_min_(LOG_FLOOR)
    return logp_s, logp_t, scratch


def _forward_kl_chunk_in_place(student_logits, teacher_logits, labels, mask, *, kd_weight, ce_weight, kd_count,
                               ce_count, workspace=None):
    """Forward KL (+ CE) of one chunk at T = 1 in three [chunk x V] blocks instead of about seven:
    the student's logits become log p_s, then p_s, then the gradient; the teacher's (made fresh for
    each chunk by the fused loss) become log p_t, then p_t; the third block holds exponentials,
    then the differences. With the fused loss's ``workspace`` all three are its reused blocks and
    nothing else of that size is allocated. The same values as the general path
    (tests/test_losses.py compares them in float64)."""
    dtype = student_logits.dtype
    weights = torch.ones(student_logits.shape[0], dtype=dtype, device=student_logits.device) if mask is None \
        else mask.to(dtype)
    kd_w = weights * (kd_weight / kd_count)
    logp_s, logp_t, scratch = _both_log_softmaxes_in_place(student_logits, teacher_logits, workspace)
    diff = torch.sub(logp_t, logp_s, out=scratch)
    p_t = logp_t.exp_()
    loss = (diff.mul_(p_t).sum(-1) * kd_w).sum()
    del diff, scratch
    grad_scale = kd_w * p_t.sum(-1)  # d KL / dz = p_s sum(p_t) - p_t
    if ce_weight:
        valid = labels != -100
        ce_w = (weights * valid.to(dtype)) * (ce_weight / ce_count)
        targets = labels.clamp_min(0).unsqueeze(-1)
        loss = loss - (logp_s.gather(-1, targets).squeeze(-1) * ce_w).sum()
        grad_scale = grad_scale + ce_w  # d CE / dz = p_s - onehot(label)
    grad = logp_s.exp_().mul_(grad_scale.unsqueeze(-1)).sub_(p_t.mul_(kd_w.unsqueeze(-1)))
    if ce_weight:
        grad.scatter_add_(-1, targets, -ce_w.unsqueeze(-1))
    return loss, grad


def _topk_bucket_chunk(student_logits, teacher_topk, labels, mask, *, kind, kd_weight, ce_weight, kd_count,
                       ce_count, in_place=False):
    """A top-k loss with the tail as one bucket (and CE), in closed form: the same loss as
    ``_topk_chunk_autograd`` (tests/test_losses.py) in a third of its [chunk x vocab] passes; the
    rest works on the k entries. With p the student's softmax, p_s(k) = p at the k entries, A the
    teacher's top-k mass, P_t and P_s the two tails, and [out] for j outside the top-k:

        forward_kl, soft_ce: d/dz_j = p_j (A + P_t) - p_t(j) [j in top-k] - (P_t / P_s) p_j [out]
        reverse_kl:          d/dz_j = c(j) [j in top-k] - p_j (C + P_s g) + g p_j [out]
            c(k) = p_s(k) (log p_s(k) - log p_t(k) + 1), C = sum of c, g = log P_s - log max(P_t, floor) + 1
    """
    dtype = compute_dtype(student_logits)
    z = student_logits.to(dtype)
    ids, logprobs, tail_lp = teacher_topk
    valid = ids >= 0
    ids = ids.clamp_min(0).long()
    kd_count, ce_count = torch.as_tensor(kd_count).to(dtype), torch.as_tensor(ce_count).to(dtype)
    weights = torch.ones(z.shape[0], dtype=dtype, device=z.device) if mask is None else mask.to(dtype)
    # Absent entries (id -1) point at the row's first present one, so that every write below to a
    # top-k position is the same for all entries naming it; a row with none names token 0 and
    # leaves it as it is.
    present = valid.any(-1, keepdim=True)
    first = ids.gather(-1, valid.to(torch.int8).argmax(-1, keepdim=True))
    index = torch.where(valid, ids, first)
    top = z.amax(-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    z_k = z.gather(-1, ids)  # read before z may be overwritten
    z_label = z.gather(-1, labels.clamp_min(0).unsqueeze(-1)) if ce_weight else None
    # e^(z - max), turned into the softmax below; in place when z is the fused loss's own block
    p = z.sub_(top).exp_() if in_place and z is student_logits else (z - top).exp_()
    total = p.sum(-1, keepdim=True)
    lse = total.log() + top  # [chunk, 1]
    e_k = p.gather(-1, index)
    p.scatter_(-1, index, torch.where(present, 0.0, e_k))  # the top-k out of the sum: the tail exactly
    outside = p.sum(-1, keepdim=True)
    p.scatter_(-1, index, e_k).div_(total)
    p_k = e_k / total
    loss = torch.zeros((), dtype=dtype, device=z.device)
    scale_in = torch.zeros(z.shape[0], dtype=dtype, device=z.device)  # d/dz_j = p_j * scale (+ the k terms)
    scale_out = torch.zeros_like(scale_in)
    kd_w = torch.where(weights > 0, weights * (kd_weight / kd_count), 0.0)
    p_t_k = None
    if kd_weight:
        logp_s_k = torch.where(valid, z_k - lse, LOG_FLOOR).clamp_min(LOG_FLOOR)
        logp_t_k = torch.where(valid, logprobs.to(dtype), LOG_FLOOR).clamp_min(LOG_FLOOR)
        log_tail_s = (outside.log() + top - lse).squeeze(-1).clamp_min(LOG_FLOOR)
        if tail_lp is None:
            log_tail_t = log1mexp(torch.logsumexp(logp_t_k, dim=-1))
        else:
            log_tail_t = tail_lp.to(dtype).clamp_min(LOG_FLOOR)
        empty = log_tail_s <= LOG_FLOOR / 2
        log_tail_t = torch.where(empty, LOG_FLOOR, log_tail_t)
        p_t_k, tail_t, tail_s = logp_t_k.exp(), log_tail_t.exp(), log_tail_s.exp()
        if kind == "reverse_kl":
            p_s_k = logp_s_k.exp()
            floored = torch.maximum(log_tail_t, torch.full_like(log_tail_t, REVERSE_TAIL_FLOOR).log())
            per_token = (p_s_k * (logp_s_k - logp_t_k)).sum(-1) + tail_s * (log_tail_s - floored)
            c_k = p_s_k * (logp_s_k - logp_t_k + 1.0) * kd_w.unsqueeze(-1)
            g = torch.where(empty, 0.0, log_tail_s - floored + 1.0) * kd_w
            scale_in = -c_k.sum(-1) - tail_s * g
            scale_out = scale_in + g
            p_t_k = -c_k  # scattered below as -p_t_k * 1
        else:
            if kind == "forward_kl":
                per_token = (p_t_k * (logp_t_k - logp_s_k)).sum(-1) + tail_t * (log_tail_t - log_tail_s)
            else:  # soft_ce: the same gradient
                per_token = -(p_t_k * logp_s_k).sum(-1) - tail_t * log_tail_s
            scale_in = (p_t_k.sum(-1) + tail_t) * kd_w
            scale_out = scale_in - torch.where(empty, 0.0, tail_t / tail_s) * kd_w
            p_t_k = p_t_k * kd_w.unsqueeze(-1)
        loss = loss + (torch.where(weights > 0, per_token, 0.0) * kd_w).sum()
    ce_w = None
    if ce_weight:
        ce_w = (weights * (labels != -100).to(dtype)) * (ce_weight / ce_count)
        targets = labels.clamp_min(0).unsqueeze(-1)
        loss = loss - ((z_label - lse).squeeze(-1) * ce_w).sum()
        scale_in, scale_out = scale_in + ce_w, scale_out + ce_w
    grad = p.mul_(scale_out.unsqueeze(-1))
    grad.scatter_(-1, index, p_k * torch.where(present, scale_in.unsqueeze(-1), scale_out.unsqueeze(-1)))
    if p_t_k is not None:  # the k entries' own terms
        grad.scatter_add_(-1, ids, -p_t_k)
    if ce_w is not None:
        grad.scatter_add_(-1, targets, -ce_w.unsqueeze(-1))
    return loss, grad


def _topk_chunk_autograd(student_logits, teacher_topk, labels, mask, *, kind, kd_weight, ce_weight, kd_count, ce_count,
                         temperature, softcap, tail):
    """Top-k chunks take their gradient by autograd through the reference functions."""
    with torch.enable_grad():
        logits = student_logits.detach().requires_grad_(True)
        dtype = compute_dtype(logits)
        loss = torch.zeros((), dtype=dtype, device=logits.device)
        if kd_weight:
            student_z = prepare_logits(logits, temperature=temperature, softcap=softcap, dtype=dtype)
            ids, logprobs, tail_lp = teacher_topk
            per_token = topk_token_loss(*topk_terms(student_z, ids, logprobs, tail_lp), kind, tail)
            loss = loss + kd_weight * reduce_tokens(per_token, mask, "sum") / kd_count
        if ce_weight:
            ce = cross_entropy(logits, labels, mask=mask, reduction="sum", logit_softcap=softcap)
            loss = loss + ce_weight * ce / ce_count
        (grad,) = torch.autograd.grad(loss, logits)
    return loss.detach(), grad


class _FusedLinearKD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student_hidden, student_weight, student_bias, teacher_fn, opts):
        num_tokens = student_hidden.shape[0]
        chunk = opts["chunk_size"]
        mask, labels = opts["mask"], opts["labels"]
        kd_count = (mask.sum() if mask is not None else torch.tensor(num_tokens)).clamp_min(1)
        ce_count = torch.tensor(1)
        if opts["ce_weight"]:
            valid = labels != -100
            if mask is not None:
                valid = valid & mask
            ce_count = valid.sum().clamp_min(1)
        needs_hidden, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.empty_like(student_hidden) if needs_hidden else None
        # Accumulate the head's gradient in fp32 even for bf16 weights: it sums over all tokens.
        acc_dtype = torch.float64 if student_weight.dtype == torch.float64 else torch.float32
        grad_weight = torch.zeros(student_weight.shape, dtype=acc_dtype, device=student_weight.device) if needs_weight else None
        grad_bias = torch.zeros(student_bias.shape, dtype=acc_dtype, device=student_bias.device) if (
            student_bias is not None and needs_bias
        ) else None
        total = torch.zeros((), dtype=torch.float64 if student_hidden.dtype == torch.float64 else torch.float32,
                            device=student_hidden.device)
        # CPU chunks of the student's dtype reuse three blocks (the compiled CUDA chunk allocates its own).
        workspace = Workspace(student_hidden.device, student_hidden.dtype) if (
            student_hidden.device.type == "cpu" and student_weight.dtype == student_hidden.dtype) else None
        for start in range(0, num_tokens, chunk):
            end = min(start + chunk, num_tokens)
            hidden = student_hidden[start:end]
            out = None if workspace is None else workspace("student", student_weight.shape[0] * min(chunk, num_tokens))
            logits = head_logits(hidden, student_weight, out=out)
            if student_bias is not None:
                logits = logits.add_(student_bias) if out is not None else logits + student_bias
            teacher_logits, teacher_topk = teacher_fn(start, end, workspace)
            loss, grad_logits = _chunk_function(logits, teacher_topk)(
                logits,
                teacher_logits,
                teacher_topk,
                None if labels is None else labels[start:end],
                None if mask is None else mask[start:end],
                kind=opts["kind"],
                kd_weight=opts["kd_weight"],
                ce_weight=opts["ce_weight"],
                kd_count=kd_count.to(total.dtype),
                ce_count=ce_count.to(total.dtype),
                temperature=opts["temperature"],
                beta=opts["beta"],
                skew=opts["skew"],
                softcap=opts["softcap"],
                tail=opts["tail"],
                workspace=workspace,
            )
            total += loss
            grad_logits = grad_logits.to(student_hidden.dtype)
            if grad_hidden is not None:
                grad_hidden[start:end] = grad_logits @ student_weight
            if grad_weight is not None:
                grad_weight.addmm_(grad_logits.t().to(acc_dtype), hidden.to(acc_dtype))
            if grad_bias is not None:
                grad_bias += grad_logits.sum(0).to(acc_dtype)
            del logits, grad_logits, teacher_logits
        # The gradients are already whole: backward scales them in place and hands them over (no copy
        # of the head's [V x H] gradient), so a second backward through the same loss is refused.
        ctx.grads = (grad_hidden, None if grad_weight is None else grad_weight.to(student_weight.dtype),
                     None if grad_bias is None else grad_bias.to(student_bias.dtype))
        return total

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.grads is None:
            raise DistilError("the fused loss hands its gradients to the first backward: a second backward "
                              "through it (retain_graph=True) is not supported")
        grads, ctx.grads = ctx.grads, None
        scale = grad_output
        if not (scale.device.type == "cpu" and scale.item() == 1.0):  # loss.backward() gives 1: nothing to do
            grads = tuple(None if g is None else g.mul_(scale.to(g.dtype)) for g in grads)
        return (*grads, None, None)


def fused_linear_kd_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor | None = None,
    teacher_weight: torch.Tensor | None = None,
    *,
    teacher_topk: tuple | None = None,
    kind: str = "forward_kl",
    labels: torch.Tensor | None = None,
    ce_weight: float = 0.0,
    kd_weight: float = 1.0,
    chunk_size: int | None = None,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    logit_softcap: float | None = None,
    temperature: float = 1.0,
    beta: float = 0.5,
    skew: float = 0.1,
    tail: str = "bucket",
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``kd_weight * KD + ce_weight * CE`` through the LM head without materialising the logits.

    Args:
        student_hidden: [..., H] final hidden states (after the final norm).
        student_weight: [V, H] LM-head weight (``student_bias`` [V] optional).
        teacher_hidden, teacher_weight: the teacher's hidden states [..., H_t] and head [V_t, H_t];
            the teacher gets no gradient.
        teacher_topk: instead of the teacher's head, ``(ids, logprobs)`` or ``(ids, logprobs,
            tail_logprob)`` of its top-k, as in ``topk_kd_loss`` (kinds forward_kl, reverse_kl, soft_ce).
        labels: [...] next-token ids for the CE term (-100 = ignore); required when ce_weight > 0.
        mask: [...] bool, True where the token counts (both terms).
        chunk_size: tokens per chunk; default keeps one [chunk, V] fp32 tensor near 64 MiB.

    Returns the scalar: KD averaged over counted tokens, plus ce_weight times CE averaged over
    counted tokens with a label. An all-masked input gives 0.
    """
    if teacher_topk is None and (teacher_hidden is None or teacher_weight is None) and kd_weight:
        raise DistilError("fused_linear_kd_loss needs teacher_hidden and teacher_weight, or teacher_topk")
    if teacher_topk is not None:
        if len(teacher_topk) == 2:
            teacher_topk = (*teacher_topk, None)
        validate_topk(kind, tail, student_hidden.shape[:-1], student_weight.shape[0], teacher_topk[0], teacher_topk[1])
    elif kd_weight:
        validate_kind(kind, beta, skew)
    if ce_weight and labels is None:
        raise DistilError("ce_weight > 0 needs labels")
    hidden_size = student_hidden.shape[-1]
    lead = student_hidden.shape[:-1]
    student_hidden_2d = student_hidden.reshape(-1, hidden_size)
    num_tokens = student_hidden_2d.shape[0]
    flat_mask = None if mask is None else mask.reshape(-1).bool()
    flat_labels = None if labels is None else labels.reshape(-1)
    if flat_mask is not None and flat_mask.numel() != num_tokens:
        raise DistilError(f"mask has shape {tuple(mask.shape)}, expected {tuple(lead)}")
    teacher_hidden_2d = None
    if teacher_topk is None and kd_weight:
        if teacher_hidden.shape[:-1] != lead:
            raise DistilError(f"teacher hidden {tuple(teacher_hidden.shape)} does not line up with student hidden {tuple(student_hidden.shape)}")
        teacher_hidden_2d = teacher_hidden.reshape(num_tokens, -1).detach()
        teacher_weight = teacher_weight.detach()
        teacher_bias = None if teacher_bias is None else teacher_bias.detach()
    topk_flat = None
    if teacher_topk is not None:
        ids, logprobs, tail_lp = teacher_topk
        k = ids.shape[-1]
        topk_flat = (ids.reshape(num_tokens, k), logprobs.reshape(num_tokens, k).detach(),
                     None if tail_lp is None else tail_lp.reshape(num_tokens).detach())
    if flat_mask is not None and not bool(flat_mask.all()):
        # Masked tokens (a prompt, padding) add nothing to the loss or to any gradient: the chunks
        # cover only the counted ones (a chat row's prompt is often most of it).
        keep = flat_mask.nonzero().squeeze(-1)
        student_hidden_2d = student_hidden_2d.index_select(0, keep)
        flat_labels = None if flat_labels is None else flat_labels.index_select(0, keep)
        if teacher_hidden_2d is not None:
            teacher_hidden_2d = teacher_hidden_2d.index_select(0, keep)
        if topk_flat is not None:
            topk_flat = tuple(None if t is None else t.index_select(0, keep) for t in topk_flat)
        flat_mask = None

    def teacher_fn(start: int, end: int, workspace=None):
        if topk_flat is not None:
            return None, tuple(None if t is None else t[start:end] for t in topk_flat)
        if teacher_hidden_2d is None:
            return None, None
        with torch.no_grad():
            hidden = teacher_hidden_2d[start:end]
            out = None
            if workspace is not None and teacher_weight.dtype == hidden.dtype == workspace.dtype:
                out = workspace("teacher", teacher_weight.shape[0] * min(opts["chunk_size"], len(teacher_hidden_2d)))
            logits = head_logits(hidden, teacher_weight, out=out)
            if teacher_bias is not None:
                logits = logits.add_(teacher_bias) if out is not None else logits + teacher_bias
        return logits, None

    opts = dict(
        chunk_size=chunk_size or default_chunk_size(student_weight.shape[0], student_hidden.device),
        mask=flat_mask,
        labels=flat_labels,
        kind=kind,
        kd_weight=kd_weight,
        ce_weight=ce_weight,
        temperature=temperature,
        beta=beta,
        skew=skew,
        softcap=logit_softcap,
        tail=tail,
    )
    return _FusedLinearKD.apply(student_hidden_2d, student_weight, student_bias, teacher_fn, opts)
