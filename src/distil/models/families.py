"""The transformers model families distil runs natively: one description per family.

    family = family_for_hf(hf_config_dict)       # by model_type; refuses, in one line, what distil lacks
    cfg = family.read(hf_config_dict)            # -> ModelConfig
    hf_config = family_of(cfg).write(cfg)        # -> the transformers config it exports to
    state = read_state(family, cfg, raw_state)   # transformers names -> distil's (and back: rename_out)

Each family maps a transformers config onto :class:`~distil.models.transformer.ModelConfig`'s switches
and back, and says how its weight names differ from distil's (Llama's). The model itself has no
per-family code. Families in:

* **llama** (rope_scaling "llama3" and "linear"), **mistral** (sliding window), **qwen2** (QKV bias),
  **qwen3** (per-head q/k RMSNorm);
* **gemma3_text** (also the text part of a multimodal ``gemma3`` checkpoint): 5 local : 1 global
  sliding-window layers with their own rope base, (1 + w) RMSNorm, q/k norms, norms before and after
  attention and MLP, GeGLU, √d embedding scale, query_pre_attn_scalar and final-logit soft-capping
  (attn_logit_softcapping, which transformers' Gemma 3 reads but never applies, is refused);
* **smollm3**: Llama with rope left out of every 4th layer (``no_rope_layers``);
* **phi3**: fused ``qkv_proj`` and ``gate_up_proj``, split on load and fused again on export
  (rope scaling "longrope" and partial rotary are refused).

Refused in one line: OLMo 2 (its q/k norms span all heads and it has no norm before the mixer), Gemma 2,
and any other model_type; those run as teachers through transformers (``HFTeacher``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from distil.errors import DistilError
from distil.models.transformer import ModelConfig

REFUSED = {
    "olmo2": "OLMo 2's q/k norms span all heads together and its layers have no norm before the mixer",
    "gemma2": "Gemma 2 is not implemented (Gemma 3 is)",
    "gemma": "Gemma 1 is not implemented (Gemma 3 is)",
}


@dataclass(frozen=True)
class Family:
    name: str  # transformers' model_type
    read: Callable[[dict], ModelConfig]  # transformers config dict -> ModelConfig
    write: Callable[[ModelConfig], object]  # ModelConfig -> transformers config (export)
    state_in: Callable[[dict, ModelConfig], dict] | None = None  # weights (``model.`` stripped) -> distil's names
    rename_out: Callable | None = None  # hf_state_dict's rename(key, tensor, own) for export


# ---------------------------------------------------------------------------------------------
# Shared pieces


def _first(token_id):
    return token_id[0] if isinstance(token_id, list) and token_id else token_id


def _rope(hf: dict, params: dict | None = None) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling or None) from transformers 5's rope_parameters or 4.x's keys."""
    rope = dict(params if params is not None else hf.get("rope_parameters") or {})
    theta = rope.pop("rope_theta", None) or hf.get("rope_theta", 10000.0)
    scaling = hf.get("rope_scaling") if params is None else None
    scaling = scaling or (rope if rope.get("rope_type", rope.get("type", "default")) != "default" else None)
    if scaling is not None:
        scaling = {k: v for k, v in dict(scaling).items() if k != "rope_theta"}
        scaling.setdefault("rope_type", scaling.get("type", "default"))
        scaling.pop("type", None)
        if scaling["rope_type"] == "default":
            scaling = None
    return float(theta), scaling


def _common(hf: dict, **overrides) -> dict:
    n_heads = hf["num_attention_heads"]
    theta, scaling = _rope(hf)
    fields = dict(
        vocab_size=hf["vocab_size"],
        d_model=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // n_heads,
        intermediate_size=hf["intermediate_size"],
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=theta,
        rope_scaling=scaling,
        max_seq_len=hf.get("max_position_embeddings", 2048),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        bos_token_id=_first(hf.get("bos_token_id")),
        eos_token_id=_first(hf.get("eos_token_id")),
        family=hf["model_type"],
    )
    fields.update(overrides)
    return fields


def _refuse_if(condition, what: str) -> None:
    if condition:
        raise DistilError(what)


