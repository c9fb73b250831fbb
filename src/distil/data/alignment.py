"""Token alignment between two tokenizers of the same text, by bytes (no torch).

    pair = TokenizerPair(student_tokenizer, teacher_tokenizer)
    ids, lengths = pair.teacher.encode("naïve café")   # ids and each token's byte length
    seq = pair.retokenize(student_ids)     # the teacher's ids of the same text, and the groups
    seq.ids, seq.groups.student[g], seq.groups.teacher[g]   # [start, end) token ranges of group g

A **group** is the shortest run of whole tokens on each side that covers the same bytes: groups
close wherever both tokenizations end on the same byte (as TRL's GOLD does). Every byte of the
text lies in exactly one group on each side, and the groups, joined, give the text back
(tests/test_cross_tokenizer.py checks this with hypothesis on random Unicode over real pairs).

Bytes, not characters, are the unit, so a token that holds half of a multi-byte character
(byte-level BPE, SentencePiece's byte fallback) aligns exactly. Each token's bytes come from the
tokenizer's own convention, read once per vocabulary entry (:class:`TokenBytes`):

* byte-level BPE (GPT-2, SmolLM2, Qwen, Llama 3, distil's own BPE): GPT-2's printable-byte table;
* SentencePiece-style BPE (Gemma, Llama 2, Mistral): ``▁`` is a space, ``<0xNN>`` is byte NN;
  a prefix space the tokenizer adds itself is not part of the text and is dropped;
* special tokens (BOS, EOS, chat markers) carry no bytes: they are context, in no group. Present on
  one side only, they change nothing; the student's EOS and BOS become the teacher's own.

A tokenizer whose text the bytes do not reproduce (a normalizer that rewrites text, such as NFKC
or lower-casing) falls back to the character offsets it reports; one that reports none is refused.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from distil.errors import DistilError

_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@lru_cache(maxsize=1)
def _byte_level_table() -> dict[str, int]:
    """GPT-2's map from the printable stand-in characters back to bytes."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, n = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + n)] = b
            n += 1
    return chars


def _decoder_kinds(backend) -> set[str]:
    import json

    decoder = json.loads(backend.to_str()).get("decoder") or {}
    kinds, stack = set(), [decoder]
    while stack:
        d = stack.pop()
        if isinstance(d, dict):
            kinds.add(d.get("type"))
            if d.get("type") == "Replace" and d.get("pattern", {}).get("String") == "\u2581":
                kinds.add("metaspace")
            stack.extend(d.get("decoders") or [])
    return kinds


