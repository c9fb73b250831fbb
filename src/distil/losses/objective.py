"""The training objective, built once: ``ce_weight * CE(labels) + kd_weight * KD(student, teacher)``.

    loss = DistillLoss.from_config(cfg.loss, teacher_gives=teacher.gives, teacher_k=teacher_k)
    loss.request                                   # what to ask the teacher for (None: CE only)
    value = loss(hidden, head, labels, signal, mask=mask)

Construction decides, once, how each step computes the loss:

* **what the teacher gives** (``path``): ``"ce"`` (no teacher term), ``"topk"`` (the teacher's
  top-k: ``loss.topk``, a cache or an API), ``"head"`` (hidden states and LM head, for the fused
  loss), ``"logits"`` (full logits, materialised);
* **fused or materialised**: with ``loss.fused`` the student's LM head is applied chunk by chunk
  inside the loss (``fused_linear_kd_loss``), so its [tokens x vocab] logits never exist whole;
* **parallel**: ``"vocab"`` when the student's LM head is sharded over a tensor-parallel group
  (each rank holds its columns of the logits; ``losses.parallel``), ``"sequence"`` when each rank
  holds a slice of the tokens and the mean must be over the global token count.

The divergence settings live in one frozen :class:`~distil.spec.LossSpec`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distil.errors import DistilError
from distil.losses.cross_tokenizer import cross_tokenizer_loss, group_sampled_reverse_kl
from distil.losses.divergences import cross_entropy, kd_loss
from distil.losses.fused import fused_linear_kd_loss
from distil.losses.parallel import (
    vocab_parallel_cross_entropy,
    vocab_parallel_kd_loss,
    vocab_parallel_topk_kd_loss,
    vocab_slice,
)
from distil.losses.policy import minillm_loss, sampled_reverse_kl
from distil.losses.topk import topk_kd_loss
from distil.spec import LossSpec, Request

PATHS = ("ce", "topk", "head", "logits", "cross")


def _counted(labels: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    counted = labels != -100
    return counted if mask is None else counted & mask


@dataclass(frozen=True)
class DistillLoss:
    spec: LossSpec
    path: str  # one of PATHS
    ce_weight: float
    kd_weight: float  # already T^2-scaled when loss.t2_scale is on
    fused: bool
    chunk_size: int
    request: Request | None  # the teacher signal each step needs
    external_topk: bool = False  # top-k from a cache / API: positions without any entry are not counted
    parallel: str = "none"  # none | vocab | sequence
    group: object = None  # the process group of a vocab- or sequence-parallel loss
    policy: str = "off"  # off | gkd | on_policy_rkl | minillm (losses on the student's samples: losses.policy)
    max_weight: float = 5.0  # minillm: the importance weights' clip
    cross_mode: str = "off"  # uld | hybrid: a teacher with another tokenizer (losses.cross_tokenizer)
    matched_weight: float | None = None  # hybrid: the matched entries' weight (None: their share of the teacher's)

    @classmethod
    def from_config(cls, cfg, *, teacher_gives: tuple[str, ...] = (), teacher_k: int | None = None,
                    tp_group=None, sequence_world: int = 1, rollout=None) -> DistillLoss:
        """``cfg`` is a LossConfig; ``teacher_gives`` the teacher's signals (empty: no teacher);
        ``teacher_k`` the k of a top-k-only teacher (a cache's k, an API's default); ``rollout`` the
        RolloutConfig of an on-policy run."""
        policy = getattr(cfg, "policy", "off")
        exact = bool(rollout is not None and rollout.exact)
        kind = "reverse_kl" if policy == "on_policy_rkl" else cfg.kind
        spec = LossSpec(kind=kind, temperature=cfg.temperature, beta=cfg.beta, skew=cfg.skew, tail=cfg.tail)
        kd_weight = cfg.kd_weight * (cfg.temperature**2 if cfg.t2_scale else 1.0)
        topk_only = "topk" in teacher_gives and not {"head", "logits"} & set(teacher_gives)
        if not teacher_gives or kd_weight == 0:
            path, request = "ce", None
        elif cfg.topk or topk_only:
            path, request = "topk", Request("topk", k=cfg.topk or teacher_k, temperature=cfg.temperature)
        elif "head" in teacher_gives and (cfg.fused or tp_group is not None):
            path, request = "head", Request("head")
        else:
            path, request = "logits", Request("logits")
        cross = getattr(cfg, "cross_tokenizer", None)
        if "groups" in teacher_gives and kd_weight:
            path, request = "cross", Request("groups")
        # The sampled-token forms; across tokenizers on_policy_rkl keeps the groups (group_sampled_reverse_kl).
        if policy == "minillm" or (policy == "on_policy_rkl" and not exact and path != "cross"):
            if "logits" in teacher_gives:
                path, request = "logits", Request("logits")  # the sampled-token forms read both logits whole
            elif policy == "on_policy_rkl" and "token_logprobs" in teacher_gives:
                path, request = "logits", Request("token_logprobs")  # a server: the sampled tokens' log-probs
            else:
                raise DistilError(f"loss.policy {policy!r} needs the teacher's logits (a model teacher)"
                                  + (" or a server's token log-probs" if policy == "on_policy_rkl" else ""))
        parallel = "vocab" if tp_group is not None else "sequence" if sequence_world > 1 else "none"
        return cls(spec=spec, path=path, ce_weight=cfg.ce_weight, kd_weight=kd_weight, fused=cfg.fused,
                   chunk_size=cfg.chunk_size, request=request, external_topk=topk_only, parallel=parallel,
                   group=tp_group, policy="on_policy_rkl_exact" if policy == "on_policy_rkl" and exact else policy,
                   max_weight=rollout.max_weight if rollout is not None else 5.0,
                   cross_mode=cross.mode if path == "cross" else "off",
                   matched_weight=cross.matched_weight if path == "cross" else None)

    def describe(self) -> str:
        if self.path == "cross" and self.policy == "on_policy_rkl":
            return "on-policy reverse KL on the sampled groups (cross-tokenizer, byte-aligned)"
        if self.path == "cross":
            part = "sorted L1 (ULD)" if self.cross_mode == "uld" else f"{self.spec.kind} on matched entries + sorted L1"
            prefix = "GKD on student samples: " if self.policy == "gkd" else ""
            return f"{prefix}cross-tokenizer {self.cross_mode}: {part}, over byte-aligned groups"
        what = {"ce": "cross-entropy only", "topk": f"{self.spec.kind} on the teacher's top-{self.request and self.request.k}",
                "head": f"{self.spec.kind}, teacher through its LM head", "logits": f"{self.spec.kind} on full logits"}
        how = "vocabulary-parallel" if self.parallel == "vocab" else "fused with the LM head" if self.fused and \
            self.path != "logits" else "materialised logits"
        seq = ", sequence-parallel token mean" if self.parallel == "sequence" else ""
        policies = {"gkd": "GKD on student samples", "on_policy_rkl": "on-policy reverse KL on the sampled tokens",
                    "on_policy_rkl_exact": "on-policy reverse KL, full vocabulary at sampled prefixes",
                    "minillm": "MiniLLM policy gradient (teacher-mixed samples)"}
        if self.policy in ("on_policy_rkl", "minillm"):
            return policies[self.policy]
        prefix = f"{policies[self.policy]}: " if self.policy != "off" else ""
        return f"{prefix}{what[self.path]} ({how}{seq})"

    def __call__(self, hidden: torch.Tensor, head: torch.nn.Module, labels: torch.Tensor, signal,
                 mask: torch.Tensor | None = None, sample_logprobs: torch.Tensor | None = None) -> torch.Tensor:
        """The loss of one micro-batch: ``hidden`` [batch, seq, H] after the final norm, ``head`` the
        student's LM head, ``signal`` what the teacher gave for ``request`` (None for CE only);
        ``sample_logprobs`` the log-prob each sampled token was drawn with (minillm)."""
        if self.policy == "on_policy_rkl":
            if self.path == "cross":  # a teacher with another tokenizer: the samples' groups, not their tokens
                return self.kd_weight * group_sampled_reverse_kl(hidden, head.weight, signal.teacher, signal.index,
                                                                 signal.student_next)
            if self.request.kind == "token_logprobs":
                return self.kd_weight * sampled_reverse_kl(head(hidden), None, labels, _counted(labels, mask),
                                                           teacher_token_logprobs=signal)
            return self.kd_weight * sampled_reverse_kl(head(hidden), signal, labels, _counted(labels, mask))
        if self.policy == "minillm":
            if sample_logprobs is None:
                raise DistilError("loss.policy minillm needs the sampling log-probs of a rollout batch")
            return self.kd_weight * minillm_loss(head(hidden), signal, labels, _counted(labels, mask), sample_logprobs,
                                                 max_weight=self.max_weight)
        if self.parallel == "vocab":
            return self._vocab_parallel(hidden, head, labels, signal, mask)
        loss = self._local(hidden, head, labels, signal, mask)
        if self.parallel == "sequence":
            # The global token mean: this rank's mean times its share of the counted tokens.
            # DDP then averages over ranks, so the world size cancels (distil.losses.parallel).
            world = torch.distributed.get_world_size()
            counted = (labels != -100).sum().to(torch.float64)
            total = counted.clone()
            torch.distributed.all_reduce(total)
            loss = loss * (counted * world / total.clamp_min(1)).to(loss.dtype)
        return loss

    def _local(self, hidden, head, labels, signal, mask):
        spec = self.spec
        if self.path == "ce":
            if self.fused:
                return fused_linear_kd_loss(hidden, head.weight, labels=labels, ce_weight=self.ce_weight,
                                            kd_weight=0.0, chunk_size=self.chunk_size, mask=mask)
            return self.ce_weight * cross_entropy(head(hidden), labels)
        if self.path == "cross":
            return cross_tokenizer_loss(hidden, head.weight, labels, signal.teacher, signal.index, mode=self.cross_mode,
                                        kind=spec.kind, temperature=spec.temperature, beta=spec.beta, skew=spec.skew,
                                        matched=signal.matched, matched_weight=self.matched_weight,
                                        ce_weight=self.ce_weight, kd_weight=self.kd_weight, mask=mask,
                                        student_next=signal.student_next)
        common = dict(kind=spec.kind, temperature=spec.temperature, mask=mask)
        if self.path == "topk":
            ids, logprobs, tail_lp = signal
            if self.external_topk:  # positions without any teacher entry (an imported prompt, padding)
                counted = (labels != -100) & (ids >= 0).any(-1)
                if not bool(counted.all()):
                    common["mask"] = counted
            if self.fused:
                return fused_linear_kd_loss(hidden, head.weight, teacher_topk=(ids, logprobs, tail_lp), labels=labels,
                                            ce_weight=self.ce_weight, kd_weight=self.kd_weight, tail=spec.tail,
                                            chunk_size=self.chunk_size, **common)
            logits = head(hidden)
            loss = self.kd_weight * topk_kd_loss(logits, ids, logprobs, tail=spec.tail, teacher_tail_logprob=tail_lp,
                                                 **common)
        elif self.path == "head":
            teacher_hidden, teacher_weight, teacher_bias = signal
            return fused_linear_kd_loss(hidden, head.weight, teacher_hidden, teacher_weight, teacher_bias=teacher_bias,
                                        labels=labels, ce_weight=self.ce_weight, kd_weight=self.kd_weight,
                                        chunk_size=self.chunk_size, beta=spec.beta, skew=spec.skew, **common)
        else:
            logits = head(hidden)
            loss = self.kd_weight * kd_loss(logits, signal, beta=spec.beta, skew=spec.skew, **common)
        if self.ce_weight:
            loss = loss + self.ce_weight * cross_entropy(logits, labels)
        return loss

    def _vocab_parallel(self, hidden, head, labels, signal, mask):
        """A vocabulary-sharded LM head: each rank has its columns of the student's logits and takes
        the same columns of the (replicated) teacher's; the parallel losses equal the single-device
        ones in value and gradient (tests/test_parallel_losses.py)."""
        spec, group = self.spec, self.group
        logits = head(hidden)  # [batch, seq, this rank's columns]
        start, end = vocab_slice(logits.shape[-1], group)
        loss = None
        common = dict(group=group, mask=mask, temperature=spec.temperature)
        if self.path == "topk":
            ids, logprobs, tail_lp = signal
            loss = self.kd_weight * vocab_parallel_topk_kd_loss(logits, ids, logprobs, spec.kind, tail=spec.tail,
                                                                teacher_tail_logprob=tail_lp, **common)
        elif self.path in ("head", "logits"):
            if self.path == "head":  # only this rank's columns of the teacher's head
                teacher_hidden, teacher_weight, _ = signal
                teacher_logits = teacher_hidden @ teacher_weight[start:end].t()
            else:
                teacher_logits = signal[..., start:end]
            loss = self.kd_weight * vocab_parallel_kd_loss(logits, teacher_logits, spec.kind, beta=spec.beta,
                                                           skew=spec.skew, **common)
        if self.ce_weight:
            ce = self.ce_weight * vocab_parallel_cross_entropy(logits, labels, group=group, mask=mask)
            loss = ce if loss is None else loss + ce
        return loss
