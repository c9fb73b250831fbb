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

from distil.data.alignment import Groups, TokenizerPair, align
from distil.data.topk_codec import ABSENT_LOGPROB
from distil.errors import DistilError
from distil.losses.cross_tokenizer import CrossSignal, GroupIndex, TeacherSide
from distil.losses.topk import log1mexp
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
        return self.inner.vocab_size or self.pair.teacher.size  # an API teacher: its tokenizer's

    @property
    def model(self):
        return self.inner.model

    def to(self, device):
        self.inner.to(device)
        return self

    def close(self) -> None:
        self.inner.close()

    def sequences(self, input_ids: torch.Tensor, teacher_prompts: list | None = None) -> list:
        """Each student row as the teacher reads it (``alignment.Retokenized``). ``teacher_prompts``:
        per row, None or (the prompt in the teacher's own chat template, the student's prompt length);
        such a row is that prompt, then the student's reply re-tokenised."""
        prompts = teacher_prompts or [None] * input_ids.shape[0]
        return [self.pair.retokenize(row) if prompt is None else
                self.pair.retokenize_reply(prompt[0], prompt[1], row[prompt[1]:])
                for row, prompt in zip(input_ids.tolist(), prompts)]

    def retokenize(self, input_ids: torch.Tensor, labels: torch.Tensor, teacher_prompts: list | None = None, *,
                   length: int = 2) -> tuple[torch.Tensor, GroupIndex]:
        """The teacher's ids [batch, seq_t] (right-padded to at least ``length``) and the groups of a
        student batch (see ``sequences``)."""
        start = time.perf_counter()
        seqs = self.sequences(input_ids, teacher_prompts)
        ids = self._padded(seqs, length)
        length = ids.shape[1]
        index = GroupIndex.build([(s.groups.student, s.groups.teacher) for s in seqs], merge=self.merge,
                                 student_len=input_ids.shape[1], teacher_len=length, counted=(labels != -100).cpu())
        self.align_seconds += time.perf_counter() - start
        return ids.to(input_ids.device), index

    def _padded(self, seqs, length: int = 2) -> torch.Tensor:
        """The sequences' teacher ids, right-padded to the longest (and at least ``length``)."""
        ids = torch.full((len(seqs), max(length, max(len(s.ids) for s in seqs))), self.pad_id, dtype=torch.long)
        for b, s in enumerate(seqs):
            ids[b, :len(s.ids)] = torch.tensor(s.ids, dtype=torch.long)
        return ids

    def teacher_side(self, t_ids: torch.Tensor) -> TeacherSide:
        """The teacher run on its ids [batch, seq_t]: head inputs where it gives them, else its logits."""
        next_ids = torch.cat([t_ids[:, 1:], t_ids[:, -1:]], 1).reshape(-1)
        if "head" in self.inner.gives:
            hidden, weight, _ = self.inner.head_inputs(t_ids)
            if not self.checked:  # the loss's smallest step: 16 groups over both vocabularies, 4 fp32 buffers
                check_fits(16 * 4 * 4 * (weight.shape[0] + self.pair.student.size), t_ids.device,
                           f"the cross-tokenizer loss over {weight.shape[0]} + {self.pair.student.size} vocabulary "
                           "entries", "use tokenizers with smaller vocabularies")
                self.checked = True
            return TeacherSide(next_ids, hidden=hidden.reshape(-1, hidden.shape[-1]), weight=weight)
        check_fits(t_ids.numel() * self.inner.vocab_size * 4, t_ids.device,
                   f"the teacher's logits for {t_ids.shape[0]} x {t_ids.shape[1]} tokens over its "
                   f"{self.inner.vocab_size}-entry vocabulary (a teacher without head inputs gives them whole)",
                   "lower train.batch_size or data.seq_len")
        logits = self.inner.logits(t_ids)
        return TeacherSide(next_ids, logits=logits.reshape(-1, logits.shape[-1]))

    def cached_side(self, batch: dict, t_ids: torch.Tensor) -> TeacherSide:
        """The teacher's side read from a cross-tokenizer cache (``batch["teacher_ids"]`` [batch, n] and
        ``batch["teacher_topk"]``, right-padded), checked against the re-tokenisation ``t_ids``
        (padded at least as far)."""
        length = t_ids.shape[1]

        def pad(t, value):
            return torch.nn.functional.pad(t, (0, 0) * (t.dim() - 2) + (0, length - t.shape[1]), value=value)

        cached = pad(batch["teacher_ids"], -1)
        if not torch.equal(torch.where(cached < 0, self.pad_id, cached), t_ids):
            raise DistilError(f"the cache {self.inner.name} holds another re-tokenisation of the training windows "
                              "than the teacher's tokenizer gives now: written with another tokenizer or distil version")
        ids, logprobs, tail = (pad(t, v) for t, v in zip(batch["teacher_topk"], (-1, float("-inf"), 0.0)))
        flat = (ids.reshape(-1, ids.shape[-1]), logprobs.reshape(-1, ids.shape[-1]), tail.reshape(-1))
        next_ids = torch.cat([t_ids[:, 1:], t_ids[:, -1:]], 1).reshape(-1)
        return TeacherSide(next_ids, topk=flat, topk_vocab=self.inner.vocab_size,
                           topk_temperature=self.inner.cache.settings.temperature)

    def api_side(self, input_ids: torch.Tensor, labels: torch.Tensor) -> tuple[TeacherSide, GroupIndex]:
        """An API teacher (``inner.score_text``): each run of text is sent as it is and the server
        tokenises it itself; its tokens' byte spans come from the response's text offsets, so the
        groups follow the server's own tokenisation. A group counts when every token in it mapped onto
        the teacher's vocabulary and every position that scores it has the server's entries (a run's
        first token has none unless the server puts a BOS before it)."""
        start = time.perf_counter()
        k = self.inner.k

        def one(row: list[int]):
            t_ids: list[int] = []
            t_len: list[int] = []
            entries: dict[int, tuple] = {}
            for kind, value in self.pair.pieces(row):
                if kind == "special":
                    ids = self.pair.counterpart(value)
                    t_ids.extend(ids)
                    t_len.extend([0] * len(ids))
                elif kind == "stray":
                    t_ids.append(-1)
                    t_len.append(value)
                else:
                    scores = self.inner.score_text(value, k)
                    scores.lengths[:] = self._split_shared_spans(value, scores.ids, scores.lengths)
                    base = len(t_ids)
                    for i in range(1, len(scores.ids)):
                        if (scores.top_ids[i] >= 0).any():
                            entries[base + i - 1] = (scores.top_ids[i], scores.top_logprobs[i])
                    t_ids.extend(int(i) for i in scores.ids)
                    t_len.extend(int(n) for n in scores.lengths)
            groups = align(self.pair.student.lengths(row), t_len)
            keep = [g for g, (c, d) in enumerate(groups.teacher.tolist())
                    if all(t_ids[x] >= 0 for x in range(c, d)) and all(p in entries for p in range(c - 1, d - 1))]
            return t_ids, Groups(groups.student[keep], groups.teacher[keep]), entries

        rows = list(self.inner.pool.map(one, input_ids.tolist()))
        length = max(2, max(len(r[0]) for r in rows))
        t_ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        top_ids = torch.full((len(rows), length, k + 1), -1, dtype=torch.long)
        top_lp = torch.full((len(rows), length, k + 1), ABSENT_LOGPROB, dtype=torch.float32)
        for b, (ids, _, entries) in enumerate(rows):
            t_ids[b, :len(ids)] = torch.tensor(ids, dtype=torch.long).clamp_min(0)
            for p, (e_ids, e_lp) in entries.items():
                top_ids[b, p], top_lp[b, p] = torch.from_numpy(e_ids), torch.from_numpy(e_lp)
        tail = log1mexp(torch.where(top_ids >= 0, top_lp, float("-inf")).logsumexp(-1))  # 1 - the listed mass
        index = GroupIndex.build([(g.student, g.teacher) for _, g, _ in rows], merge=self.merge,
                                 student_len=input_ids.shape[1], teacher_len=length, counted=(labels != -100).cpu())
        device = input_ids.device
        next_ids = torch.cat([t_ids[:, 1:], t_ids[:, -1:]], 1).reshape(-1)
        side = TeacherSide(next_ids.to(device), topk=(top_ids.reshape(-1, k + 1).to(device),
                                                      top_lp.reshape(-1, k + 1).to(device), tail.reshape(-1).to(device)),
                           topk_vocab=self.pair.teacher.size)
        self.align_seconds += time.perf_counter() - start  # the requests' time too (answers on disk are fast)
        return side, index

    def _split_shared_spans(self, text: str, ids, lengths):
        """Text offsets count characters, so the tokens that spell one multi-byte character byte by
        byte (SentencePiece's byte fallback) share its offset: all but the last get no bytes. Where
        such a run's own bytes (from the teacher's vocabulary) spell exactly its span, each token gets
        its own; elsewhere the offsets stand."""
        data, out = text.encode("utf-8"), [int(n) for n in lengths]
        at = i = 0
        while i < len(out):
            j = i
            while j < len(out) and out[j] == 0:
                j += 1
            if j == len(out):
                break
            if j > i:
                pieces = [self.pair.teacher.pieces[t] if 0 <= t < self.pair.teacher.size else b"" for t in ids[i:j + 1]]
                if all(pieces) and b"".join(pieces) == data[at:at + out[j]]:
                    out[i:j + 1] = [len(piece) for piece in pieces]
            at += sum(out[i:j + 1])
            i = j + 1
        return out

    @torch.no_grad()
    def signal(self, batch: dict, request: Request, stream: dict | None = None) -> CrossSignal:
        input_ids, labels = batch["input_ids"], batch["labels"]
        if "text" in self.inner.gives:  # a server tokenises the text itself
            if any(p is not None for p in batch.get("teacher_prompts") or []):
                raise DistilError("chat prompts with an API teacher in another tokenizer are not supported yet: use "
                                  "plain-text prompts ({\"prompt\": ...}) or a model teacher")
            side, index = self.api_side(input_ids, labels)
        elif "teacher_ids" in batch:  # a cross-tokenizer top-k cache: its rows are padded to the batch's longest
            t_ids, index = self.retokenize(input_ids, labels, length=batch["teacher_ids"].shape[1])
            side = self.cached_side(batch, t_ids)
        else:
            t_ids, index = self.retokenize(input_ids, labels, batch.get("teacher_prompts"))
            side = self.teacher_side(t_ids)
        following = torch.cat([input_ids[:, 1:], input_ids[:, -1:]], 1)
        student_next = torch.where(labels != -100, labels, following)
        return CrossSignal(side, index, student_next, self.matched)

    @torch.no_grad()
    def topk_rows(self, input_ids: torch.Tensor, k: int, temperature: float = 1.0, chunk: int = 256) -> list[tuple]:
        """What a cross-tokenizer cache keeps of each row of student windows ``input_ids``: (the
        teacher's ids [n + 1], ids [n, k + 1] (-1 absent), log-probs at ``temperature`` [n, k + 1], the
        tail's log-mass [n]). The first k columns are the top-k; the last is the token produced at the
        position when the top-k lacks it, so a group's scale (its produced tokens' probabilities) is exact."""
        seqs = self.sequences(input_ids)
        t_ids = self._padded(seqs).to(input_ids.device)
        width = t_ids.shape[1]
        side = self.teacher_side(t_ids)
        rows = torch.cat([torch.arange(b * width, b * width + len(s.ids) - 1) for b, s in enumerate(seqs)])
        rows = rows.to(input_ids.device)
        vocab = side.vocab_size
        out: list[list[torch.Tensor]] = [[], [], []]
        for start in range(0, rows.numel(), chunk):
            r = rows[start:start + chunk]
            logp = torch.log_softmax(side.scores(r).float() / temperature, -1)
            top = logp.topk(min(k, vocab), dim=-1).indices
            produced = side.next_ids[r]
            extra = torch.where((top == produced[:, None]).any(-1), -1, produced)
            ids = torch.cat([top, extra[:, None]], 1)
            slots = torch.where(ids >= 0, ids, vocab)  # column V: a place for the absent slot
            rest = torch.nn.functional.pad(logp, (0, 1), value=float("-inf")).scatter(1, slots, float("-inf"))
            out[0].append(ids)
            out[1].append(torch.where(ids >= 0, logp.gather(1, ids.clamp_min(0)), float("-inf")))
            out[2].append(rest.logsumexp(-1))
        ids, logprobs, tail = (torch.cat(t).cpu().numpy() for t in out)
        result, at = [], 0
        for b, s in enumerate(seqs):
            n = len(s.ids) - 1
            result.append((t_ids[b, :n + 1].cpu().numpy(), ids[at:at + n], logprobs[at:at + n], tail[at:at + n]))
            at += n
        return result
