"""TransformerLM against transformers, with weights copied both ways; native checkpoints reload exactly."""

import json

import pytest
import torch
import transformers

from distil.errors import DistilError
from distil.models import ModelConfig, TransformerLM, load, load_hf, save_hf
from distil.models.io import save_native

pytestmark = pytest.mark.numerics  # CI runs these again under ATEN_CPU_CAPABILITY=default


def _hf_model(kind: str):
    torch.manual_seed(0)
    common = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)
    if kind == "llama":
        cfg = transformers.LlamaConfig(**common, tie_word_embeddings=False)
    elif kind == "llama3-rope":
        cfg = transformers.LlamaConfig(**common, tie_word_embeddings=True, rope_parameters={
            "rope_type": "llama3", "rope_theta": 50000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8})
    elif kind == "qwen2":
        cfg = transformers.Qwen2Config(**common, tie_word_embeddings=True)
    elif kind == "qwen3":  # q/k RMSNorm per head; head_dim 24 is not hidden_size / heads, as in Qwen3-0.6B
        cfg = transformers.Qwen3Config(**common, head_dim=24, tie_word_embeddings=True)
    elif kind == "llama-linear-rope":
        cfg = transformers.LlamaConfig(**common, rope_parameters={"rope_type": "linear", "rope_theta": 10000.0,
                                                                  "factor": 4.0})
    elif kind == "mistral":
        cfg = transformers.MistralConfig(**{**common, "num_key_value_heads": 1}, sliding_window=5)
    elif kind in ("gemma3", "gemma3-softcap"):
        # 6 layers: 5 sliding (window 4, local rope base 100) and 1 global (base 10^4, linear scaling);
        # head_dim 16 is not hidden_size / heads, and query_pre_attn_scalar is not head_dim.
        softcap = dict(final_logit_softcapping=5.0) if kind == "gemma3-softcap" else {}
        cfg = transformers.Gemma3TextConfig(**{**common, "num_hidden_layers": 6}, head_dim=16, sliding_window=4,
                                            query_pre_attn_scalar=24, rope_parameters={
                                                "full_attention": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
                                                "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}},
                                            **softcap)
    elif kind == "smollm3":  # rope left out of every 4th layer
        cfg = transformers.SmolLM3Config(**{**common, "num_hidden_layers": 4}, tie_word_embeddings=True, pad_token_id=None,
                                         bos_token_id=1, eos_token_id=2)
    elif kind == "phi3":  # fused qkv_proj and gate_up_proj
        cfg = transformers.Phi3Config(**common, pad_token_id=None)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    # Non-trivial norms and biases so a dropped parameter would show.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "bias" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


FAMILIES = ["llama", "llama3-rope", "llama-linear-rope", "qwen2", "qwen3", "mistral", "gemma3", "gemma3-softcap",
            "smollm3", "phi3"]


@pytest.mark.parametrize("kind", FAMILIES)
def test_from_hf_matches_transformers(tmp_path, kind):
    hf = _hf_model(kind)
    hf.save_pretrained(tmp_path / "hf")
    ours = load_hf(tmp_path / "hf").eval()
    ids = torch.randint(0, 97, (2, 13))
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max() <= 1e-5


@pytest.mark.parametrize("kind", FAMILIES)
def test_save_hf_loads_in_transformers(tmp_path, kind):
    hf = _hf_model(kind)
    hf.save_pretrained(tmp_path / "hf")
    ours = load_hf(tmp_path / "hf").eval()
    save_hf(ours, tmp_path / "export")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    assert type(back).__name__ == type(hf).__name__
    ids = torch.randint(0, 97, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, ours(ids), atol=1e-4, rtol=0)


def test_qwen3_matches_transformers_to_1e5_and_continues_from_its_cache(tmp_path):
    """Qwen3's q/k norms sit before rope and before the KV cache: a sequence in two pieces with the
    cache gives the logits of one pass, and both equal transformers' to 1e-5."""
    hf = _hf_model("qwen3")
    hf.save_pretrained(tmp_path / "hf")
    ours = load_hf(tmp_path / "hf").eval()
    assert ours.config.qk_norm and ours.config.head_dim == 24
    assert torch.equal(ours.layers[0].self_attn.q_norm.weight, hf.model.layers[0].self_attn.q_norm.weight)
    ids = torch.randint(0, 97, (2, 13))
    with torch.no_grad():
        whole = ours(ids)
        assert (whole - hf(ids).logits).abs().max() <= 1e-5
        first, states = ours(ids[:, :7], return_states=True)
        rest = ours(ids[:, 7:], states=states)
    torch.testing.assert_close(torch.cat([first, rest], dim=1), whole, atol=1e-5, rtol=0)


def test_gemma3_sliding_window_matches_transformers_past_the_window_and_in_the_kv_cache(tmp_path):
    """Gemma 3's local layers see the last 4 tokens: 20 tokens in one pass, in pieces through distil's
    cache, one at a time through preallocated buffers, and transformers' own cached decoding all agree."""
    from distil.models.state import preallocated_states

    hf = _hf_model("gemma3")
    hf.save_pretrained(tmp_path / "hf")
    ours = load_hf(tmp_path / "hf").eval()
    cfg = ours.config
    assert cfg.layer_types == ["sliding"] * 5 + ["full"] and cfg.sliding_window == 4 and cfg.rope_local_theta == 100.0
    ids = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        whole = ours(ids)
        assert (whole - hf(ids).logits).abs().max() <= 1e-5
        # A window that is ignored changes the logits: the check above can fail.
        assert (whole - hf(ids).logits).abs().max() < (whole - _unwindowed(ours)(ids)).abs().max() / 100
        first, states = ours(ids[:, :9], return_states=True)
        rest = ours(ids[:, 9:], states=states)
        torch.testing.assert_close(torch.cat([first, rest], dim=1), whole, atol=1e-5, rtol=0)
        states, steps = preallocated_states(ours, 2, 20), []
        for t in range(20):
            out, states = ours(ids[:, t : t + 1], states=states, return_states=True)
            steps.append(out)
        torch.testing.assert_close(torch.cat(steps, dim=1), whole, atol=1e-5, rtol=0)
        cache = hf(ids[:, :9], use_cache=True)
        cache_steps = [cache.logits]
        past = cache.past_key_values
        for t in range(9, 20):
            out = hf(ids[:, t : t + 1], past_key_values=past, use_cache=True)
            past = out.past_key_values
            cache_steps.append(out.logits)
        assert (torch.cat(cache_steps, dim=1) - whole).abs().max() <= 1e-5


def _unwindowed(model):
    import copy

    twin = copy.deepcopy(model)
    for layer in twin.layers:
        layer.self_attn.sliding_window = None
    return twin


def test_gemma3_multimodal_checkpoint_loads_its_text_model(tmp_path):
    """A multimodal Gemma 3 folder (model_type gemma3): the text model, with the vision tower's weights
    dropped, equals the text-only model."""
    from safetensors.torch import save_file

    hf = _hf_model("gemma3")
    text = hf.config.to_dict()
    state = {f"model.language_model.{k.removeprefix('model.')}": v for k, v in hf.state_dict().items()
             if k != "lm_head.weight"}
    state["model.vision_tower.patch.weight"] = torch.zeros(3)
    (tmp_path / "mm").mkdir()
    save_file(state, str(tmp_path / "mm" / "model.safetensors"))
    (tmp_path / "mm" / "config.json").write_text(json.dumps({"model_type": "gemma3", "text_config": text}))
    ours = load_hf(tmp_path / "mm").eval()
    ids = torch.randint(0, 97, (1, 9))
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max() <= 1e-5


def test_gemma3_attention_softcapping_is_refused(tmp_path):
    cfg = _hf_model("gemma3").config.to_dict()
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({**cfg, "attn_logit_softcapping": 50.0}))
    with pytest.raises(DistilError, match="attn_logit_softcapping"):
        load(tmp_path / "m")


