"""Prompts for on-policy distillation: the student writes the completions, the teacher grades them.

    prompts = load_prompts("prompts.jsonl", tokenizer)          # or "corpus:topics", "corpus:passages"
    prompts[0].ids, prompts[0].completion                        # token ids; the completion may be None
    load_prompts(path, tokenizer, teacher_tokenizer=teacher_tok)  # chat prompts also in the teacher's template

Sources:

* a JSONL file, one object per line: ``{"prompt": "..."}`` (optionally ``"completion": "..."``, the
  dataset's answer, which GKD's off-policy steps train on), or ``{"messages": [...]}`` in the chat
  format, formatted with the tokenizer's chat template (a final assistant message is the
  completion; the prompt ends with the template's generation prompt);
* ``corpus:topics``: one prompt per Python documentation topic of the embedded corpus,
  "Explain <topic> in Python.", whose completion is the topic's own documentation;
* ``corpus:passages``: the first ``prompt_tokens`` tokens of each embedded-corpus document, whose
  completion is the document's next tokens.

Prompt tokens are never in the loss (the batch source masks them); prompts longer than
``max_prompt_tokens`` keep their last tokens.

A teacher with another tokenizer (``teacher_tokenizer``, loss.cross_tokenizer) reads a chat prompt as
its own chat template renders the same messages (``Prompt.teacher_ids``, also cut to its last
``max_prompt_tokens``); both templates must exist. Plain-text prompts are the same text on both sides.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from distil.data.corpus import embedded_corpus, read_jsonl
from distil.errors import DistilError

CORPUS_SOURCES = ("corpus:topics", "corpus:passages")


@dataclass(frozen=True)
class Prompt:
    ids: tuple[int, ...]
    completion: tuple[int, ...] | None = None  # the dataset's completion, when it has one
    teacher_ids: tuple[int, ...] | None = None  # a chat prompt in the teacher's own template (another tokenizer)


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _chat(tokenizer, messages: list, where: str, whose: str = "the tokenizer") -> tuple[list[int], list[int] | None]:
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and "role" in m and "content" in m for m in messages):
        raise DistilError(f"{where}: 'messages' must be a list of {{role, content}} objects")
    if getattr(tokenizer, "chat_template", None) is None:
        raise DistilError(f"{where}: {whose} has no chat template; give 'prompt' text instead of 'messages'")
    answer = messages[-1]["content"] if messages[-1]["role"] == "assistant" else None
    turns = messages[:-1] if answer is not None else messages
    text = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    completion = _encode(tokenizer, answer) + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []) \
        if answer is not None else None
    return _encode(tokenizer, text), completion


def load_prompts(source: str | Path, tokenizer, *, prompt_tokens: int = 32, completion_tokens: int = 128,
                 max_prompt_tokens: int = 256, limit: int | None = None, seed: int = 0,
                 teacher_tokenizer=None) -> list[Prompt]:
    """The prompts of ``source`` (a JSONL path or one of ``CORPUS_SOURCES``), tokenized; chat prompts
    also in ``teacher_tokenizer``'s own template when the teacher has another tokenizer."""
    source = str(source)
    prompts: list[Prompt] = []
    if source == "corpus:topics":
        from pydoc_data.topics import topics

        for name in sorted(topics):
            text = topics[name].strip()
            if text:
                prompts.append(Prompt(tuple(_encode(tokenizer, f"Explain {name} in Python.\n")),
                                      tuple(_encode(tokenizer, text[: 16 * completion_tokens])[:completion_tokens])))
    elif source == "corpus:passages":
        docs = embedded_corpus()
        random.Random(seed).shuffle(docs)  # in a seeded order, so that ``limit`` needs only the documents it keeps
        for doc in docs:
            ids = _encode(tokenizer, doc[: 16 * (prompt_tokens + completion_tokens)])  # the start is all it uses
            if len(ids) > prompt_tokens:
                prompts.append(Prompt(tuple(ids[:prompt_tokens]), tuple(ids[prompt_tokens:][:completion_tokens])))
            if limit and len(prompts) >= limit:
                break
    elif source.startswith("corpus:"):
        raise DistilError(f"unknown prompt source {source!r}; the corpus gives {', '.join(CORPUS_SOURCES)}")
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise DistilError(f"prompt file not found: {path}")
        for line_no, record in read_jsonl(path):
            where = f"{path}:{line_no}"
            if not isinstance(record, dict):
                raise DistilError(f"{where}: expected a JSON object with 'prompt' or 'messages'")
            teacher_ids = None
            if "messages" in record:
                whose = "the student's tokenizer" if teacher_tokenizer is not None else "the tokenizer"
                ids, completion = _chat(tokenizer, record["messages"], where, whose)
                if teacher_tokenizer is not None:
                    teacher_ids, _ = _chat(teacher_tokenizer, record["messages"], where, "the teacher's tokenizer")
            elif isinstance(record.get("prompt"), str):
                ids = _encode(tokenizer, record["prompt"])
                completion = _encode(tokenizer, record["completion"]) if isinstance(record.get("completion"), str) \
                    else None
            else:
                raise DistilError(f"{where}: expected 'prompt' (text) or 'messages' (chat)")
            if not ids:
                raise DistilError(f"{where}: the prompt is empty")
            prompts.append(Prompt(tuple(ids), tuple(completion) if completion else None,
                                  tuple(teacher_ids) if teacher_ids else None))
    if not prompts:
        raise DistilError(f"{source}: no prompts")
    prompts = [Prompt(p.ids[-max_prompt_tokens:], p.completion,
                      p.teacher_ids[-max_prompt_tokens:] if p.teacher_ids else None) for p in prompts]
    if source == "corpus:topics":
        random.Random(seed).shuffle(prompts)
    return prompts[:limit] if limit else prompts
