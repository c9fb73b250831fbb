"""Native distil checkpoints (``config.json`` + ``model.safetensors``) and loading of any model dir.

    save_native(model, "out/student", tokenizer=tok)   # transformer or hybrid (distil.models.save)
    model = distil.models.load("out/student")           # native, a transformers checkpoint of a native family, or a .gguf

The native format reloads exactly (bit for bit). A directory is written under a temporary name
and renamed when complete, so a crash never leaves a checkpoint that looks whole.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from distil.errors import DistilError
from distil.fsutil import atomic_dir
from distil.models.transformer import TransformerLM, config_dict, config_from_json

NATIVE_FORMAT = "distil"


def _state_dict_for_saving(model) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    if model.config.tie_embeddings:
        state.pop("lm_head.weight", None)  # safetensors refuses shared storage; tying restores it
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def save_file_state(model, folder: Path, state: dict[str, torch.Tensor] | None = None) -> None:
    """config.json + model.safetensors into an existing (temporary) folder. ``state`` replaces
    ``model.state_dict()`` (a full state dict gathered from a sharded model)."""
    cfg = {"format": NATIVE_FORMAT, **config_dict(model.config)}
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    if state is None:
        state = _state_dict_for_saving(model)
    else:
        state = {k: v.detach().contiguous().cpu() for k, v in state.items()
                 if not (model.config.tie_embeddings and k == "lm_head.weight")}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})


def save_native(model, path: str | Path, *, tokenizer=None, overwrite: bool = True, state=None) -> None:
    """Write config.json + model.safetensors (and the tokenizer, if given) as one atomic directory."""
    with atomic_dir(path, overwrite=overwrite) as tmp:
        save_file_state(model, tmp, state)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise DistilError(f"checkpoint file {path} is corrupt or unreadable: {e}") from e


def is_native(path: Path) -> bool:
    cfg = path / "config.json"
    if not cfg.is_file():
        return False
    try:
        return json.loads(cfg.read_text()).get("format") == NATIVE_FORMAT
    except json.JSONDecodeError as e:
        raise DistilError(f"checkpoint config {cfg} is not valid JSON: {e}") from e


def load_native(path: str | Path, *, dtype: torch.dtype = torch.float32, device="cpu"):
    path = Path(path)
    try:
        cfg = config_from_json(path / "config.json")
    except (TypeError, json.JSONDecodeError) as e:
        raise DistilError(f"checkpoint config {path / 'config.json'} is invalid: {e}") from e
    weights = path / "model.safetensors"
    if not weights.is_file():
        raise DistilError(f"checkpoint {path} has no model.safetensors")
    state = read_safetensors(weights)
    with torch.device("meta"):
        model = TransformerLM(cfg)
    model = model.to_empty(device=device)
    model.set_rope_buffers(device)
    load_state(model, state, source=str(path), assign=True)
    return model.to(dtype)


def load_state(model, state: dict[str, torch.Tensor], *, source: str, assign: bool = False) -> None:
    """Load a state dict strictly (tying lm_head when the config ties it); errors name the file.

    ``assign=True`` swaps in the loaded tensors (for a model built on the meta device); the default
    copies into the existing parameters, so an optimizer holding them stays attached.
    """
    if model.config.tie_embeddings:
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        expected.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise DistilError(
            f"checkpoint {source} does not match its config: missing {missing[:4]}, unexpected {unexpected[:4]}"
        )
    for k, v in state.items():
        if tuple(v.shape) != tuple(expected[k]):
            raise DistilError(f"checkpoint {source}: {k} has shape {tuple(v.shape)}, expected {tuple(expected[k])}")
    model.load_state_dict(state, strict=False, assign=assign)
    if model.config.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