class TokenBytes:
    """The bytes of every token of one tokenizer, and its special tokens (which have none)."""

    def __init__(self, tokenizer, name: str = "tokenizer"):
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise DistilError(f"the {name} is not a fast (Rust) tokenizer: cross-tokenizer alignment needs its "
                              "byte offsets; load it with use_fast=True or convert it to tokenizer.json")
        self.tokenizer, self.name = tokenizer, name
        kinds = _decoder_kinds(backend)
        if "ByteLevel" in kinds:
            self.convention = "byte_level"
        elif "metaspace" in kinds or "Metaspace" in kinds:
            self.convention = "sentencepiece"
        else:
            raise DistilError(f"the {name}'s tokens cannot be read as bytes (decoder {sorted(k for k in kinds if k)} "
                              "is neither byte-level nor SentencePiece-style); cross-tokenizer alignment supports those")
        self.special = frozenset(int(i) for i in tokenizer.all_special_ids)
        added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
        self.special |= {int(i) for i, t in added.items() if getattr(t, "special", False)}
        vocab = tokenizer.get_vocab()
        self.size = max(len(tokenizer), max(vocab.values()) + 1)
        self.pieces: list[bytes] = [b""] * self.size
        table, added_ids = _byte_level_table(), {int(k) for k in added}
        for piece, i in vocab.items():
            if i not in self.special:
                self.pieces[i] = self._bytes(piece, table, i in added_ids)
        self.bos = getattr(tokenizer, "bos_token_id", None)
        self.eos = getattr(tokenizer, "eos_token_id", None)

    def _bytes(self, piece: str, table: dict, is_added: bool) -> bytes:
        if is_added:  # added (non-special) tokens hold their text as it is
            return piece.encode("utf-8")
        if self.convention == "byte_level":
            try:
                return bytes(table[c] for c in piece)
            except KeyError:  # a piece outside the byte table (an added word): its own text
                return piece.encode("utf-8")
        m = _BYTE_PIECE.match(piece)
        if m:
            return bytes([int(m.group(1), 16)])
        return piece.replace("\u2581", " ").encode("utf-8")

    def lengths(self, ids) -> np.ndarray:
        return np.fromiter((len(self.pieces[i]) if 0 <= i < self.size else 0 for i in ids), dtype=np.int64,
                           count=len(ids))

    def join(self, ids) -> bytes:
        return b"".join(self.pieces[i] for i in ids if 0 <= i < self.size)

    def encode(self, text: str) -> tuple[list[int], np.ndarray]:
        """(ids without special tokens, each token's byte length), the lengths summing to the text's
        bytes. Bytes the tokenizer drops (SmolLM2 has no token for some control characters) come back
        as filler entries with id -1, which align with nothing."""
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        data = text.encode("utf-8")
        if self.join(ids) == data:
            return ids, self.lengths(ids)
        found = self._by_search(data, ids)  # a prefix space the tokenizer adds, or bytes it dropped
        if found is not None:
            return found
        split = self._around_unspellable(text)
        return split if split is not None else self._from_offsets(text, ids, enc.get("offset_mapping"))

    def _around_unspellable(self, text: str):
        """Characters the tokenizer cannot spell byte for byte (SmolLM2 has no token for the lead
        bytes 0xF1-0xF3 of code points U+40000-U+FFFFF, and merges the bytes around the gap) become
        fillers, and the text between them is tokenised on its own. None when every character spells."""
        def spells(char: str) -> bool:
            ids = self.tokenizer(char, add_special_tokens=False)["input_ids"]
            return self.join(ids).endswith(char.encode("utf-8"))

        bad = {c for c in set(text) if not spells(c)}
        if not bad:
            return None
        out_ids: list[int] = []
        out_len: list[int] = []
        for spelled, chars in itertools.groupby(text, key=lambda c: c not in bad):
            run = "".join(chars)
            if spelled:
                ids, lengths = self.encode(run)
                out_ids.extend(ids)
                out_len.extend(int(n) for n in lengths)
            else:
                out_ids.extend([-1] * len(run))
                out_len.extend(len(c.encode("utf-8")) for c in run)
        return out_ids, np.asarray(out_len, dtype=np.int64)

    def _by_search(self, data: bytes, ids: list[int]):
        """Each token's bytes found in order in ``data``; bytes in between (dropped by the tokenizer)
        become fillers. None when a token's bytes are not there (the tokenizer rewrote the text)."""
        out_ids, out_len, at = [], [], 0
        for i in ids:
            piece = self.pieces[i] if 0 <= i < self.size else b""
            if not piece:
                out_ids.append(i)
                out_len.append(0)
                continue
            if at == 0 and piece[:1] == b" " and not data.startswith(piece) and data.startswith(piece[1:]):
                piece = piece[1:]  # the prefix space
            found = data.find(piece, at)
            if found < 0:
                return None
            if found > at:
                out_ids.append(-1)
                out_len.append(found - at)
            out_ids.append(i)
            out_len.append(len(piece))
            at = found + len(piece)
        if at < len(data):
            out_ids.append(-1)
            out_len.append(len(data) - at)
        return out_ids, np.asarray(out_len, dtype=np.int64)

    def _from_offsets(self, text: str, ids: list[int], offsets) -> tuple[list[int], np.ndarray]:
        """Byte lengths from character offsets (a tokenizer that drops or rewrites text): each
        character's bytes go to the first token that covers it; characters no token covers become
        fillers (id -1)."""
        if offsets is None or len(offsets) != len(ids):
            raise DistilError(f"the {self.name}'s tokens do not spell the text and it gives no offsets")
        char_bytes = np.cumsum([0] + [len(c.encode("utf-8")) for c in text])
        out_ids, out_len, covered = [], [], 0
        for i, (start, end) in zip(ids, offsets):
            if start > covered:
                out_ids.append(-1)
                out_len.append(int(char_bytes[start] - char_bytes[covered]))
                covered = start
            out_ids.append(i)
            out_len.append(int(char_bytes[end] - char_bytes[covered]) if end > covered else 0)
            covered = max(covered, end)
        if covered < len(text):
            out_ids.append(-1)
            out_len.append(int(char_bytes[-1] - char_bytes[covered]))
        return out_ids, np.asarray(out_len, dtype=np.int64)


