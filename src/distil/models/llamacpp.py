"""GGUF files for llama.cpp (``distil export --format gguf``): what its runtime loads, Ollama and LM
Studio included.

    export_gguf(model, "student.gguf", tokenizer=tok, gguf_type="q8_0")

Architectures (llama.cpp's names):

* ``llama`` for all-attention students of Llama layout (SmolLM2, Llama, a model distil built).
* ``granitehybrid`` for attention + Mamba2 hybrids: llama.cpp's runtime for IBM Granite 4, whose
  layers are attention or Mamba2 (mamba_ssm layout) with a SwiGLU MLP each. That is distil's hybrid
  exactly, as ``hf`` export's GraniteMoeHybrid is. llama.cpp's loader takes only
  ``d_inner = 2 * d_model`` (it asserts), and MIL's students have ``d_inner = n_heads * head_dim``
  (``d_model`` for Llama shapes). Such a layer is written p = 2 * d_model / d_inner times wider:
  each group holds its heads and p - 1 copies of them. A copy shares its group's B and C, so it
  computes what its original computes; the gated norm's groups then hold each value p times, so
  their mean square and the norm are unchanged; the output projection reads only the originals.
  The file computes what the model computes, at p times the scan's work in those layers.
  ``widen_mamba2`` does it in distil's layout, and tests/test_llamacpp.py checks the widened model
  against the original in distil itself.

What is refused, with the reason: discrete Mamba2 (no llama.cpp architecture has that mixer), the
other families' switches (q/k norms, sliding windows, sandwich norms, GeGLU, QKV biases), a
tokenizer that is not byte-level BPE, and widths that no whole p reaches.

Types: ``f32``; ``f16`` (matrices f16, norms, biases and SSM parameters f32, as llama.cpp's own
converter writes them); ``q8_0`` (matrices whose rows are whole 32-blocks in Q8_0, the rest as f16).

Tokenizer: byte-level BPE as llama.cpp's ``gpt2`` model, with the pre-tokenizer read from
tokenizer.json (GPT-2's regex, or SmolLM's with single digits), every token, its type (control for
special tokens), the merges, BOS/EOS/PAD, whether BOS is added, and the chat template.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

import torch

from distil.errors import DistilError
from distil.fsutil import FILE_MODE, make_parents
from distil.models.families import require_llama_layout

log = logging.getLogger(__name__)

GGUF_TYPES = ("f32", "f16", "q8_0")
QK8_0 = 32  # Q8_0 block length: rows must be whole blocks


def _refuse_attention_switches(cfg, arch: str) -> None:
    if cfg.qkv_bias or cfg.qk_norm or cfg.sliding_window is not None or cfg.nope_layers:
        found = [name for name, on in (("QKV biases", cfg.qkv_bias), ("q/k norms", cfg.qk_norm),
                                       ("a sliding window", cfg.sliding_window is not None),
                                       ("layers without rope", bool(cfg.nope_layers))) if on]
        raise DistilError(f"this model has {', '.join(found)}, which llama.cpp's {arch} architecture has no place "
                          "for; export it with --format hf and convert with llama.cpp's convert_hf_to_gguf.py")
    require_llama_layout(cfg, f"llama.cpp's {arch} architecture")


def architecture(cfg) -> str:
    """llama.cpp's architecture for ``cfg``, or a DistilError that says why there is none."""
    if "D" in cfg.pattern:
        raise DistilError("discrete Mamba2 layers cannot be exported to GGUF: llama.cpp has no architecture with that "
                          "mixer (per-timestep decay from in_proj, z_bias, no gated norm); keep this model in distil's "
                          "native format")
    arch = "granitehybrid" if cfg.is_hybrid else "llama"
    _refuse_attention_switches(cfg, arch)
    if cfg.is_hybrid:
        ssm = cfg.ssm["M"]
        if ssm.get("norm_eps", 1e-5) != cfg.rms_norm_eps:
            raise DistilError(f"the Mamba2 gated norm's eps ({ssm.get('norm_eps', 1e-5)}) differs from rms_norm_eps "
                              f"({cfg.rms_norm_eps}); llama.cpp's granitehybrid uses one epsilon for both")
        _padding(cfg)
    return arch


