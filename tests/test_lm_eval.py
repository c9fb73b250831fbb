"""The lm-evaluation-harness adapter on a local task over a JSONL the test writes."""

import json

import pytest
import torch

from distil.models.io import save_native

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is an optional extra: pip install -e '.[eval]'")


@pytest.mark.slow
def test_lm_eval_runs_a_distil_model_on_a_local_task(tmp_path, tiny_tokenizer, tiny_docs, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from distil.eval.lm_eval_adapter import run_lm_eval
    from distil.eval.multiple_choice import Item, score_multiple_choice
    from distil.hybrid import hybridize
    from distil.models import ModelConfig, TransformerLM

    torch.manual_seed(0)
    base = TransformerLM(ModelConfig(vocab_size=len(tiny_tokenizer), d_model=32, n_layers=2, n_heads=2))
    model = hybridize(base, [1], d_state=8, chunk_size=8, init="mil_plain")  # a hybrid goes through lm-eval too
    save_native(model, tmp_path / "model")
    tiny_tokenizer.save_pretrained(str(tmp_path / "model"))
    records = []
    for i, doc in enumerate(tiny_docs[:12]):
        words = doc.split()
        records.append({"context": " ".join(words[:8]), "choices": [words[8], "banana", "zebra", words[9]], "label": i % 4})
    data = tmp_path / "toy.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "toy.yaml").write_text(f"""task: distil_toy_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: context
doc_to_choice: choices
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""")
    results = run_lm_eval(str(tmp_path / "model"), ["distil_toy_mc"], include_path=str(tasks), batch_size=4)
    acc = results["distil_toy_mc"]["acc,none"]
    # lm-eval joins context and choice with a space; distil's own scorer on the same items agrees.
    items = [Item(r["context"], [" " + c for c in r["choices"]], r["label"]) for r in records]
    ours = score_multiple_choice(model.eval(), tiny_tokenizer, items)
    assert acc == pytest.approx(ours["acc"])
