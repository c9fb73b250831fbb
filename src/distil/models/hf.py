"""Hugging Face interop: load transformers checkpoints into distil and export distil models to them.

    model = load_hf("path/or/hub-id")   # Llama (3.x rope scaling too), Mistral, Qwen2/3, Gemma 3, SmolLM3, Phi-3
    save_hf(model, "out/hf")            # AutoModelForCausalLM.from_pretrained loads it

Parameter names already follow transformers' Llama, so conversion strips or adds the ``model.``
prefix and applies the family's renames (:mod:`distil.models.families`). Hybrids export through :func:`distil.models.export.export_hybrid_hf`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from distil.errors import DistilError
from distil.fsutil import atomic_dir
from distil.gguf import resolve_model_path
from distil.models.families import SUPPORTED, family_for_hf, family_of, read_state
from distil.models.io import load_state, read_safetensors
from distil.models.transformer import ModelConfig, TransformerLM

__all__ = ["SUPPORTED", "load_hf", "save_hf", "model_config_from_hf", "hf_config_for", "hf_state_dict"]



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
    """A transformers config dict as distil's ModelConfig, through its family's description."""
    return family_for_hf(hf).read(hf)


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
    family = family_for_hf(hf)
    cfg = family.read(hf)
    state = read_state(family, cfg, read_hf_weights(local))
    model = TransformerLM(cfg)
    load_state(model, state, source=str(local))
    return model.to(dtype)


def hf_config_for(model: TransformerLM):
    """The transformers config that represents this all-attention model, from its family (see
    :mod:`distil.models.families`)."""
    if model.config.is_hybrid:
        raise DistilError("this is a hybrid model; export it with `distil export --format hf` (GraniteMoeHybrid)")
    return family_of(model.config).write(model.config)


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
    state = hf_state_dict(model, rename=family_of(model.config).rename_out)
    with atomic_dir(path, overwrite=overwrite) as tmp:
        hf.save_pretrained(tmp)
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