@dataclass(frozen=True)
class Groups:
    """Aligned groups of one sequence pair: [start, end) token ranges, one row per group."""

    student: np.ndarray  # [G, 2]
    teacher: np.ndarray  # [G, 2]

    def __len__(self) -> int:
        return len(self.student)


def align(student_lengths, teacher_lengths) -> Groups:
    """Groups of two tokenizations of the same bytes, given each token's byte length (0 for special
    tokens). A group runs from one byte boundary both sides share to the next. Zero-length tokens at
    a shared boundary belong to no group; inside a group they belong to it."""
    s_len = [int(n) for n in student_lengths]
    t_len = [int(n) for n in teacher_lengths]
    n_s, n_t = len(s_len), len(t_len)
    s_rows, t_rows = [], []
    i = j = s_pos = t_pos = 0
    while True:
        while i < n_s and s_len[i] == 0:
            i += 1
        while j < n_t and t_len[j] == 0:
            j += 1
        if i >= n_s or j >= n_t:
            break
        if s_pos != t_pos:  # not at a shared boundary: the side behind moves on
            if s_pos < t_pos:
                s_pos += s_len[i]
                i += 1
            else:
                t_pos += t_len[j]
                j += 1
            continue
        a, c = i, j
        s_pos, t_pos, i, j = s_pos + s_len[i], t_pos + t_len[j], i + 1, j + 1
        while s_pos != t_pos:
            if s_pos < t_pos:
                if i >= n_s:
                    break
                s_pos, i = s_pos + s_len[i], i + 1
            else:
                if j >= n_t:
                    break
                t_pos, j = t_pos + t_len[j], j + 1
        if s_pos == t_pos:
            s_rows.append((a, i))
            t_rows.append((c, j))
    return Groups(np.asarray(s_rows, dtype=np.int64).reshape(-1, 2), np.asarray(t_rows, dtype=np.int64).reshape(-1, 2))


def _utf8_runs(data: bytes) -> list[tuple[str | None, int]]:
    """``data`` as runs of decodable text and of stray bytes (a window cut inside a character, a byte
    a tokenizer dropped): [(text, n_bytes)] with text None for a stray run."""
    runs: list[tuple[str | None, int]] = []
    for run in re.split("([\udc80-\udcff]+)", data.decode("utf-8", errors="surrogateescape")):
        if not run:
            continue
        if "\udc80" <= run[0] <= "\udcff":
            runs.append((None, len(run)))
        else:
            runs.append((run, len(run.encode("utf-8"))))
    return runs


@dataclass(frozen=True)
class Retokenized:
    """A student sequence as the teacher reads it: its ids, each one's byte length, and the groups."""

    ids: list[int]
    lengths: list[int]
    groups: Groups


