"""A teacher with another tokenizer: each student sequence is re-tokenised for it, aligned by bytes,
and its scores handed over with the groups (distil.losses.cross_tokenizer).

    teacher = CrossTokenizerTeacher(load_teacher(path), TokenizerPair(student_tok, teacher_tok), merge="first")
    signal = teacher.signal(batch, Request("groups"))     # a CrossSignal

The alignment runs on the CPU beside the step; ``align_seconds`` adds up its time (the benchmark
reports it against the step's).
"""

from __future__ import annotations

import time

import torch

from distil.data.alignment import TokenizerPair
from distil.errors import DistilError
from distil.losses.cross_tokenizer import CrossSignal, GroupIndex, TeacherSide
from distil.runtime import available_memory
from distil.spec import Request

GB = 2**30


def check_fits(needed: int, device, what: str, fix: str) -> None:
    """One line (exit 2) when ``needed`` bytes exceed what ``device`` has free."""
    free = available_memory(device)
    if needed > free:
        raise DistilError(f"{what} needs {needed / GB:.2f} GB, more than the {free / GB:.2f} GB free on {device}; {fix}")


class CrossTokenizerTeacher:
    gives = ("groups",)
    carries_state = False

    def __init__(self, teacher, pair: TokenizerPair, *, merge: str = "first"):
        self.inner, self.pair, self.merge = teacher, pair, merge
        self.name = teacher.name
        self.matched = pair.matched()
        self.pad_id = pair.teacher.eos if pair.teacher.eos is not None else 0
        self.align_seconds = 0.0
        self.checked = False  # the loss's memory, against what the device has free (once)

    @property
    def vocab_size(self) -> int:
        return self.inner.vocab_size

    @property
    def model(self):
        return self.inner.model

    def to(self, device):
        self.inner.to(device)
        return self

    def close(self) -> None:
        self.inner.close()

    def retokenize(self, input_ids: torch.Tensor, labels: torch.Tensor,
                   teacher_prompts: list | None = None) -> tuple[torch.Tensor, GroupIndex]:
        """The teacher's ids [batch, seq_t] (right-padded) and the groups of a student batch.
        ``teacher_prompts``: per row, None or (the prompt in the teacher's own chat template, the
        student's prompt length); such a row is that prompt, then the student's reply re-tokenised."""
        start = time.perf_counter()
        prompts = teacher_prompts or [None] * input_ids.shape[0]
        seqs = [self.pair.retokenize(row) if prompt is None else
                self.pair.retokenize_reply(prompt[0], prompt[1], row[prompt[1]:])
                for row, prompt in zip(input_ids.tolist(), prompts)]
        length = max(2, max(len(s.ids) for s in seqs))
        ids = torch.full((len(seqs), length), self.pad_id, dtype=torch.long)
        for b, s in enumerate(seqs):
            ids[b, :len(s.ids)] = torch.tensor(s.ids, dtype=torch.long)
        index = GroupIndex.build([(s.groups.student, s.groups.teacher) for s in seqs], merge=self.merge,
                                 student_len=input_ids.shape[1], teacher_len=length, counted=(labels != -100).cpu())
        self.align_seconds += time.perf_counter() - start
        return ids.to(input_ids.device), index

    @torch.no_grad()
    def signal(self, batch: dict, request: Request, stream: dict | None = None) -> CrossSignal:
        input_ids, labels = batch["input_ids"], batch["labels"]
        t_ids, index = self.retokenize(input_ids, labels, batch.get("teacher_prompts"))
        next_ids = torch.cat([t_ids[:, 1:], t_ids[:, -1:]], 1).reshape(-1)
        if "head" in self.inner.gives:
            hidden, weight, _ = self.inner.head_inputs(t_ids)
            if not self.checked:  # the loss's smallest step: 16 groups over both vocabularies, 4 fp32 buffers
                check_fits(16 * 4 * 4 * (weight.shape[0] + self.pair.student.size), t_ids.device,
                           f"the cross-tokenizer loss over {weight.shape[0]} + {self.pair.student.size} vocabulary "
                           "entries", "use tokenizers with smaller vocabularies")
                self.checked = True
            side = TeacherSide(next_ids, hidden=hidden.reshape(-1, hidden.shape[-1]), weight=weight)
        else:
            check_fits(t_ids.numel() * self.inner.vocab_size * 4, t_ids.device,
                       f"the teacher's logits for {t_ids.shape[0]} x {t_ids.shape[1]} tokens over its "
                       f"{self.inner.vocab_size}-entry vocabulary (a teacher without head inputs gives them whole)",
                       "lower train.batch_size or data.seq_len")
            logits = self.inner.logits(t_ids)
            side = TeacherSide(next_ids, logits=logits.reshape(-1, logits.shape[-1]))
        following = torch.cat([input_ids[:, 1:], input_ids[:, -1:]], 1)
        student_next = torch.where(labels != -100, labels, following)
        return CrossSignal(side, index, student_next, self.matched)
