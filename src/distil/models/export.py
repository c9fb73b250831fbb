"""Export formats (one registry, ``FORMATS``): hybrids to an architecture stock ``transformers`` loads,
GraniteMoeHybrid, and everything else through its family or with its own modeling code.

    export(model, "out/", "hf")          # all-attention -> its family's class; attention + Mamba2 -> GraniteMoeHybrid
    export(model, "out/", "hf-remote")   # any distil model, loaded with trust_remote_code=True (distil.models.remote)
    export(model, "s.gguf", "gguf", gguf_type="q8_0")  # llama.cpp (distil.models.llamacpp)

GraniteMoeHybrid with ``num_local_experts=0`` is a Llama-style decoder whose layers are attention
or Mamba2 (mamba_ssm layout), with a dense ``shared_mlp`` holding [gate | up] in ``input_linear``
and down in ``output_linear``, rotary position embeddings, ``attention_multiplier = head_dim^-0.5``
and the embedding, residual and logits multipliers at 1. That is exactly distil's hybrid with
Mamba2 layers, so the export is a renaming, and a Llama maps onto it with zero logit difference.

What cannot be exported, and why:

* discrete Mamba2 layers: no architecture in transformers has that mixer (per-timestep decay
  from ``in_proj``, ``z_bias``, no gated norm); keep those models in distil's native format.
* Mamba2 layers whose groups differ between layers, QKV biases, a sliding window, or head_dim
  other than d_model / n_heads: GraniteMoeHybrid has one setting for all layers and none of these.
"""

from __future__ import annotations

from pathlib import Path

import torch

from distil.errors import DistilError
from distil.fsutil import atomic_dir
from distil.models.families import require_llama_layout, rope_dict, set_rope
from distil.models.hf import hf_config_for, hf_state_dict, save_hf
from distil.spec import EXPORT_FORMATS


def _expand(d_inner: int, d_model: int) -> int:
    """GraniteMoeHybrid's ``mamba_expand``: an integer (the config refuses a float), its Mamba layer
    ``mamba_expand * hidden_size`` wide."""
    if d_inner % d_model:
        narrower = " (the size-matched width 'kv' is narrower than d_model)" if d_inner < d_model else ""
        raise DistilError(f"Mamba2 d_inner = {d_inner} is not a whole multiple of d_model = {d_model}{narrower}, "
                          "which GraniteMoeHybrid's integer mamba_expand requires; keep this hybrid in distil's "
                          "native format")
    return d_inner // d_model


def granite_config_for(model):
    import transformers

    cfg = model.config
    if "D" in cfg.pattern:
        raise DistilError("discrete Mamba2 layers cannot be exported to transformers: no architecture there has that "
                          "mixer; keep this model in distil's native format (model.save)")
    if cfg.qkv_bias or cfg.sliding_window is not None:
        raise DistilError("GraniteMoeHybrid has no QKV bias or sliding window; this model cannot be exported as a hybrid")
    if cfg.head_dim * cfg.n_heads != cfg.d_model:
        raise DistilError("GraniteMoeHybrid needs head_dim == d_model / n_heads")
    if cfg.qk_norm:
        raise DistilError("GraniteMoeHybrid has no q/k norms (Qwen3, Gemma 3); keep this hybrid in distil's native format")
    if cfg.nope_layers:
        raise DistilError("GraniteMoeHybrid has rope in every attention layer (SmolLM3 leaves it out of some); keep this "
                          "hybrid in distil's native format")
    require_llama_layout(cfg, "GraniteMoeHybrid")
    ssm = cfg.ssm.get("M") if "M" in cfg.pattern else None
    if ssm is None:  # no Mamba2 layers: valid placeholder settings that no layer uses
        ssm = dict(d_inner=cfg.d_model, head_dim=cfg.head_dim, n_groups=1, d_state=16, norm_eps=cfg.rms_norm_eps)
    if ssm.get("norm_eps", 1e-5) != cfg.rms_norm_eps:
        raise DistilError(f"the Mamba2 gated norm's eps ({ssm.get('norm_eps', 1e-5)}) differs from rms_norm_eps "
                          f"({cfg.rms_norm_eps}); GraniteMoeHybrid uses one epsilon for both")
    d_inner = ssm.get("d_inner") or int(ssm.get("expand", 2) * cfg.d_model)
    mamba = dict(mamba_n_heads=d_inner // ssm.get("head_dim", 64), mamba_n_groups=ssm.get("n_groups", 1),
                 mamba_d_state=ssm.get("d_state", 128), mamba_d_head=ssm.get("head_dim", 64),
                 mamba_d_conv=ssm.get("d_conv", 4), mamba_expand=_expand(d_inner, cfg.d_model),
                 mamba_chunk_size=ssm.get("chunk_size", 256), mamba_conv_bias=True, mamba_proj_bias=False)
    hf = transformers.GraniteMoeHybridConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.intermediate_size,
        shared_intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads, max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.rms_norm_eps,
        tie_word_embeddings=cfg.tie_embeddings, num_local_experts=0, position_embedding_type="rope",
        attention_multiplier=cfg.head_dim**-0.5, embedding_multiplier=1.0, residual_multiplier=1.0, logits_scaling=1.0,
        layer_types=["attention" if k == "A" else "mamba" for k in cfg.pattern], attention_bias=False,
        bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id, pad_token_id=cfg.eos_token_id, **mamba)
    set_rope(hf, rope_dict(cfg))
    hf.architectures = ["GraniteMoeHybridForCausalLM"]
    return hf