def _hf_common(cfg: ModelConfig) -> dict:
    return dict(
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


def rope_dict(cfg: ModelConfig) -> dict:
    if cfg.rope_scaling:
        return {**cfg.rope_scaling, "rope_theta": cfg.rope_theta}
    return {"rope_type": "default", "rope_theta": cfg.rope_theta}


def set_rope(hf_config, rope: dict) -> None:
    # transformers 5 keeps rope settings in `rope_parameters`; 4.x in rope_theta / rope_scaling.
    if hasattr(hf_config, "rope_parameters"):
        hf_config.rope_parameters = rope
    else:  # pragma: no cover - transformers 4.x
        hf_config.rope_theta = rope["rope_theta"]
        hf_config.rope_scaling = None if rope.get("rope_type") == "default" else rope


def _finish(hf_config, architecture: str, rope: dict | None):
    if rope is not None:
        set_rope(hf_config, rope)
    hf_config.architectures = [architecture]
    return hf_config


def require_llama_layout(cfg: ModelConfig, family: str) -> None:
    """Refuse switches a Llama-style family cannot hold."""
    extra = [name for name in ("norm_plus_one", "sandwich_norms", "scale_embeddings") if getattr(cfg, name)]
    extra += [name for name in ("query_scale", "logit_softcap", "layer_types", "rope_local_theta")
              if getattr(cfg, name) is not None]
    if cfg.mlp_activation != "silu":
        extra.append(f"mlp_activation={cfg.mlp_activation}")
    if extra:
        raise DistilError(f"this model uses {', '.join(extra)}, which {family} has no place for")


# ---------------------------------------------------------------------------------------------
# Llama, Mistral, Qwen2, Qwen3


def _read_llama(hf: dict) -> ModelConfig:
    _refuse_if(hf.get("mlp_bias"), f"{hf['model_type']} checkpoints with mlp_bias=True are not supported")
    _refuse_if(hf["model_type"] == "llama" and hf.get("attention_bias"),
               "llama checkpoints with attention_bias=True (biased o_proj) are not supported")
    return ModelConfig(**_common(hf))


def _write_llama(cfg: ModelConfig):
    import transformers

    require_llama_layout(cfg, "llama")
    _refuse_if(cfg.qk_norm or cfg.qkv_bias or cfg.sliding_window is not None or cfg.nope_layers,
               "a Llama has no q/k norms, QKV bias, sliding window or layers without rope")
    hf = transformers.LlamaConfig(**_hf_common(cfg), head_dim=cfg.head_dim, attention_bias=False, mlp_bias=False)
    return _finish(hf, "LlamaForCausalLM", rope_dict(cfg))


def _read_mistral(hf: dict) -> ModelConfig:
    return ModelConfig(**_common(hf, sliding_window=hf.get("sliding_window")))


def _write_mistral(cfg: ModelConfig):
    import transformers

    require_llama_layout(cfg, "mistral")
    _refuse_if(cfg.qkv_bias, "a sliding-window model with QKV bias has no transformers equivalent here")
    _refuse_if(cfg.qk_norm or cfg.nope_layers, "Mistral has no q/k norms or layers without rope")
    hf = transformers.MistralConfig(**_hf_common(cfg), head_dim=cfg.head_dim, sliding_window=cfg.sliding_window)
    return _finish(hf, "MistralForCausalLM", rope_dict(cfg))


def _read_qwen(hf: dict) -> ModelConfig:
    model_type = hf["model_type"]
    _refuse_if(hf.get("use_sliding_window"), f"{model_type} checkpoints with use_sliding_window=True are not supported")
    _refuse_if(model_type == "qwen3" and hf.get("layer_types") and set(hf["layer_types"]) != {"full_attention"},
               f"qwen3 layer_types {sorted(set(hf.get('layer_types') or []))} are not supported (full_attention only)")
    qwen3 = model_type == "qwen3"
    return ModelConfig(**_common(hf, qkv_bias=not qwen3 or bool(hf.get("attention_bias")), qk_norm=qwen3))


def _write_qwen2(cfg: ModelConfig):
    import transformers

    require_llama_layout(cfg, "qwen2")
    _refuse_if(cfg.head_dim != cfg.d_model // cfg.n_heads, "Qwen2 requires head_dim == d_model / n_heads")
    _refuse_if(cfg.qk_norm or cfg.sliding_window is not None or cfg.nope_layers,
               "Qwen2 has no q/k norms, sliding window or layers without rope here")
    return _finish(transformers.Qwen2Config(**_hf_common(cfg), use_sliding_window=False), "Qwen2ForCausalLM", rope_dict(cfg))


def _write_qwen3(cfg: ModelConfig):
    import transformers

    require_llama_layout(cfg, "qwen3")
    _refuse_if(cfg.sliding_window is not None, "a sliding-window model with q/k norms has no transformers equivalent here")
    _refuse_if(cfg.nope_layers, "Qwen3 has no layers without rope")
    hf = transformers.Qwen3Config(**_hf_common(cfg), head_dim=cfg.head_dim, attention_bias=cfg.qkv_bias,
                                  use_sliding_window=False)
    return _finish(hf, "Qwen3ForCausalLM", rope_dict(cfg))


# ---------------------------------------------------------------------------------------------
# SmolLM3: Llama with rope left out of some layers


def _read_smollm3(hf: dict) -> ModelConfig:
    _refuse_if(hf.get("use_sliding_window"), "smollm3 checkpoints with use_sliding_window=True are not supported")
    _refuse_if(hf.get("mlp_bias") or hf.get("attention_bias"), "smollm3 checkpoints with biases are not supported")
    n = hf["num_hidden_layers"]
    flags = hf.get("no_rope_layers")
    if flags is None:  # transformers' default: every `no_rope_layer_interval`-th layer has no rope
        interval = hf.get("no_rope_layer_interval", 4)
        flags = [int((i + 1) % interval != 0) for i in range(n)]
    return ModelConfig(**_common(hf, nope_layers=[i for i, uses_rope in enumerate(flags) if not uses_rope]))


def _write_smollm3(cfg: ModelConfig):
    import transformers

    require_llama_layout(cfg, "smollm3")
    _refuse_if(cfg.qk_norm or cfg.qkv_bias or cfg.sliding_window is not None,
               "SmolLM3 has no q/k norms, QKV bias or sliding window here")
    nope = set(cfg.nope_layers or [])
    hf = transformers.SmolLM3Config(**_hf_common(cfg), pad_token_id=None, attention_bias=False, mlp_bias=False, use_sliding_window=False,
                                    no_rope_layers=[int(i not in nope) for i in range(cfg.n_layers)])
    _refuse_if(getattr(hf, "head_dim", cfg.head_dim) != cfg.head_dim, "SmolLM3 requires head_dim == d_model / n_heads")
    return _finish(hf, "SmolLM3ForCausalLM", rope_dict(cfg))


# ---------------------------------------------------------------------------------------------
# Phi-3: fused qkv and gate/up projections


def _read_phi3(hf: dict) -> ModelConfig:
    rope = dict(hf.get("rope_parameters") or {})
    partial = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    _refuse_if(partial != 1.0, f"phi3 partial_rotary_factor = {partial} is not supported (1.0 only)")
    theta, scaling = _rope(hf)
    _refuse_if(scaling is not None and scaling["rope_type"] not in ("linear", "llama3"),
               f"phi3 rope scaling {scaling and scaling['rope_type']!r} (e.g. longrope) is not supported")
    _refuse_if(hf.get("hidden_act", "silu") != "silu", f"phi3 hidden_act {hf.get('hidden_act')!r} is not supported")
    return ModelConfig(**_common(hf, sliding_window=hf.get("sliding_window")))


def _phi3_state_in(state: dict, cfg: ModelConfig) -> dict:
    """qkv_proj rows [q | k | v] -> q_proj, k_proj, v_proj; gate_up_proj rows [gate | up] -> gate_proj, up_proj."""
    q_rows, kv_rows = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    out = {}
    for key, value in state.items():
        if key.endswith("self_attn.qkv_proj.weight"):
            q, k, v = value.split([q_rows, kv_rows, kv_rows], dim=0)
            for name, part in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
                out[key.replace("qkv_proj", name)] = part
        elif key.endswith("mlp.gate_up_proj.weight"):
            gate, up = value.chunk(2, dim=0)
            out[key.replace("gate_up_proj", "gate_proj")] = gate
            out[key.replace("gate_up_proj", "up_proj")] = up
        else:
            out[key] = value
    return out


def _phi3_rename_out(key: str, value: torch.Tensor, own: dict) -> dict | None:
    prefix = key.rsplit(".", 2)[0]  # layers.N.self_attn / layers.N.mlp
    if key.endswith(("self_attn.k_proj.weight", "self_attn.v_proj.weight", "mlp.up_proj.weight")):
        return None
    if key.endswith("self_attn.q_proj.weight"):
        parts = [own[f"{prefix}.{name}.weight"] for name in ("q_proj", "k_proj", "v_proj")]
        return {f"{prefix}.qkv_proj.weight": torch.cat(parts, dim=0)}
    if key.endswith("mlp.gate_proj.weight"):
        return {f"{prefix}.gate_up_proj.weight": torch.cat([value, own[f"{prefix}.up_proj.weight"]], dim=0)}
    return {key: value}


def _write_phi3(cfg: ModelConfig):
    import transformers

    require_llama_layout(cfg, "phi3")
    _refuse_if(cfg.qk_norm or cfg.qkv_bias or cfg.nope_layers, "Phi-3 has no q/k norms, QKV bias or layers without rope")
    hf = transformers.Phi3Config(**_hf_common(cfg), sliding_window=cfg.sliding_window, pad_token_id=None)
    _refuse_if(cfg.head_dim != cfg.d_model // cfg.n_heads, "Phi-3 requires head_dim == d_model / n_heads")
    return _finish(hf, "Phi3ForCausalLM", {**rope_dict(cfg), "partial_rotary_factor": 1.0})


# ---------------------------------------------------------------------------------------------
# Gemma 3


GEMMA_ACTIVATIONS = {"gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh"}


def _read_gemma3(hf: dict) -> ModelConfig:
    if hf.get("model_type") == "gemma3":  # the multimodal checkpoint: its text model
        hf = {**hf["text_config"], "model_type": "gemma3_text"}
    _refuse_if(hf.get("use_bidirectional_attention"), "gemma3 use_bidirectional_attention=True is not supported")
    _refuse_if(hf.get("attention_bias"), "gemma3 checkpoints with attention_bias=True are not supported")
    # transformers' Gemma 3 reads attn_logit_softcapping but never applies it; rather than guess, refuse it.
    _refuse_if(hf.get("attn_logit_softcapping") is not None,
               "gemma3 attn_logit_softcapping is not supported (transformers' Gemma 3 does not apply it either)")
    act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
    _refuse_if(act not in GEMMA_ACTIVATIONS, f"gemma3 hidden_activation {act!r} is not supported")
    n = hf["num_hidden_layers"]
    types = hf.get("layer_types")
    if types is None:
        pattern = hf.get("sliding_window_pattern", 6)
        types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n)]
    params = hf.get("rope_parameters") or {}
    if "full_attention" in params or "sliding_attention" in params:  # transformers 5: one entry per layer type
        theta, scaling = _rope(hf, params.get("full_attention") or {"rope_theta": 1_000_000.0})
        local_theta, local_scaling = _rope(hf, params.get("sliding_attention") or {"rope_theta": 10_000.0})
        _refuse_if(local_scaling is not None, f"gemma3 rope scaling on the sliding layers ({local_scaling}) is not supported")
    else:  # transformers 4.x keys
        theta, scaling = _rope({"rope_theta": hf.get("rope_theta", 1_000_000.0), "rope_scaling": hf.get("rope_scaling")})
        local_theta = float(hf.get("rope_local_base_freq", 10_000.0))
    return ModelConfig(**_common(
        hf, rope_theta=theta, rope_scaling=scaling, rope_local_theta=local_theta,
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)), qk_norm=True, norm_plus_one=True,
        sandwich_norms=True, mlp_activation=GEMMA_ACTIVATIONS[act], scale_embeddings=True,
        query_scale=float(hf.get("query_pre_attn_scalar", 256)) ** -0.5,
        logit_softcap=hf.get("final_logit_softcapping"), sliding_window=hf.get("sliding_window"),
        layer_types=["sliding" if t == "sliding_attention" else "full" for t in types]))


