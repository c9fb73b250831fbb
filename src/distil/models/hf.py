"""Hugging Face interop: load transformers checkpoints into distil and export distil models to them.

    model = load_hf("path/or/hub-id")   # Llama (3.x rope scaling too), Qwen2, Qwen3, Mistral
    save_hf(model, "out/hf")            # AutoModelForCausalLM.from_pretrained loads it

Parameter names already follow transformers' Llama, so conversion only strips or adds the
``model.`` prefix. Hybrids export through :func:`distil.models.export.export_hybrid_hf`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from distil.errors import DistilError
from distil.fsutil import atomic_dir
from distil.gguf import resolve_model_path
from distil.models.io import load_state, read_safetensors
from distil.models.transformer import ModelConfig, TransformerLM

SUPPORTED = ("llama", "qwen2", "qwen3", "mistral")


def resolve_checkpoint_dir(path: str | Path) -> Path:
    """A local directory as is (a GGUF file converted once); otherwise download the hub repo's
    config, weights and tokenizer."""
    path = resolve_model_path(path)
    local = Path(path)
    if local.is_dir():
        return local
    if local.exists() or str(path).startswith((".", "/", "~")) or str(path).count("/") > 1:
        raise DistilError(f"checkpoint not found: {path}")
    try:
        from huggingface_hub import snapshot_download

        patterns = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"]
        return Path(snapshot_download(str(path), allow_patterns=patterns))
    except Exception as e:  # network errors, unknown repos, gated repos: one line for the user
        raise DistilError(f"checkpoint not found: {path} is no local directory and could not be downloaded ({type(e).__name__})") from e


def model_config_from_hf(hf: dict) -> ModelConfig:
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED:
        raise DistilError(
            f"model_type {model_type!r} cannot be loaded into distil's TransformerLM (supported: {', '.join(SUPPORTED)}); "
            "use it as a teacher through transformers instead"
        )
    if hf.get("mlp_bias"):
        raise DistilError(f"{model_type} checkpoints with mlp_bias=True are not supported")
    if model_type == "llama" and hf.get("attention_bias"):
        raise DistilError("llama checkpoints with attention_bias=True (biased o_proj) are not supported")
    rope = dict(hf.get("rope_parameters") or {})  # transformers >= 5
    rope_theta = rope.pop("rope_theta", None) or hf.get("rope_theta", 10000.0)
    scaling = hf.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
    if scaling is not None:
        scaling = dict(scaling)
        scaling.setdefault("rope_type", scaling.get("type", "default"))
        if scaling["rope_type"] == "default":
            scaling = None
    sliding = None
    if model_type == "mistral":
        sliding = hf.get("sliding_window")
    elif model_type in ("qwen2", "qwen3") and hf.get("use_sliding_window"):
        raise DistilError(f"{model_type} checkpoints with use_sliding_window=True are not supported")
    if model_type == "qwen3" and hf.get("layer_types") and set(hf["layer_types"]) != {"full_attention"}:
        raise DistilError(f"qwen3 layer_types {sorted(set(hf['layer_types']))} are not supported (full_attention only)")
    n_heads = hf["num_attention_heads"]
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        d_model=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // n_heads,
        intermediate_size=hf["intermediate_size"],
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=float(rope_theta),
        rope_scaling=scaling,
        max_seq_len=hf.get("max_position_embeddings", 2048),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=model_type == "qwen2" or (model_type == "qwen3" and bool(hf.get("attention_bias"))),
        qk_norm=model_type == "qwen3",
        sliding_window=sliding,
        bos_token_id=_first(hf.get("bos_token_id")),
        eos_token_id=_first(hf.get("eos_token_id")),
    )


def _first(token_id):
    return token_id[0] if isinstance(token_id, list) and token_id else token_id


def read_hf_weights(path: Path) -> dict[str, torch.Tensor]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state = {}
        for shard in shards:
            if not (path / shard).is_file():
                raise DistilError(f"checkpoint {path} is missing the weight shard {shard}")
            state.update(read_safetensors(path / shard))
        return state
    files = sorted(path.glob("*.safetensors"))
    if files:
        state = {}
        for f in files:
            state.update(read_safetensors(f))
        return state
    binary = path / "pytorch_model.bin"
    if binary.is_file():
        try:
            return torch.load(binary, map_location="cpu", weights_only=True)
        except Exception as e:
            raise DistilError(f"checkpoint file {binary} is corrupt or unreadable: {e}") from e
    raise DistilError(f"checkpoint {path} has no weights (*.safetensors or pytorch_model.bin)")


def load_hf(path: str | Path, *, dtype: torch.dtype = torch.float32) -> TransformerLM:
    local = resolve_checkpoint_dir(path)
    cfg_file = local / "config.json"
    if not cfg_file.is_file():
        raise DistilError(f"checkpoint {local} has no config.json")
    try:
        hf = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise DistilError(f"checkpoint config {cfg_file} is not valid JSON: {e}") from e
    cfg = model_config_from_hf(hf)
    raw = read_hf_weights(local)
    state = {}
    for k, v in raw.items():
        if "rotary_emb" in k:
            continue
        state[k.removeprefix("model.")] = v
    model = TransformerLM(cfg)
    load_state(model, state, source=str(local))
    return model.to(dtype)


def hf_config_for(model: TransformerLM):
    """The transformers config that represents this all-attention model: Qwen3 with q/k norms, Mistral with a
    sliding window, Qwen2 with QKV bias, else Llama."""
    import transformers

    cfg = model.config
    if cfg.is_hybrid:
        raise DistilError("this is a hybrid model; export it with `distil export --format hf` (GraniteMoeHybrid)")
    common = dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads,
        max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.rms_norm_eps,
        tie_word_embeddings=cfg.tie_embeddings,
        bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id,
    )
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling:
        rope = {**cfg.rope_scaling, "rope_theta": cfg.rope_theta}
    if cfg.qk_norm:
        if cfg.sliding_window is not None:
            raise DistilError("a sliding-window model with q/k norms has no transformers equivalent here")
        hf = transformers.Qwen3Config(**common, head_dim=cfg.head_dim, attention_bias=cfg.qkv_bias,
                                      use_sliding_window=False)
    elif cfg.sliding_window is not None:
        if cfg.qkv_bias:
            raise DistilError("a sliding-window model with QKV bias has no transformers equivalent here")
        hf = transformers.MistralConfig(**common, head_dim=cfg.head_dim, sliding_window=cfg.sliding_window)
    elif cfg.qkv_bias:
        if cfg.head_dim != cfg.d_model // cfg.n_heads:
            raise DistilError("Qwen2 requires head_dim == d_model / n_heads")
        hf = transformers.Qwen2Config(**common, use_sliding_window=False)
    else:
        hf = transformers.LlamaConfig(**common, head_dim=cfg.head_dim, attention_bias=False, mlp_bias=False)
    _set_rope(hf, rope)
    hf.architectures = [type(hf).__name__.replace("Config", "ForCausalLM")]
    return hf


def _set_rope(hf_config, rope: dict) -> None:
    # transformers 5 keeps rope settings in `rope_parameters`; 4.x in rope_theta / rope_scaling.
    if hasattr(hf_config, "rope_parameters"):
        hf_config.rope_parameters = rope
    else:  # pragma: no cover - transformers 4.x
        hf_config.rope_theta = rope["rope_theta"]
        hf_config.rope_scaling = None if rope.get("rope_type") == "default" else rope


def hf_state_dict(model: TransformerLM, rename=None) -> dict[str, torch.Tensor]:
    """transformers names (``model.`` prefix, ``lm_head`` only when untied); ``rename(key, tensor, state)``
    may map a distil parameter onto other names (returning None drops it)."""
    state: dict[str, torch.Tensor] = {}
    own = model.state_dict()
    for k, v in own.items():
        if k == "lm_head.weight":
            if not model.config.tie_embeddings:
                state[k] = v
            continue
        mapped = rename(k, v, own) if rename is not None else {k: v}
        for name, tensor in (mapped or {}).items():
            state[f"model.{name}"] = tensor
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def save_hf(model: TransformerLM, path: str | Path, *, tokenizer=None, overwrite: bool = True) -> None:
    from safetensors.torch import save_file

    hf = hf_config_for(model)
    state = hf_state_dict(model)
    with atomic_dir(path, overwrite=overwrite) as tmp:
        hf.save_pretrained(tmp)
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
