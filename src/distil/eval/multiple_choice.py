"""Multiple choice scored by likelihood, the way HellaSwag is scored for small models.

    items = load_items("hellaswag_val.jsonl")        # HellaSwag or generic JSONL
    result = score_multiple_choice(model, tokenizer, items, num_fewshot=0)
    # {"acc": 0.31, "acc_norm": 0.33, "n": 1000}

Each choice is appended to the context and the model's summed log-probability of the choice's
tokens is its score. ``acc`` takes the highest sum; ``acc_norm`` divides each sum by the choice's
length in bytes of UTF-8 (lm-evaluation-harness's convention) or, with ``norm="tokens"``, in tokens,
so longer endings are not penalised for their length.

Input formats (one JSON object per line):
* HellaSwag: ``ctx`` (or ``ctx_a`` + ``ctx_b``), ``endings``, ``label``, optional ``activity_label``;
  the usual preprocessing is applied (``[title]`` -> ``. ``, other ``[tags]`` dropped).
* Generic: ``context``, ``choices``, ``label``.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from distil.data.corpus import read_jsonl
from distil.data.tokenize import bos_id
from distil.errors import DistilError
from distil.runtime import adapt_threads


@dataclass
class Item:
    context: str
    choices: list[str]
    label: int


def _hellaswag_preprocess(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def parse_item(record: dict, where: str) -> Item:
    if "endings" in record:
        if "ctx" in record:
            ctx = record["ctx"]
        else:
            ctx = record["ctx_a"] + " " + record.get("ctx_b", "").capitalize()
        if record.get("activity_label"):
            ctx = record["activity_label"] + ": " + ctx
        context = _hellaswag_preprocess(ctx)
        choices = [" " + _hellaswag_preprocess(e) for e in record["endings"]]
    elif "choices" in record and "context" in record:
        context, choices = record["context"], list(record["choices"])
    else:
        raise DistilError(f"{where}: expected HellaSwag fields (ctx, endings, label) or generic ones (context, choices, label)")
    label = int(record.get("label", -1))
    if not 0 <= label < len(choices):
        raise DistilError(f"{where}: label {record.get('label')!r} is not the index of one of {len(choices)} choices")
    return Item(context, choices, label)


def load_items(path: str | Path) -> list[Item]:
    path = Path(path)
    if not path.is_file():
        raise DistilError(f"multiple-choice file not found: {path}")
    items = [parse_item(record, f"{path}:{line_no}") for line_no, record in read_jsonl(path)]
    if not items:
        raise DistilError(f"multiple-choice file {path} has no items")
    return items


def _encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    # As lm-evaluation-harness: trailing spaces of the context move to the continuation, and the
    # two are encoded separately so the continuation's tokens are the same for every context.
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    cont = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    bos = bos_id(tokenizer)
    if bos is not None:  # models whose tokenizer puts BOS first (Gemma, Llama 3) read every context after it
        ctx = [bos, *ctx]
    if not ctx and tokenizer.eos_token_id is not None:
        ctx = [tokenizer.eos_token_id]
    return ctx, cont


@torch.no_grad()
def continuation_logprobs(model, tokenizer, pairs, *, batch_size: int = 16, max_len: int = 2048, device="cpu",
                          logits_fn=None, progress: bool = False, return_greedy: bool = False) -> list[tuple]:
    """(summed log-prob, number of tokens) of each continuation given its context; with
    ``return_greedy`` also whether every continuation token is the model's argmax (lm-eval's is_greedy)."""
    logits_fn = logits_fn or (lambda ids: model(ids))
    encoded = [_encode_pair(tokenizer, c, x) for c, x in pairs]
    results: list[tuple[float, int]] = []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for start in tqdm(range(0, len(encoded), batch_size), desc="choices", disable=not progress, leave=False):
        adapt_threads()
        batch = encoded[start : start + batch_size]
        seqs = []
        for ctx, cont in batch:
            ids = (ctx + cont)[-(max_len + 1) :]
            seqs.append((ids, min(len(cont), len(ids) - 1)))
        width = max(len(ids) for ids, _ in seqs) - 1
        inputs = torch.full((len(seqs), width), pad, dtype=torch.long)
        for row, (ids, _) in enumerate(seqs):
            inputs[row, : len(ids) - 1] = torch.tensor(ids[:-1])
        logprobs = F.log_softmax(logits_fn(inputs.to(device)).float(), dim=-1).cpu()
        for row, (ids, num_cont) in enumerate(seqs):
            end = len(ids) - 1
            positions = torch.arange(end - num_cont, end)
            targets = torch.tensor(ids[end - num_cont + 1 : end + 1])
            total = logprobs[row, positions, targets].sum().item()
            if return_greedy:
                greedy = bool((logprobs[row, positions].argmax(-1) == targets).all())
                results.append((total, num_cont, greedy))
            else:
                results.append((total, num_cont))
    return results


def score_multiple_choice(model, tokenizer, items: list[Item], *, num_fewshot: int = 0, fewshot_pool: list[Item] | None = None,
                          norm: str = "bytes", batch_size: int = 16, device="cpu", seed: int = 0, logits_fn=None,
                          progress: bool = False) -> dict:
    """Accuracy by summed log-prob (acc) and by length-normalised log-prob (acc_norm)."""
    if norm not in ("bytes", "tokens"):
        raise DistilError(f"norm {norm!r} should be 'bytes' or 'tokens'")
    rng = random.Random(seed)
    pairs, owners = [], []
    for index, item in enumerate(items):
        prefix = ""
        if num_fewshot:
            pool = [x for x in (fewshot_pool or items) if x is not item]
            if len(pool) < num_fewshot:
                raise DistilError(f"num_fewshot = {num_fewshot} but only {len(pool)} examples to draw from")
            shots = rng.sample(pool, num_fewshot)
            prefix = "".join(s.context + s.choices[s.label] + "\n\n" for s in shots)
        for choice in item.choices:
            pairs.append((prefix + item.context, choice))
            owners.append(index)
    scores = continuation_logprobs(model, tokenizer, pairs, batch_size=batch_size, device=device,
                                   logits_fn=logits_fn, progress=progress)
    correct = correct_norm = 0
    cursor = 0
    for item in items:
        item_scores = scores[cursor : cursor + len(item.choices)]
        cursor += len(item.choices)
        sums = [s for s, _ in item_scores]
        if norm == "bytes":
            lengths = [max(len(c.encode("utf-8")), 1) for c in item.choices]
        else:
            lengths = [max(n, 1) for _, n in item_scores]
        normed = [s / n for s, n in zip(sums, lengths)]
        correct += int(max(range(len(sums)), key=sums.__getitem__) == item.label)
        correct_norm += int(max(range(len(normed)), key=normed.__getitem__) == item.label)
    return {"acc": correct / len(items), "acc_norm": correct_norm / len(items), "n": len(items)}


def continuation_items(docs: list[str], tokenizer, *, num_items: int, context_tokens: int = 48,
                       continuation_tokens: int = 24, num_choices: int = 4, seed: int = 0) -> list[Item]:
    """A HellaSwag-like task from held-out text: pick the true next passage among ``num_choices``.

    Each item takes a passage's first ``context_tokens`` tokens as the context; the right choice is
    its next ``continuation_tokens`` tokens, the distractors are same-length passages from other
    documents.
    """
    rng = random.Random(seed)
    need = context_tokens + continuation_tokens
    pieces = []
    for doc in docs:
        ids = tokenizer(doc, add_special_tokens=False)["input_ids"]
        if len(ids) >= need:
            pieces.append(ids)
    if len(pieces) < num_choices:
        raise DistilError(f"only {len(pieces)} held-out documents are long enough to build multiple-choice items")
    items = []
    for index in rng.sample(range(len(pieces)), min(num_items, len(pieces))):
        ids = pieces[index]
        context = tokenizer.decode(ids[:context_tokens])
        true_cont = tokenizer.decode(ids[context_tokens:need])
        others = rng.sample([j for j in range(len(pieces)) if j != index], num_choices - 1)
        distractors = []
        for j in others:
            other = pieces[j]
            offset = rng.randrange(0, len(other) - continuation_tokens + 1)
            distractors.append(tokenizer.decode(other[offset : offset + continuation_tokens]))
        label = rng.randrange(num_choices)
        choices = distractors[:label] + [true_cont] + distractors[label:]
        items.append(Item(context, choices, label))
    return items
