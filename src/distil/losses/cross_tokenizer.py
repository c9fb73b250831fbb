"""Distillation between a teacher and a student with different vocabularies, over aligned groups.

    index = GroupIndex.build(rows, merge="first", student_len=N_s, teacher_len=N_t)  # from the alignment
    loss = cross_tokenizer_loss(hidden, head.weight, labels, teacher, teacher_ids, index,
                                mode="hybrid", matched=(s_ids, t_ids), kind="forward_kl")

A **group** (distil.data.alignment) is the shortest run of whole tokens that covers the same bytes on
both sides. Each side gives one score vector per group, over its own vocabulary:

* ``merge="first"``: the distribution at the position before the group's first token, times the
  probability of the group's other tokens as they were produced (TRL's GOLD);
* ``merge="last"``: the distribution at the position before the group's last token, times the
  probability of the tokens before it. docs/cross-tokenizer.md gives the measured reason for the default.

For a one-token group both are the plain next-token distribution. The vectors are compared by:

* ``uld``: Universal Logit Distillation (Boizard et al. 2024): the L1 distance between the two
  probability vectors sorted in descending order, the shorter one zero-padded;
* ``hybrid``: vocabulary entries with the same bytes on both sides (``matched``) get the configured
  divergence (``kind``) between the two distributions renormalised over those entries; the rest
  get the sorted L1. The parts are weighted ``matched_weight`` and ``1 - matched_weight``.

The loss is the sum over groups divided by their count, plus ``ce_weight`` * CE on the student's
own labels. Groups are processed ``chunk_size`` at a time and each chunk's gradient is folded into
the hidden states' and head's at once (as in the fused loss), so neither side's [groups x vocab]
scores exist whole. tests/test_cross_tokenizer.py checks value and gradients against a float64
formula written out group by group (its ``reference_loss``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from distil.errors import DistilError
from distil.losses.divergences import compute_dtype, kd_loss, safe_log_softmax
from distil.losses.fused import fused_linear_kd_loss, head_logits

MODES = ("uld", "hybrid")
MERGES = ("first", "last")


@dataclass(frozen=True)
class GroupIndex:
    """Where each group's scores come from, as flat positions into [batch * seq] of either side.

    A group g is scored at ``student_rows[g]`` / ``teacher_rows[g]`` plus the log-probabilities of
    the tokens produced at ``*_scale_rows`` whose ``*_scale_group`` is g."""

    student_rows: torch.Tensor  # [G]
    teacher_rows: torch.Tensor  # [G]
    student_scale_rows: torch.Tensor  # [S_s]
    student_scale_group: torch.Tensor  # [S_s]
    teacher_scale_rows: torch.Tensor  # [S_t]
    teacher_scale_group: torch.Tensor  # [S_t]

    @property
    def groups(self) -> int:
        return int(self.student_rows.numel())

    @classmethod
    def build(cls, rows, *, merge: str, student_len: int, teacher_len: int, counted=None) -> GroupIndex:
        """``rows``: per batch row, (student [G, 2], teacher [G, 2]) token ranges of its groups.
        ``counted``: optional [batch, student_len] bool; a group counts where its student scoring
        position does (prompt and padding positions do not). A group whose first token opens its
        sequence has no position to score it from and is left out."""
        if merge not in MERGES:
            raise DistilError(f"unknown group merge {merge!r}; choose one of {', '.join(MERGES)}")
        out = {k: [] for k in ("sr", "tr", "ssr", "ssg", "tsr", "tsg")}
        g = 0
        for b, (s_groups, t_groups) in enumerate(rows):
            for (a, e), (c, d) in zip(np.asarray(s_groups).tolist(), np.asarray(t_groups).tolist()):
                if a < 1 or c < 1:
                    continue
                s_row, s_scale = _positions(a, e, merge)
                t_row, t_scale = _positions(c, d, merge)
                if counted is not None and not bool(counted[b, s_row]):
                    continue
                out["sr"].append(b * student_len + s_row)
                out["tr"].append(b * teacher_len + t_row)
                out["ssr"].extend(b * student_len + p for p in s_scale)
                out["ssg"].extend([g] * len(s_scale))
                out["tsr"].extend(b * teacher_len + p for p in t_scale)
                out["tsg"].extend([g] * len(t_scale))
                g += 1

        def t(key):
            return torch.tensor(out[key], dtype=torch.long)

        return cls(t("sr"), t("tr"), t("ssr"), t("ssg"), t("tsr"), t("tsg"))

    def to(self, device) -> GroupIndex:
        return GroupIndex(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))


def _positions(start: int, end: int, merge: str) -> tuple[int, list[int]]:
    """(the scoring position, the positions whose produced token's log-prob scales it) for the
    tokens [start, end); position p predicts token p + 1."""
    if merge == "first":
        return start - 1, list(range(start, end - 1))
    return end - 2, list(range(start - 1, end - 2))


def sorted_l1(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Per row, the L1 distance between ``p`` [n, V_p] and ``q`` [n, V_q] each sorted in descending
    order, the shorter zero-padded (ULD's Wasserstein-1 with uniform cost). [n].

    Past the shorter length the longer side meets zeros, so only its top entries need sorting: the
    rest adds its plain sum (a top-k instead of a full sort; 4096 of 49152 entries cost a fraction)."""
    if p.shape[-1] > q.shape[-1]:
        p, q = q, p
    n = p.shape[-1]
    p = p.sort(dim=-1, descending=True).values
    if q.shape[-1] > n:
        top = q.topk(n, dim=-1, sorted=True).values
        rest = q.sum(-1) - top.sum(-1)
    else:
        top, rest = q.sort(dim=-1, descending=True).values, 0.0
    return (p - top).abs().sum(-1) + rest


@dataclass(frozen=True)
class TeacherSide:
    """The teacher's scores for the groups, flat over [batch * seq]: head inputs (hidden [N_t, H],
    weight [V_t, H]), logits [N_t, V_t], or a top-k cache's entries (``topk``: ids [N_t, K] with -1
    absent, log-probs [N_t, K], tail log-mass [N_t]; ``topk_vocab`` V_t); ``next_ids`` [N_t] the token
    each position produced.

    Top-k scores are log-probabilities over the whole vocabulary: the listed entries as stored, the
    tail's mass spread evenly over the entries not listed (the reconstruction ``cache_stats`` measures).
    A cross-tokenizer cache lists the produced token beside the top-k, so the groups' scales are exact."""

    next_ids: torch.Tensor
    hidden: torch.Tensor | None = None
    weight: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    topk: tuple | None = None
    topk_vocab: int | None = None
    topk_temperature: float = 1.0  # the cache's: its log-probs times it, so the loss's softmax at T gives them back

    def scores(self, rows: torch.Tensor) -> torch.Tensor:
        if self.logits is not None:
            return self.logits[rows]
        if self.topk is not None:
            return topk_scores(*(t[rows] for t in self.topk), self.topk_vocab) * self.topk_temperature
        return head_logits(self.hidden[rows], self.weight)

    @property
    def vocab_size(self) -> int:
        if self.topk is not None:
            return self.topk_vocab
        return self.logits.shape[-1] if self.logits is not None else self.weight.shape[0]


def topk_scores(ids: torch.Tensor, logprobs: torch.Tensor, tail: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Log-probabilities [n, V] from top-k entries (ids [n, K], -1 absent; log-probs [n, K]; tail
    log-mass [n]): the listed entries, and the tail spread evenly over the other ``V - listed``."""
    present = ids >= 0
    rest = (vocab_size - present.sum(-1)).clamp_min(1)
    fill = tail.to(torch.float32) - torch.log(rest.to(torch.float32))
    out = fill.unsqueeze(-1).expand(ids.shape[0], vocab_size + 1).clone()  # column V takes the absent slots
    out.scatter_(1, torch.where(present, ids, vocab_size), logprobs.to(torch.float32))
    return out[:, :vocab_size]


@dataclass(frozen=True)
class CrossSignal:
    """What a cross-tokenizer teacher gives each step (distil.teachers.cross)."""

    teacher: TeacherSide
    index: GroupIndex
    student_next: torch.Tensor  # [batch, seq] the token after each position
    matched: tuple  # (student ids, teacher ids) of the vocabulary entries with the same bytes


def _token_logprobs(rows, scores_of, next_ids, temperature, dtype) -> torch.Tensor:
    """log p(produced token) at the flat positions ``rows``, chunked."""
    out = []
    for start in range(0, rows.numel(), 256):
        r = rows[start:start + 256]
        logp = safe_log_softmax(scores_of(r).to(dtype) / temperature)
        out.append(logp.gather(-1, next_ids[r].unsqueeze(-1)).squeeze(-1))
    return torch.cat(out) if out else torch.zeros(0, dtype=dtype, device=rows.device)


def group_divergence(s_scores, s_scale, t_scores, t_scale, *, mode, kind, temperature, beta, skew, matched=None,
                     matched_weight=1.0) -> torch.Tensor:
    """One value per group ([n]) from the two sides' scores ([n, V_s], [n, V_t]) and scales ([n])."""
    dtype = compute_dtype(s_scores, t_scores)
    s_logp = safe_log_softmax(s_scores.to(dtype) / temperature)
    t_logp = safe_log_softmax(t_scores.to(dtype) / temperature)
    s_prob = (s_logp + s_scale.to(dtype).unsqueeze(-1)).exp()
    t_prob = (t_logp + t_scale.to(dtype).unsqueeze(-1)).exp()
    if mode == "uld":
        return sorted_l1(s_prob, t_prob)
    s_ids, t_ids, s_rest, t_rest = matched
    part = kd_loss(s_scores[:, s_ids], t_scores[:, t_ids], kind, temperature=temperature, beta=beta, skew=skew,
                   reduction="none").to(dtype)
    return matched_weight * part + (1.0 - matched_weight) * sorted_l1(s_prob[:, s_rest], t_prob[:, t_rest])


class _ChunkedGroupLoss(torch.autograd.Function):
    """Sum over groups of ``group_divergence``; the gradients of each chunk of groups are taken at
    once and folded into the hidden rows', the head weight's and the scales' gradients."""

    @staticmethod
    def forward(ctx, hidden_rows, weight, s_scale, t_scale, teacher, t_rows, chunk, options):
        total = torch.zeros((), dtype=torch.float64, device=hidden_rows.device)
        grad_h = torch.zeros_like(hidden_rows)
        grad_w = torch.zeros_like(weight) if weight.requires_grad else None
        grad_scale = torch.zeros_like(s_scale)
        for start in range(0, hidden_rows.shape[0], chunk):
            sl = slice(start, start + chunk)
            h = hidden_rows[sl]
            with torch.no_grad():
                t_scores = teacher.scores(t_rows[sl])
            with torch.enable_grad():
                logits = head_logits(h, weight).detach().requires_grad_(True)
                scale = s_scale[sl].detach().requires_grad_(True)
                value = group_divergence(logits, scale, t_scores, t_scale[sl], **options).sum()
                g_logits, g_scale = torch.autograd.grad(value, (logits, scale))
            total += value.detach().to(torch.float64)
            g_logits = g_logits.to(weight.dtype)
            grad_h[sl] = g_logits @ weight
            if grad_w is not None:
                grad_w += g_logits.t() @ h
            grad_scale[sl] = g_scale
        ctx.save_for_backward(grad_h, grad_scale, *(() if grad_w is None else (grad_w,)))
        return total.to(hidden_rows.dtype if hidden_rows.is_floating_point() else torch.float32)

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_scale, *rest = ctx.saved_tensors
        grad_w = rest[0] * grad_out if rest else None
        return grad_h * grad_out, grad_w, grad_scale * grad_out, None, None, None, None, None


def cross_tokenizer_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, teacher: TeacherSide,
                         index: GroupIndex, *, mode: str = "hybrid", kind: str = "forward_kl",
                         temperature: float = 1.0, beta: float = 0.5, skew: float = 0.1, matched=None,
                         matched_weight: float | None = None, ce_weight: float = 0.0, kd_weight: float = 1.0,
                         chunk_size: int | None = None, mask: torch.Tensor | None = None,
                         student_next: torch.Tensor | None = None) -> torch.Tensor:
    """``kd_weight`` * (mean over groups of the group divergence) + ``ce_weight`` * CE(labels).

    hidden: [batch, seq, H] student hidden states after the final norm; weight: [V_s, H] its head;
    labels: [batch, seq] (-100: not counted); teacher: the teacher's side; index: the groups;
    matched: (student ids, teacher ids) of the vocabulary entries with the same bytes (hybrid);
    matched_weight: the matched part's weight (None: the share of the teacher's vocabulary matched);
    student_next: [batch, seq] the token that follows each position (default: the labels; needed
    where labels are -100 inside a group, such as a prompt); chunk_size: groups per chunk (None: as
    many as keep one [chunk x (V_s + V_t)] buffer near 64 MiB, 16 to 256)."""
    if mode not in MODES:
        raise DistilError(f"unknown cross-tokenizer mode {mode!r}; choose one of {', '.join(MODES)}")
    flat_h = hidden.reshape(-1, hidden.shape[-1])
    flat_labels = labels.reshape(-1)
    device = hidden.device
    index = index.to(device)
    dtype = compute_dtype(hidden, weight)
    loss = None
    if index.groups:
        s_tok = _token_logprobs(index.student_scale_rows, lambda r: head_logits(flat_h[r], weight),
                                (student_next.reshape(-1) if student_next is not None else flat_labels.clamp_min(0)),
                                temperature, dtype)
        s_scale = torch.zeros(index.groups, dtype=dtype, device=device).index_add(0, index.student_scale_group, s_tok)
        with torch.no_grad():
            t_tok = _token_logprobs(index.teacher_scale_rows, teacher.scores, teacher.next_ids, temperature, dtype)
            t_scale = torch.zeros(index.groups, dtype=dtype, device=device).index_add(0, index.teacher_scale_group,
                                                                                     t_tok)
        chunk = chunk_size or max(16, min(256, 2**24 // (weight.shape[0] + teacher.vocab_size)))
        options = dict(mode=mode, kind=kind, temperature=temperature, beta=beta, skew=skew)
        if mode == "hybrid":
            options.update(_matched_options(matched, weight.shape[0], teacher.vocab_size, matched_weight, device))
        total = _ChunkedGroupLoss.apply(flat_h[index.student_rows], weight, s_scale, t_scale, teacher,
                                        index.teacher_rows, chunk, options)
        loss = kd_weight * total / index.groups
    if ce_weight:
        ce = ce_weight * fused_linear_kd_loss(hidden, weight, labels=labels, ce_weight=1.0, kd_weight=0.0, mask=mask)
        loss = ce if loss is None else loss + ce
    if loss is None:  # no group and no CE: a zero that still reaches the parameters
        loss = (flat_h.sum() * 0.0) + (weight.sum() * 0.0)
    return loss


def group_sampled_reverse_kl(hidden: torch.Tensor, weight: torch.Tensor, teacher: TeacherSide, index: GroupIndex,
                             student_next: torch.Tensor) -> torch.Tensor:
    """On-policy reverse KL on the student's samples, group by group (``loss.policy: on_policy_rkl``
    across tokenizers). A group is the same bytes on both sides, so each side gives it a probability:
    log q(g) the sum of the student's log-probs of the group's tokens, log p(g) the teacher's of its
    own tokens. As the per-token form (distil.losses.policy), the loss is
    ``- mean_g (log p(g) - log q(g)).detach() * log q(g)``, whose gradient is the sampled reverse
    KL's; groups are scored with ``merge: first`` rows, which together hold every token of the group."""
    flat_h = hidden.reshape(-1, hidden.shape[-1])
    index = index.to(hidden.device)
    if not index.groups:
        return (flat_h.sum() * 0.0) + (weight.sum() * 0.0)
    dtype = compute_dtype(hidden, weight)
    nxt = student_next.reshape(-1)

    def group_logprobs(rows, scale_rows, scale_group, scores_of, next_ids):
        first = _token_logprobs(rows, scores_of, next_ids, 1.0, dtype)
        rest = _token_logprobs(scale_rows, scores_of, next_ids, 1.0, dtype)
        return first.index_add(0, scale_group, rest)

    student = group_logprobs(index.student_rows, index.student_scale_rows, index.student_scale_group,
                             lambda r: head_logits(flat_h[r], weight), nxt)
    with torch.no_grad():
        teacher_lp = group_logprobs(index.teacher_rows, index.teacher_scale_rows, index.teacher_scale_group,
                                    teacher.scores, teacher.next_ids)
    advantage = (teacher_lp - student).detach()
    return -(advantage * student).mean().to(hidden.dtype if hidden.is_floating_point() else torch.float32)


def _matched_options(matched, student_vocab: int, teacher_vocab: int, matched_weight, device) -> dict:
    if matched is None:
        raise DistilError("the hybrid cross-tokenizer loss needs the matched vocabulary entries")
    s_ids, t_ids = (torch.as_tensor(np.asarray(m), dtype=torch.long, device=device) for m in matched)
    s_rest = torch.ones(student_vocab, dtype=torch.bool, device=device)
    s_rest[s_ids] = False
    t_rest = torch.ones(teacher_vocab, dtype=torch.bool, device=device)
    t_rest[t_ids] = False
    weight = len(t_ids) / teacher_vocab if matched_weight is None else matched_weight
    return {"matched": (s_ids, t_ids, s_rest.nonzero().squeeze(-1), t_rest.nonzero().squeeze(-1)),
            "matched_weight": float(weight)}