def _granite_names(key: str, value: torch.Tensor, own: dict) -> dict | None:
    """distil's gate/up/down MLP -> GraniteMoeHybrid's shared_mlp [gate | up] and output_linear."""
    if ".mlp.gate_proj." in key or ".mlp.up_proj." in key:
        return None
    if ".mlp.down_proj." in key:
        prefix = key.split(".mlp.")[0]
        gate_up = torch.cat([own[f"{prefix}.mlp.gate_proj.weight"], own[f"{prefix}.mlp.up_proj.weight"]], dim=0)
        return {key.replace(".mlp.down_proj.", ".shared_mlp.output_linear."): value,
                f"{prefix}.shared_mlp.input_linear.weight": gate_up}
    return {key: value}


def granite_state_dict(model) -> dict[str, torch.Tensor]:
    return hf_state_dict(model, rename=_granite_names)


def export_hf(model, path: str | Path, *, tokenizer=None, overwrite: bool = True, hybrid_format: str = "auto") -> str:
    """Write ``model`` for ``AutoModelForCausalLM``; returns the architecture name used."""
    from safetensors.torch import save_file

    if not model.config.is_hybrid and hybrid_format != "granite":
        save_hf(model, path, tokenizer=tokenizer, overwrite=overwrite)
        return hf_config_for(model).architectures[0]
    try:
        hf = granite_config_for(model)
    except DistilError as e:
        raise DistilError(f"{e}. `distil export --format hf-remote` writes it with its own modeling code "
                          "(trust_remote_code=True)") from e
    with atomic_dir(path, overwrite=overwrite) as tmp:
        hf.save_pretrained(tmp)
        save_file(granite_state_dict(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return "GraniteMoeHybridForCausalLM"


def export_remote_code(model, path: str | Path, *, tokenizer=None, overwrite: bool = True) -> str:
    from distil.models.remote import export_remote

    return export_remote(model, path, tokenizer=tokenizer, overwrite=overwrite)


def export_llamacpp(model, path: str | Path, *, tokenizer=None, overwrite: bool = True, gguf_type: str = "f16") -> str:
    from distil.models.llamacpp import export_gguf

    return export_gguf(model, path, tokenizer=tokenizer, overwrite=overwrite, gguf_type=gguf_type)


# The export formats, one registry: name -> writer (what each writes: distil.spec.EXPORT_FORMATS).
FORMATS = {"hf": export_hf, "hf-remote": export_remote_code, "gguf": export_llamacpp}
assert set(FORMATS) == set(EXPORT_FORMATS)


def export(model, path: str | Path, format: str = "hf", **kwargs) -> str:
    """Write ``model`` in ``format`` (a key of FORMATS); returns what was written."""
    if format not in FORMATS:
        raise DistilError(f"unknown export format {format!r} (formats: {', '.join(FORMATS)})")
    return FORMATS[format](model, path, **kwargs)