def _padding(cfg) -> int:
    """p: how many times wider llama.cpp's granitehybrid needs the Mamba2 layers (d_inner = 2 * d_model)."""
    ssm = cfg.ssm["M"]
    d_inner = ssm.get("d_inner") or int(ssm.get("expand", 2) * cfg.d_model)
    if (2 * cfg.d_model) % d_inner:
        raise DistilError(f"Mamba2 d_inner = {d_inner}: llama.cpp's granitehybrid takes only d_inner = 2 * d_model = "
                          f"{2 * cfg.d_model}, and {d_inner} does not divide it, so no zero heads can widen it")
    return 2 * cfg.d_model // d_inner


# ---------------------------------------------------------------------------------------------
# Mamba2 layers widened to d_inner = 2 * d_model


def widen_mamba2(state: dict[str, torch.Tensor], *, n_groups: int, head_dim: int, d_state: int, p: int
               ) -> dict[str, torch.Tensor]:
    """One Mamba2 mixer's parameters (distil names: in_proj.weight, conv1d.weight/bias, dt_bias, A_log,
    D, norm.weight, out_proj.weight) with p times as many heads: each group holds its real heads, then
    p - 1 copies of them. A copy shares its group's B and C, so it computes what its original
    computes; the gated norm's groups hold each value p times, so their mean square, and the norm, are
    unchanged; the output projection reads the originals only (zero columns for the copies)."""
    if p == 1:
        return dict(state)
    n_heads = state["dt_bias"].numel()
    d_inner = n_heads * head_dim
    per_group = n_heads // n_groups
    # source[new head] = the real head it holds: group g is [its heads, copy 1, ..., copy p - 1]
    source = torch.tensor([g * per_group + j for g in range(n_groups) for _ in range(p) for j in range(per_group)])
    channels = (source[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)
    first = torch.tensor([c == 0 for g in range(n_groups) for c in range(p) for _ in range(per_group)])
    bc = 2 * n_groups * d_state
    z, xbc, dt = state["in_proj.weight"].split([d_inner, d_inner + bc, n_heads])
    x, b_c = xbc.split([d_inner, bc])
    conv_w, conv_b = state["conv1d.weight"], state["conv1d.bias"]
    out = state["out_proj.weight"][:, channels] * first.repeat_interleave(head_dim).to(state["out_proj.weight"])
    return {
        "in_proj.weight": torch.cat([z[channels], x[channels], b_c, dt[source]]),
        "conv1d.weight": torch.cat([conv_w[:d_inner][channels], conv_w[d_inner:]]),
        "conv1d.bias": torch.cat([conv_b[:d_inner][channels], conv_b[d_inner:]]),
        "dt_bias": state["dt_bias"][source],
        "A_log": state["A_log"][source],
        "D": state["D"][source],
        "norm.weight": state["norm.weight"][channels],
        "out_proj.weight": out.contiguous(),
    }


# ---------------------------------------------------------------------------------------------
# Tensors


def _permute_rope(w: torch.Tensor, heads: int) -> torch.Tensor:
    """q/k rows from transformers' rotate-half order to llama.cpp's adjacent pairs (its ``llama``
    and ``granite*`` architectures rotate pairs of neighbouring values)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "mamba.in_proj.weight": "ssm_in.weight",
    "mamba.conv1d.weight": "ssm_conv1d.weight",
    "mamba.conv1d.bias": "ssm_conv1d.bias",
    "mamba.dt_bias": "ssm_dt.bias",
    "mamba.A_log": "ssm_a",
    "mamba.D": "ssm_d",
    "mamba.norm.weight": "ssm_norm.weight",
    "mamba.out_proj.weight": "ssm_out.weight",
}


def gguf_tensors(model) -> dict[str, torch.Tensor]:
    """llama.cpp's tensors of ``model`` (fp32, torch's shape order; the writer reverses it)."""
    cfg = model.config
    own = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    out = {"token_embd.weight": own["embed_tokens.weight"], "output_norm.weight": own["norm.weight"]}
    if not cfg.tie_embeddings:
        out["output.weight"] = own["lm_head.weight"]
    if cfg.rope_scaling:  # llama.cpp divides each frequency by its factor (rope_freqs), as for Llama 3
        from distil.models.transformer import rope_inv_freq

        base = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.int64).float() / cfg.head_dim))
        out["rope_freqs.weight"] = base / rope_inv_freq(cfg)
    ssm = cfg.ssm.get("M", {})
    for i, kind in enumerate(cfg.pattern):
        prefix = f"layers.{i}."
        layer = {k[len(prefix):]: v for k, v in own.items() if k.startswith(prefix)}
        if kind == "M":
            mixer = widen_mamba2({k[len("mamba."):]: v for k, v in layer.items() if k.startswith("mamba.")},
                               n_groups=ssm.get("n_groups", 1), head_dim=ssm.get("head_dim", 64),
                               d_state=ssm.get("d_state", 128), p=_padding(cfg))
            layer = {**{k: v for k, v in layer.items() if not k.startswith("mamba.")},
                     **{f"mamba.{k}": v for k, v in mixer.items()}}
            layer["mamba.A_log"] = -torch.exp(layer["mamba.A_log"])[:, None]  # llama.cpp stores A itself
            layer["mamba.D"] = layer["mamba.D"][:, None]
            layer["mamba.conv1d.weight"] = layer["mamba.conv1d.weight"][:, 0]
            groups = ssm.get("n_groups", 1)
            layer["mamba.norm.weight"] = layer["mamba.norm.weight"].reshape(groups, -1)
        for name, tensor in layer.items():
            if name == "self_attn.q_proj.weight":
                tensor = _permute_rope(tensor, cfg.n_heads)
            elif name == "self_attn.k_proj.weight":
                tensor = _permute_rope(tensor, cfg.n_kv_heads)
            out[f"blk.{i}.{LAYER_NAMES[name]}"] = tensor
    return out


def _stored_type(name: str, tensor: torch.Tensor, gguf_type: str):
    """(GGMLQuantizationType, numpy data) for one tensor."""
    import gguf
    import numpy as np

    data = tensor.numpy().astype(np.float32)
    keep_f32 = gguf_type == "f32" or tensor.ndim == 1 or "ssm_conv1d" in name or name.split(".")[-1] in (
        "ssm_a", "ssm_d") or "ssm_norm" in name or "rope_freqs" in name
    if keep_f32:
        return gguf.GGMLQuantizationType.F32, data
    if gguf_type == "q8_0" and data.shape[-1] % QK8_0 == 0:
        return gguf.GGMLQuantizationType.Q8_0, gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0)
    return gguf.GGMLQuantizationType.F16, data.astype(np.float16)


# ---------------------------------------------------------------------------------------------
# Tokenizer


# tokenizer.json pre-tokenizers -> llama.cpp's names for the same splitting
def _pre_tokenizer(spec: dict | None) -> str:
    def byte_level(p):
        return p.get("type") == "ByteLevel" and p.get("use_regex", True)

    if spec and byte_level(spec) and not spec.get("add_prefix_space", False):
        return "gpt-2"
    if spec and spec.get("type") == "Sequence":
        parts = spec["pretokenizers"]
        if (len(parts) == 2 and parts[0] == {"type": "Digits", "individual_digits": True} and byte_level(parts[1])
                and not parts[1].get("add_prefix_space", False)):
            return "smollm"
    raise DistilError(f"llama.cpp would split text differently from this tokenizer's pre-tokenizer "
                      f"({json.dumps(spec)[:120]}); distil writes GGUF for GPT-2-style byte-level BPE "
                      "(distil's own tokenizers, SmolLM2)")


def tokenizer_metadata(tokenizer, vocab_size: int) -> dict:
    """What llama.cpp needs to tokenise exactly as ``tokenizer`` (a transformers fast tokenizer)."""
    import gguf

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    if spec["model"]["type"] != "BPE" or (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise DistilError(f"the tokenizer is {spec['model']['type']} without byte-level decoding; distil writes GGUF "
                          "tokenizers for byte-level BPE only (export --format hf and use llama.cpp's converter)")
    pre = _pre_tokenizer(spec.get("pre_tokenizer"))
    vocab = tokenizer.get_vocab()
    if len(vocab) > vocab_size or max(vocab.values()) >= vocab_size:
        raise DistilError(f"the tokenizer has ids up to {max(vocab.values())}, beyond the model's vocabulary "
                          f"({vocab_size})")
    by_id = {i: t for t, i in vocab.items()}
    added = {a["id"]: a for a in spec.get("added_tokens", [])}
    tokens, types = [], []
    for i in range(vocab_size):  # ids the tokenizer lacks (a padded embedding) become unused tokens
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    plain, special = tokenizer("a", add_special_tokens=False)["input_ids"], tokenizer("a")["input_ids"]
    return dict(pre=pre, tokens=tokens, types=types, merges=merges, bos=tokenizer.bos_token_id,
                eos=tokenizer.eos_token_id, pad=tokenizer.pad_token_id,
                add_bos=len(special) > len(plain) and special[0] == tokenizer.bos_token_id,
                chat_template=getattr(tokenizer, "chat_template", None))


# ---------------------------------------------------------------------------------------------
# The file


def gguf_path(path: str | Path, gguf_type: str) -> Path:
    """``path`` itself when it names a .gguf file, else ``path/model.<type>.gguf``."""
    path = Path(path)
    return path if path.suffix.lower() == ".gguf" else path / f"model.{gguf_type}.gguf"


def export_gguf(model, path: str | Path, *, tokenizer=None, overwrite: bool = True, gguf_type: str = "f16") -> str:
    """Write ``model`` as one GGUF file for llama.cpp; returns the file's path."""
    import gguf

    if gguf_type not in GGUF_TYPES:
        raise DistilError(f"unknown GGUF type {gguf_type!r} (types: {', '.join(GGUF_TYPES)})")
    if tokenizer is None:
        raise DistilError("a GGUF file carries its tokenizer, and this checkpoint has none (a checkpoints/step_* "
                          "folder: export checkpoints/final, or copy the run's tokenizer files in)")
    cfg = model.config
    arch = architecture(cfg)
    vocab = tokenizer_metadata(tokenizer, cfg.vocab_size)
    out = gguf_path(path, gguf_type)
    if out.exists() and not overwrite:
        raise DistilError(f"{out} already exists (pass --overwrite to replace it)")
    make_parents(out)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    try:
        w = gguf.GGUFWriter(tmp, arch)
        w.add_name(Path(out).stem)
        w.add_context_length(cfg.max_seq_len)
        w.add_embedding_length(cfg.d_model)
        w.add_block_count(cfg.n_layers)
        w.add_feed_forward_length(cfg.intermediate_size)
        w.add_head_count(cfg.n_heads)
        w.add_head_count_kv([cfg.n_kv_heads if k == "A" else 0 for k in cfg.pattern] if cfg.is_hybrid
                            else cfg.n_kv_heads)
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
        w.add_rope_dimension_count(cfg.head_dim)
        w.add_rope_freq_base(cfg.rope_theta)
        w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
        w.add_vocab_size(cfg.vocab_size)
        w.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                         "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[gguf_type])
        if cfg.is_hybrid:
            ssm, d_inner = cfg.ssm["M"], 2 * cfg.d_model  # widened (widen_mamba2)
            w.add_ssm_conv_kernel(ssm.get("d_conv", 4))
            w.add_ssm_inner_size(d_inner)
            w.add_ssm_state_size(ssm.get("d_state", 128))
            w.add_ssm_time_step_rank(d_inner // ssm.get("head_dim", 64))
            w.add_ssm_group_count(ssm.get("n_groups", 1))
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(vocab["pre"])
        w.add_token_list(vocab["tokens"])
        w.add_token_types(vocab["types"])
        w.add_token_merges(vocab["merges"])
        for key, adder in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id), ("pad", w.add_pad_token_id)):
            if vocab[key] is not None:
                adder(vocab[key])
        w.add_add_bos_token(vocab["add_bos"])
        if vocab["chat_template"]:
            w.add_chat_template(vocab["chat_template"])
        for name, tensor in gguf_tensors(model).items():
            qtype, data = _stored_type(name, tensor, gguf_type)
            w.add_tensor(name, data, raw_dtype=qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    log.info("wrote %s: llama.cpp architecture %s, weights %s, %d tokens", out, arch, gguf_type, len(vocab["tokens"]))
    return str(out)
