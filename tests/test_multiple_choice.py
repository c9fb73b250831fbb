"""Multiple-choice scoring: a model whose right answers are known, acc_norm on unequal lengths, formats."""

import json

import pytest
import torch

from distil.errors import DistilError
from distil.eval.multiple_choice import Item, load_items, parse_item, score_multiple_choice


class BigramModel(torch.nn.Module):
    """A fixed model: log p(next | current) from a table, so every score can be computed by hand."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = table  # [V, V] logits

    def forward(self, ids):
        return self.table[ids]


class CharTokenizer:
    """One token per character of a tiny alphabet."""

    alphabet = " abcdefgh\n"
    eos_token_id = 0
    pad_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [self.alphabet.index(c) for c in text]}


def _model():
    V = len(CharTokenizer.alphabet)
    table = torch.full((V, V), -5.0)
    table[1, 2] = 5.0  # after "a" comes "b"
    table[2, 3] = 5.0  # after "b" comes "c"
    table[3, 4] = 5.0  # after "c" comes "d"
    return BigramModel(table)


def _logp(prev: str, nxt: str) -> float:
    tok = CharTokenizer()
    return torch.log_softmax(_model().table[tok.alphabet.index(prev)], -1)[tok.alphabet.index(nxt)].item()


def test_known_answers_and_scores():
    items = [Item("a", ["b", "e", "f", "g"], 0), Item("ab", ["h", "c", "e", "g"], 1), Item("abc", ["e", "f", "g", "d"], 3)]
    result = score_multiple_choice(_model(), CharTokenizer(), items)
    assert result == {"acc": 1.0, "acc_norm": 1.0, "n": 3}
    # The scores themselves: summed log-probs of the continuation's tokens.
    from distil.eval.multiple_choice import continuation_logprobs

    (total, n), = continuation_logprobs(_model(), CharTokenizer(), [("a", "bc")])
    assert n == 2 and total == pytest.approx(_logp("a", "b") + _logp("b", "c"))


def test_acc_norm_on_endings_of_unequal_length():
    # A long ending of individually likely characters against one short, less likely character:
    # the summed log-prob prefers the short ending, the per-character (per-byte) one the long ending.
    tok = CharTokenizer()
    table = torch.zeros(len(tok.alphabet), len(tok.alphabet))
    a, b, c, d, e = (tok.alphabet.index(x) for x in "abcde")
    table[a, b], table[a, e] = 2.0, 1.5
    table[b, c], table[c, d] = 2.0, 2.0
    model = BigramModel(table)

    def logp(prev, nxt):
        return torch.log_softmax(table[prev], -1)[nxt].item()

    long_sum = logp(a, b) + logp(b, c) + logp(c, d)
    short_sum = logp(a, e)
    assert long_sum < short_sum and long_sum / 3 > short_sum  # the case where normalising matters
    items = [Item("a", ["bcd", "e"], 0)]
    result = score_multiple_choice(model, tok, items)
    assert result["acc"] == 0.0 and result["acc_norm"] == 1.0
    assert score_multiple_choice(model, tok, items, norm="tokens")["acc_norm"] == 1.0  # one token per character


def test_few_shot_prefixes_examples():
    items = [Item("a", ["b", "e"], 0), Item("b", ["c", "f"], 0), Item("c", ["d", "g"], 0)]
    assert score_multiple_choice(_model(), CharTokenizer(), items, num_fewshot=1)["n"] == 3
    with pytest.raises(DistilError, match="num_fewshot"):
        score_multiple_choice(_model(), CharTokenizer(), items, num_fewshot=5)


def test_hellaswag_and_generic_formats(tmp_path):
    hs = {"activity_label": "Baking", "ctx_a": "A man [title] mixes flour.", "ctx_b": "then he", "endings": ["bakes.", "sings.", "x", "y"], "label": "0"}
    item = parse_item(hs, "x")
    assert item.context == "Baking: A man.  mixes flour. Then he".replace("  ", " ") and item.choices[0] == " bakes." and item.label == 0
    generic = {"context": "c", "choices": ["a", "b"], "label": 1}
    assert parse_item(generic, "x") == Item("c", ["a", "b"], 1)
    path = tmp_path / "mc.jsonl"
    path.write_text(json.dumps(hs) + "\n" + json.dumps(generic) + "\n")
    assert len(load_items(path)) == 2
    path.write_text(json.dumps({"context": "c", "choices": ["a"], "label": 3}) + "\n")
    with pytest.raises(DistilError, match="label"):
        load_items(path)