def _write_gemma3(cfg: ModelConfig):
    import transformers

    missing = [name for name in ("qk_norm", "norm_plus_one", "sandwich_norms", "scale_embeddings") if not getattr(cfg, name)]
    if cfg.mlp_activation != "gelu_tanh":
        missing.append("mlp_activation=gelu_tanh")
    _refuse_if(missing, f"a Gemma 3 export needs {', '.join(missing)}")
    _refuse_if(cfg.qkv_bias or cfg.nope_layers, "Gemma 3 has no QKV bias or layers without rope")
    types = cfg.layer_types or ["sliding" if cfg.sliding_window else "full"] * cfg.n_layers
    local = {"rope_type": "default", "rope_theta": cfg.rope_local_theta or cfg.rope_theta}
    scalar = (cfg.query_scale if cfg.query_scale is not None else cfg.head_dim**-0.5) ** -2
    _refuse_if(abs(scalar - round(scalar)) > 1e-3, f"Gemma 3's query_pre_attn_scalar must be a whole number, not {scalar}")
    hf = transformers.Gemma3TextConfig(
        **_hf_common(cfg), head_dim=cfg.head_dim, hidden_activation="gelu_pytorch_tanh",
        query_pre_attn_scalar=round(scalar),
        sliding_window=cfg.sliding_window or cfg.max_seq_len, attn_logit_softcapping=None,
        final_logit_softcapping=cfg.logit_softcap, attention_bias=False,
        layer_types=["sliding_attention" if t == "sliding" else "full_attention" for t in types],
        rope_parameters={"full_attention": rope_dict(cfg), "sliding_attention": local})
    return _finish(hf, "Gemma3ForCausalLM", None)


