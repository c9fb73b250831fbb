"""Load any model distil can train or distil from, by path: ``distil.models.load``.

    model = load("out/student")           # a native checkpoint (transformer or hybrid), bit-exact
    model = load("path/to/llama")         # a transformers Llama / Qwen2 / Mistral folder or hub id
    model = load("model.gguf")            # a GGUF of a native family (converted once, cached)
"""

from __future__ import annotations

from pathlib import Path

import torch

from distil.errors import DistilError
from distil.gguf import resolve_model_path
from distil.models.hf import load_hf
from distil.models.io import is_native, load_native


def load(path: str | Path, *, dtype: torch.dtype = torch.float32, device="cpu"):
    """Load a distil checkpoint, a transformers checkpoint or a GGUF of a family in :mod:`distil.models.families`
    file into TransformerLM."""
    path = resolve_model_path(path)
    local = Path(path)
    if local.is_dir():
        if is_native(local):
            return load_native(local, dtype=dtype, device=device)
        if (local / "config.json").is_file():
            return load_hf(local, dtype=dtype).to(device)
        raise DistilError(f"{local} is not a checkpoint: it has no config.json")
    if local.exists():
        raise DistilError(f"checkpoint path {local} is a file; give the checkpoint directory")
    return load_hf(str(path), dtype=dtype).to(device)  # a hub id; load_hf explains a failed download
