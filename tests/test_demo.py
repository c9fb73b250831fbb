"""The demo's pipeline on a tiny budget: every stage runs and the report says who won."""

import json

import pytest

from distil.demo import DemoSettings, run_demo, verdict


@pytest.mark.slow
def test_demo_pipeline_writes_an_honest_report(tmp_path):
    settings = DemoSettings(vocab_size=384, seq_len=32, batch_size=4, teacher=(48, 2, 2), student=(32, 1, 2),
                            teacher_steps=8, student_steps=4, val_every=2, val_batches=2, mc_items=8, max_docs=150,
                            hybrid_steps=2, decode_tokens=4, decode_context=16)
    results = run_demo(tmp_path / "demo", settings=settings, progress=False)
    assert set(results) == {"teacher", "ce", "forward_kl", "reverse_kl"}
    report = (tmp_path / "demo" / "report.md").read_text()
    assert verdict(results) in report
    for label in ("teacher", "hard-label CE only", "forward KL", "reverse KL"):
        assert f"| {label} |" in report
    assert "## 50% hybrid" in report and "MIL (from attention)" in report
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    for init in ("mil", "random"):
        assert {"kl_before", "kl_after", "val_loss", "decode_tokens_per_second"} <= set(summary["hybrids"][init])
    for plot in ("val_loss.png", "train_loss_ce.png", "train_loss_kd.png"):
        assert (tmp_path / "demo" / "plots" / plot).stat().st_size > 1000
    assert json.loads((tmp_path / "demo" / "summary.json").read_text())["complete"] is True
    # The tokenizer and every model are saved in loadable form.
    from transformers import AutoTokenizer

    from distil.models import load

    AutoTokenizer.from_pretrained(str(tmp_path / "demo" / "tokenizer"))
    assert load(tmp_path / "demo" / "checkpoints" / "forward_kl").num_parameters() == results["forward_kl"]["params"]
    # Checkpoints carry the tokenizer, so configs/debug-kd.yaml can use the demo's teacher as it is.
    from distil.data.tokenize import has_tokenizer

    for name in ("teacher", "forward_kl", "hybrid_mil"):
        assert has_tokenizer(tmp_path / "demo" / "checkpoints" / name), name


def test_verdict_reports_a_loss_for_distillation_too():
    results = {"teacher": {"val_loss": 1.0, "label": "teacher"},
               "ce": {"val_loss": 2.0, "label": "hard-label CE only"},
               "forward_kl": {"val_loss": 2.1, "label": "forward KL"},
               "reverse_kl": {"val_loss": 2.3, "label": "reverse KL"}}
    assert "did **not** beat" in verdict(results) and "0.100" in verdict(results)
    results["forward_kl"]["val_loss"] = 1.5
    assert "forward KL" in verdict(results) and "0.500 nats (25.0%)" in verdict(results)