def _gemma3_state_in(state: dict, cfg: ModelConfig) -> dict:
    """A multimodal Gemma 3's text weights under distil's names; the vision tower is dropped."""
    out = {}
    for key, value in state.items():
        if key.startswith(("vision_tower.", "multi_modal_projector.")):
            continue
        for prefix in ("language_model.model.", "language_model."):
            if key.startswith(prefix):
                key = key.removeprefix(prefix)
                break
        out[key] = value
    return out


# ---------------------------------------------------------------------------------------------
# The registry


FAMILIES = {f.name: f for f in (
    Family("llama", _read_llama, _write_llama),
    Family("mistral", _read_mistral, _write_mistral),
    Family("qwen2", _read_qwen, _write_qwen2),
    Family("qwen3", _read_qwen, _write_qwen3),
    Family("smollm3", _read_smollm3, _write_smollm3),
    Family("phi3", _read_phi3, _write_phi3, _phi3_state_in, _phi3_rename_out),
    Family("gemma3_text", _read_gemma3, _write_gemma3, _gemma3_state_in),
)}
FAMILIES["gemma3"] = FAMILIES["gemma3_text"]
SUPPORTED = tuple(FAMILIES)


def family_for_hf(hf: dict) -> Family:
    model_type = hf.get("model_type")
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    why = f": {REFUSED[model_type]}" if model_type in REFUSED else ""
    raise DistilError(
        f"model_type {model_type!r} cannot be loaded into distil's TransformerLM{why} (supported: "
        f"{', '.join(SUPPORTED)}); use it as a teacher, or evaluate it, through transformers instead"
    )


def family_of(cfg: ModelConfig) -> Family:
    """The family a model exports to: the one it came from, else the plainest that holds its switches."""
    if cfg.family is not None:
        if cfg.family not in FAMILIES:
            raise DistilError(f"model family {cfg.family!r} is unknown (known: {', '.join(SUPPORTED)})")
        return FAMILIES[cfg.family]
    if cfg.norm_plus_one or cfg.sandwich_norms:
        return FAMILIES["gemma3_text"]
    if cfg.qk_norm:
        return FAMILIES["qwen3"]
    if cfg.nope_layers:
        return FAMILIES["smollm3"]
    if cfg.sliding_window is not None:
        return FAMILIES["mistral"]
    if cfg.qkv_bias:
        return FAMILIES["qwen2"]
    return FAMILIES["llama"]


def read_state(family: Family, cfg: ModelConfig, raw: dict) -> dict:
    """transformers weights -> distil's state dict names (no ``model.`` prefix, no rotary buffers)."""
    state = {key.removeprefix("model."): value for key, value in raw.items() if "rotary_emb" not in key}
    return family.state_in(state, cfg) if family.state_in is not None else state
