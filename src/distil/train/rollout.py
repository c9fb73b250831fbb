"""Rollout batches: the student writes completions of prompts, the teacher grades every token.

    batches = RolloutBatches(prompts, cfg, info, tokenizer, student=student, teacher=teacher)
    batch = batches.next_batch()   # input_ids, labels (-100 on prompt and padding), loss_scale, ...

A batch source like the others (train/batches.py): the loop does not know it samples. Each
optimizer step's rows (``train.batch_size * train.grad_accum``, ``rollout.num_generations`` per
prompt) are made at once, at the step's first micro-batch, then served micro-batch by
micro-batch; each micro-batch carries ``loss_scale`` = its share of the step's counted tokens x
``grad_accum``, so that the accumulated gradient is the step's token mean whatever the split.

What a step trains on (``loss.policy``):

* ``off``: the dataset's completions (prompt masked): supervised KD on prompt/completion data;
* ``gkd``: with probability ``rollout.lmbda`` the student's samples, otherwise the dataset's
  completions, or teacher samples with ``rollout.seq_kd`` (GKD, Agarwal et al. 2024);
* ``on_policy_rkl``: the student's samples;
* ``minillm``: samples from ``mix_alpha * teacher + (1 - mix_alpha) * student`` with the
  probability each token was drawn with (``sample_logprobs``) for the importance weights.

Sampling uses :func:`distil.models.generate.sample` (KV cache and SSM state; hybrids too), one
batched call for the step's rows whatever their prompt lengths (attention caches left-padded and
masked). The sampler's RNG, the GKD coin and the prompt
order are in ``state_dict``: a resumed run draws the same samples as an uninterrupted one.
"""

from __future__ import annotations

import random

import numpy as np
import torch

from distil.data.packing import WindowSampler
from distil.data.prompts import Prompt, load_prompts
from distil.errors import DistilError
from distil.models.generate import sample


