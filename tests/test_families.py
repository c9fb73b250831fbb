"""Every command on the newer families (Gemma 3 here, the layout furthest from Llama): a tiny random
transformers Gemma 3 with a tokenizer is evaluated, distilled through the fused loss, cached, sampled,
hybridized and exported, each through the CLI's own entry point."""

import json

import pytest
import torch
import transformers

from distil.cli import main
from distil.models import load


@pytest.fixture
def gemma_folder(tmp_path, tiny_tokenizer):
    torch.manual_seed(0)
    cfg = transformers.Gemma3TextConfig(vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=6, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                        sliding_window=8, max_position_embeddings=256, query_pre_attn_scalar=16,
                                        pad_token_id=0, bos_token_id=0, eos_token_id=0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "gemma")
    tiny_tokenizer.save_pretrained(str(tmp_path / "gemma"))
    return tmp_path / "gemma"


def _run(*argv):
    try:
        main([str(a) for a in argv])
    except SystemExit as e:
        assert e.code in (0, None), f"distil {' '.join(map(str, argv))} exited {e.code}"


def test_every_command_runs_on_a_gemma3_teacher(tmp_path, gemma_folder, tiny_corpus_file, caplog):
    teacher = load(gemma_folder)
    assert teacher.config.family == "gemma3_text" and teacher.config.layer_types.count("full") == 1

    # eval: loss and KL against itself (zero), natively.
    _run("eval", "--model", gemma_folder, "--data", tiny_corpus_file, "--seq-len", 32, "--teacher", gemma_folder,
         "--out", tmp_path / "e.json")
    result = json.loads((tmp_path / "e.json").read_text())["lm"]
    assert result["kl_to_teacher"] == pytest.approx(0.0, abs=1e-6) and result["top1_agreement"] == 1.0

    # train: a Llama student distilled from it with the fused loss (the teacher gives hidden states).
    run = tmp_path / "run"
    caplog.set_level("INFO")
    _run("train", "configs/debug-kd.yaml", "--set", f"teacher.path={gemma_folder}", "--set", "data.source=jsonl",
         "--set", f"data.path={tiny_corpus_file}", "--set", "data.seq_len=32", "--set", "data.val_fraction=0.2",
         "--set", "student.d_model=32", "--set", "train.steps=6", "--set", "train.val_every=3", "--set", "loss.fused=true",
         "--set", "train.progress=false", "--run-dir", run)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    kl = [r["value"] for r in records if r["split"] == "val" and r["name"] == "kl_to_teacher"]
    assert len(kl) >= 2 and kl[-1] < kl[0]
    assert "teacher through its LM head" in caplog.text  # the fused path: no teacher logits

    # cache-teacher: top-k of the Gemma teacher over the same windows.
    _run("cache-teacher", "configs/debug-kd.yaml", "--set", f"teacher.path={gemma_folder}", "--set", "data.source=jsonl",
         "--set", f"data.path={tiny_corpus_file}", "--set", "data.seq_len=32", "--k", 8, "--out", tmp_path / "cache")
    assert (tmp_path / "cache" / "manifest.json").is_file()

    # generate, hybridize (one sliding and the global layer), export both ways.
    _run("generate", gemma_folder, "--prompt", "the model", "--max-new-tokens", 5)
    _run("hybridize", gemma_folder, "--layers", "2,5", "--samples", 4, "--seq-len", 32, "--chunk-size", 8,
         "--d-state", 8, "--out", tmp_path / "hybrid")
    hybrid = load(tmp_path / "hybrid")
    assert hybrid.config.pattern == "AAMAAM" and hybrid.config.norm_plus_one
    _run("export", gemma_folder, "--out", tmp_path / "hf")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(back).__name__ == "Gemma3ForCausalLM"
    _run("export", tmp_path / "hybrid", "--format", "hf-remote", "--out", tmp_path / "remote")
    remote = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "remote", trust_remote_code=True).eval()
    ids = torch.randint(0, 300, (1, 40))  # past the window of 8
    with torch.no_grad():
        assert (back(ids).logits - teacher(ids)).abs().max() <= 1e-5
        assert torch.equal(remote(ids).logits, hybrid.eval()(ids))


def test_tokenizers_that_add_bos_get_it_on_documents_windows_and_choices(tiny_tokenizer, tiny_docs):
    """Gemma and Llama 3 expect a BOS first (Gemma 3 270M: held-out loss 4.41 without, 3.11 with). A
    tokenizer that adds one itself gets it on every document, every evaluation window and every
    multiple-choice context; one that does not (the demo's, SmolLM2's) is left as it was."""
    import copy

    import numpy as np
    from tokenizers.processors import TemplateProcessing

    from distil.data.packing import concat_windows
    from distil.data.tokenize import bos_id, tokenize_documents
    from distil.eval.multiple_choice import _encode_pair

    plain = tiny_tokenizer
    assert bos_id(plain) is None
    with_bos = copy.deepcopy(plain)
    with_bos.add_special_tokens({"bos_token": "<bos>"})
    bos = with_bos.convert_tokens_to_ids("<bos>")
    with_bos._tokenizer.post_processor = TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", bos)])
    assert with_bos("a")["input_ids"][0] == bos and bos_id(with_bos) == bos

    docs = tiny_docs[:5]
    plain_docs, bos_docs = tokenize_documents(plain, docs), tokenize_documents(with_bos, docs)
    for a, b in zip(plain_docs, bos_docs):
        assert b[0] == bos and np.array_equal(b[1:], a)
    windows, doc_ids = concat_windows(bos_docs, 16, bos=bos)
    assert (windows[:, 0] == bos).all() and windows.shape[1] == 17 and doc_ids.shape == windows.shape
    flat = np.concatenate(bos_docs)
    assert np.array_equal(windows[:, 1:].reshape(-1), flat[: windows.shape[0] * 16])  # consecutive, no overlap
    assert _encode_pair(with_bos, "The model", " learns")[0][0] == bos
    assert _encode_pair(plain, "The model", " learns")[0][0] != bos