@pytest.mark.parametrize("model_type", ["olmo2", "gemma2"])
def test_refused_families_name_why(tmp_path, model_type):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"model_type": model_type}))
    with pytest.raises(DistilError, match=f"{model_type}.*(q/k norms|not implemented)"):
        load(tmp_path / "m")


def test_fresh_distil_model_exports_as_llama(tmp_path):
    torch.manual_seed(0)
    model = TransformerLM(ModelConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16)).eval()
    save_hf(model, tmp_path / "export")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    ids = torch.randint(0, 50, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, model(ids), atol=1e-4, rtol=0)


def test_native_checkpoint_reloads_exactly(tmp_path):
    torch.manual_seed(0)
    model = TransformerLM(ModelConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=2, tie_embeddings=False, qkv_bias=True))
    save_native(model, tmp_path / "ckpt")
    again = load(tmp_path / "ckpt")
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
    ids = torch.randint(0, 50, (2, 7))
    assert torch.equal(model(ids), again(ids))


def test_tied_checkpoint_stays_tied(tmp_path):
    model = TransformerLM(ModelConfig(vocab_size=50, d_model=32, n_layers=1, n_heads=2))
    save_native(model, tmp_path / "ckpt")
    again = load(tmp_path / "ckpt")
    assert again.lm_head.weight is again.embed_tokens.weight