class RolloutBatches:
    def __init__(self, prompts: list[Prompt], cfg, info, tokenizer, *, student, teacher=None, rows: int | None = None):
        r, t = cfg.rollout, cfg.train
        self.cfg, self.rollout, self.policy = cfg, r, cfg.loss.policy
        self.device, self.student = info.device, student
        self.teacher_model = getattr(teacher, "model", None)
        # train.batch_size is the global micro-batch; this process makes ``rows`` of each (its share).
        self.rows, self.accum = rows or t.batch_size, t.grad_accum
        step_rows = self.rows * t.grad_accum
        if step_rows % r.num_generations:
            raise DistilError(f"{step_rows} rollout rows a step (per process) is not a multiple of "
                              f"rollout.num_generations = {r.num_generations}")
        self.eos = tokenizer.eos_token_id
        self.pad = self.eos if self.eos is not None else 0
        self.prompts = prompts
        needs_completions = self.policy == "off" or (self.policy == "gkd" and r.lmbda < 1 and not r.seq_kd)
        if needs_completions and any(p.completion is None for p in prompts):
            raise DistilError(f"loss.policy {self.policy!r} trains on the dataset's completions, but some prompts have "
                              "none: give 'completion' (or a final assistant message), or use rollout.seq_kd / lmbda 1")
        if (self.policy == "minillm" or (self.policy == "gkd" and r.seq_kd)) and self.teacher_model is None:
            raise DistilError(f"loss.policy {self.policy!r} samples from the teacher: it needs a distil model teacher")
        # Each process samples its own prompts: rank r takes every world_size-th prompt of the step.
        self.per_step = step_rows // r.num_generations  # prompts per step, per process
        self.rank, self.world = info.rank, info.world_size
        self.sampler = WindowSampler(len(prompts), self.per_step * self.world, seed=t.seed)
        self.generator = torch.Generator(device=self.device).manual_seed(t.seed * 1000 + 17 + self.rank)
        self.coin = random.Random(t.seed * 1000 + 29)
        self.queue: list[dict] = []
        self.last_on_policy = None
        self.step_tokens: int | None = None  # prompt + completion tokens of the last step (the loop's token count)

    @classmethod
    def from_config(cls, cfg, info, tokenizer, *, student, teacher=None, rows: int | None = None) -> RolloutBatches:
        r = cfg.rollout
        pair = getattr(teacher, "pair", None)  # a teacher with another tokenizer reads chat in its own template
        prompts = load_prompts(r.prompts, tokenizer, prompt_tokens=r.prompt_tokens, completion_tokens=r.completion_tokens,
                               max_prompt_tokens=r.max_prompt_tokens, limit=r.limit, seed=cfg.data.seed,
                               teacher_tokenizer=pair.teacher.tokenizer if pair is not None else None)
        return cls(prompts, cfg, info, tokenizer, student=student, teacher=teacher, rows=rows)

    # -- the batch-source protocol ---------------------------------------------------------------

    def next_batch(self) -> dict:
        if not self.queue:
            self.queue = self._make_step()
        return self.queue.pop(0)

    def state_dict(self) -> dict:
        return {"sampler": self.sampler.state_dict(), "generator": self.generator.get_state().cpu(),
                "coin": self.coin.getstate()}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state["sampler"])
        self.generator.set_state(state["generator"].cpu() if self.device.type == "cpu" else state["generator"])
        coin = state["coin"]
        self.coin.setstate((coin[0], tuple(coin[1]), coin[2]))
        self.queue = []

    def close(self) -> None:
        pass

    # -- one step's rows ---------------------------------------------------------------------------

    def _source(self) -> str:
        """Where this step's completions come from: student, teacher, data (or mixed for minillm)."""
        if self.policy == "off":
            return "data"
        if self.policy == "gkd":
            on_policy = self.coin.random() < self.rollout.lmbda
            return "student" if on_policy else "teacher" if self.rollout.seq_kd else "data"
        return "mixed" if self.policy == "minillm" and self.rollout.mix_alpha > 0 else "student"

    def _make_step(self) -> list[dict]:
        r = self.rollout
        index = self.sampler.next_batch()[self.rank :: self.world]
        source = self._source()
        self.last_on_policy = source in ("student", "mixed")
        prompts = [self.prompts[int(i)] for i in index]
        if source == "data":
            rows = [(list(p.ids), list(p.completion), None, p.teacher_ids) for p in prompts
                    for _ in range(r.num_generations)]
            return self._micro_batches(rows)
        # One batched call for the step's prompts, whatever their lengths (distil.models.generate.sample).
        model = self.teacher_model if source == "teacher" else self.student
        rows = [list(p.ids) for p in prompts for _ in range(r.num_generations)]
        tokens, logprobs, lengths = sample(
            model, rows, max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p,
            eos_token_id=self.eos, generator=self.generator,
            mix_model=self.teacher_model if source == "mixed" else None, mix_alpha=r.mix_alpha)
        samples: dict[int, list] = {}
        for j, p in enumerate(prompts):
            samples[j] = []
            for row in range(j * r.num_generations, (j + 1) * r.num_generations):
                n = int(lengths[row])
                samples[j].append((list(p.ids), tokens[row, :n].tolist(), logprobs[row, :n].tolist(), p.teacher_ids))
        return self._micro_batches([row for j in range(len(prompts)) for row in samples[j]])

    def _micro_batches(self, rows) -> list[dict]:
        """Right-padded [rows, width] tensors, labels -100 on the prompt's and the padding's positions;
        with chat prompts in a teacher's own template, those ids and each row's prompt length."""
        width = max(len(p) + len(c) for p, c, _, _ in rows) - 1
        input_ids = np.full((len(rows), width), self.pad, dtype=np.int64)
        labels = np.full((len(rows), width), -100, dtype=np.int64)
        sample_lp = np.zeros((len(rows), width), dtype=np.float32)
        for j, (prompt, completion, logprobs, _) in enumerate(rows):
            full = prompt + completion
            input_ids[j, : min(len(full), width)] = full[:width]  # labels[i] is always input_ids[i + 1]
            # Position i predicts token i + 1: the first completion token is predicted at len(prompt) - 1.
            start = len(prompt) - 1
            labels[j, start : start + len(completion)] = completion
            if logprobs is not None:
                sample_lp[j, start : start + len(completion)] = logprobs
        self.step_tokens = sum(len(p) + len(c) for p, c, _, _ in rows)  # what tokens/s counts for this step
        counted = (labels != -100).sum()
        if counted == 0:
            raise DistilError("a rollout step has no completion tokens to train on (every sample ended at once?)")
        out = []
        for k in range(self.accum):
            part = slice(k * self.rows, (k + 1) * self.rows)
            share = (labels[part] != -100).sum() / counted * self.accum
            out.append({"input_ids": torch.from_numpy(input_ids[part]).to(self.device),
                        "labels": torch.from_numpy(labels[part]).to(self.device),
                        "sample_logprobs": torch.from_numpy(sample_lp[part]).to(self.device),
                        "loss_scale": float(share), "on_policy": self.last_on_policy})
            if any(t is not None for *_, t in rows[part]):
                out[-1]["teacher_prompts"] = [(t, len(p)) if t is not None else None for p, _, _, t in rows[part]]
        return out