class TokenizerPair:
    """A student's and a teacher's tokenizer: byte tables, the vocabulary entries they share, and
    re-tokenisation of student sequences for the teacher."""

    def __init__(self, student_tokenizer, teacher_tokenizer):
        self.student = TokenBytes(student_tokenizer, "student's tokenizer")
        self.teacher = TokenBytes(teacher_tokenizer, "teacher's tokenizer")
        from distil.data.tokenize import bos_id

        self.teacher_bos = bos_id(teacher_tokenizer)  # the teacher wants it before every text
        self.identical = self.student.pieces == self.teacher.pieces and self.student.special == self.teacher.special

    def matched(self) -> tuple[np.ndarray, np.ndarray]:
        """(student ids, teacher ids) of the vocabulary entries with the same bytes (non-special,
        non-empty), in student-id order; each id appears once (the lowest id for a duplicate)."""
        teacher_index: dict[bytes, int] = {}
        for i, b in enumerate(self.teacher.pieces):
            if b and b not in teacher_index:
                teacher_index[b] = i
        s_ids, t_ids, seen = [], [], set()
        for i, b in enumerate(self.student.pieces):
            j = teacher_index.get(b) if b else None
            if j is not None and j not in seen:
                seen.add(j)
                s_ids.append(i)
                t_ids.append(j)
        return np.asarray(s_ids, dtype=np.int64), np.asarray(t_ids, dtype=np.int64)

    def retokenize(self, student_ids, *, bos: bool = True) -> Retokenized:
        """The teacher's ids for the text of ``student_ids`` (one sequence, e.g. a training window) and
        the groups. The text is cut at the student's special tokens; each piece is tokenised by the
        teacher alone, and a student EOS becomes the teacher's EOS (then its BOS where it wants one).
        The teacher's BOS opens the sequence where its tokenizer adds one (and ``bos``)."""
        ids = [int(i) for i in student_ids]
        s_len = self.student.lengths(ids)
        t_ids: list[int] = [self.teacher_bos] if bos and self.teacher_bos is not None else []
        t_len: list[int] = [0] * len(t_ids)
        for kind, value in self.pieces(ids):
            if kind == "special":  # the teacher's counterpart, no bytes
                t_ids.extend(self.counterpart(value))
                t_len.extend([0] * (len(t_ids) - len(t_len)))
            elif kind == "stray":  # bytes the teacher cannot read: a filler that aligns with nothing
                t_ids.append(-1)
                t_len.append(value)
            else:
                piece, lengths = self.teacher.encode(value)
                t_ids.extend(piece)
                t_len.extend(int(n) for n in lengths)
        return self.finish(s_len, t_ids, t_len)

    def pieces(self, student_ids):
        """The text of ``student_ids`` as the teacher is to read it, in order: ("special", student id),
        ("stray", n bytes) for bytes that are no whole character, ("text", str)."""
        ids = [int(i) for i in student_ids]
        s_len = self.student.lengths(ids)
        i = 0
        while i < len(ids):
            if s_len[i] == 0:
                yield "special", ids[i]
                i += 1
                continue
            j = i
            while j < len(ids) and s_len[j] > 0:
                j += 1
            for text, n_bytes in _utf8_runs(self.student.join(ids[i:j])):
                yield ("stray", n_bytes) if text is None else ("text", text)
            i = j

    def finish(self, s_len, t_ids: list[int], t_len: list[int]) -> Retokenized:
        """The groups of the student's token lengths ``s_len`` and the teacher's sequence; fillers (id
        -1) are dropped, and the groups that hold one with them."""
        groups = align(s_len, t_len)
        if -1 in t_ids:  # drop the fillers; groups that hold one are dropped with them
            keep = [k for k, t in enumerate(t_ids) if t >= 0]
            new_index = np.full(len(t_ids), -1, dtype=np.int64)
            new_index[keep] = np.arange(len(keep))
            rows = [k for k, (a, b) in enumerate(groups.teacher) if all(t_ids[x] >= 0 for x in range(a, b))]
            teacher = groups.teacher[rows]
            teacher = np.stack([new_index[teacher[:, 0]], new_index[teacher[:, 1] - 1] + 1], axis=1)
            groups = Groups(groups.student[rows], teacher.reshape(-1, 2))
            t_ids = [t_ids[k] for k in keep]
            t_len = [t_len[k] for k in keep]
        return Retokenized(t_ids, t_len, groups)

    def retokenize_reply(self, teacher_prompt, student_prompt_len: int, student_reply) -> Retokenized:
        """A chat row whose prompt each side renders with its own chat template: the teacher reads its
        own prompt ids (``teacher_prompt``), then the text of the student's reply tokens; the groups
        cover the reply only (the two prompts are different text), as positions of the whole rows
        (the student's prompt is ``student_prompt_len`` tokens)."""
        prompt = [int(i) for i in teacher_prompt]
        reply = self.retokenize(student_reply, bos=False)
        groups = Groups(reply.groups.student + student_prompt_len, reply.groups.teacher + len(prompt))
        return Retokenized(prompt + reply.ids, [int(n) for n in self.teacher.lengths(prompt)] + reply.lengths, groups)

    def counterpart(self, student_id: int) -> list[int]:
        """The teacher's tokens for a student special token: its EOS (then its BOS where it wants one)
        for the student's EOS, its BOS for the student's BOS, nothing for the rest."""
        s, t = self.student, self.teacher
        out = []
        if student_id == s.eos and t.eos is not None:
            out.append(int(t.eos))
            if self.teacher_bos is not None:
                out.append(self.teacher_bos)
        elif student_id == s.bos and self.teacher_bos is not None:
            out.append(self.teacher_bos)
        return out