def test_missing_and_corrupt_checkpoints_are_user_errors(tmp_path):
    with pytest.raises(DistilError, match="not found"):
        load(tmp_path / "nope")
    model = TransformerLM(ModelConfig(vocab_size=50, d_model=32, n_layers=1, n_heads=2))
    save_native(model, tmp_path / "ckpt")
    weights = tmp_path / "ckpt" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(DistilError, match="corrupt"):
        load(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "config.json").write_text("{not json")
    with pytest.raises(DistilError, match="JSON"):
        load(tmp_path / "ckpt")


def test_unsupported_architecture_is_named(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(DistilError, match="gpt2"):
        load(tmp_path / "m")


def test_document_mask_keeps_attention_inside_documents():
    torch.manual_seed(0)
    model = TransformerLM(ModelConfig(vocab_size=40, d_model=32, n_layers=2, n_heads=2)).eval()
    a, b = torch.randint(0, 40, (1, 5)), torch.randint(0, 40, (1, 6))
    packed = torch.cat([a, b], dim=1)
    doc_ids = torch.tensor([[0] * 5 + [1] * 6])
    positions = torch.tensor([list(range(5)) + list(range(6))])
    with torch.no_grad():
        out = model(packed, doc_ids=doc_ids, positions=positions)
        torch.testing.assert_close(out[:, :5], model(a), atol=1e-5, rtol=0)
        torch.testing.assert_close(out[:, 5:], model(b), atol=1e-5, rtol=0)


def test_kv_cache_matches_full_forward():
    torch.manual_seed(0)
    model = TransformerLM(ModelConfig(vocab_size=40, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2)).eval()
    ids = torch.randint(0, 40, (2, 10))
    with torch.no_grad():
        full = model(ids)
        first, states = model(ids[:, :6], return_states=True)
        rest = []
        for t in range(6, 10):
            out, states = model(ids[:, t : t + 1], states=states, return_states=True)
            rest.append(out)
    torch.testing.assert_close(torch.cat([first, *rest], dim=1), full, atol=1e-5, rtol=0)


def test_eval_runs_any_causal_lm_through_transformers(tmp_path, tiny_tokenizer, tiny_corpus_file):
    """An architecture distil has no native form of (GPT-2 here) is evaluated through transformers
    instead of refused: its held-out loss equals transformers' own on the same windows."""
    import torch.nn.functional as F

    from distil.config import DataConfig
    from distil.data.corpus import load_documents
    from distil.data.packing import concat_windows
    from distil.data.tokenize import tokenize_documents
    from distil.eval.runner import run_eval

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=len(tiny_tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=64)
    gpt2 = transformers.GPT2LMHeadModel(cfg).eval()
    gpt2.save_pretrained(tmp_path / "gpt2")
    tiny_tokenizer.save_pretrained(str(tmp_path / "gpt2"))
    result = run_eval(tmp_path / "gpt2", data=tiny_corpus_file, seq_len=32, batch_size=4)
    docs = load_documents(DataConfig(source="jsonl" if str(tiny_corpus_file).endswith(".jsonl") else "text",
                                     path=str(tiny_corpus_file)))
    windows, _ = concat_windows(tokenize_documents(tiny_tokenizer, docs), 32)
    ids = torch.from_numpy(windows.astype("int64"))
    with torch.no_grad():
        logits = gpt2(ids[:, :-1]).logits
    reference = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).item()
    assert result["lm"]["loss"] == pytest.approx(reference, rel=1e-5)
