"""The frozen teacher: a distil model, a transformers checkpoint distil can load, or any causal LM.

    teacher = load_teacher("path/or/hub-id")
    hidden, weight, bias = teacher.head_inputs(input_ids)   # for the fused loss, when available
    logits = teacher.logits(input_ids)

Llama, Qwen2 and Mistral checkpoints load into distil's own TransformerLM (bit-exact with
transformers, see tests/test_hf_interop.py), which exposes hidden states and the head so the
fused loss never materialises the teacher's logits. Any other architecture runs through
``transformers.AutoModelForCausalLM`` and gives full logits.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from distil.errors import DistilError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class Teacher:
    def __init__(self, model: torch.nn.Module, *, native: bool, name: str = "teacher"):
        self.model = model.eval()
        self.model.requires_grad_(False)
        self.native = native
        self.name = name

    @property
    def vocab_size(self) -> int:
        if self.native:
            return self.model.config.vocab_size
        return self.model.get_output_embeddings().weight.shape[0]

    def to(self, device) -> Teacher:
        self.model.to(device)
        return self

    @torch.no_grad()
    def head_inputs(self, input_ids: torch.Tensor, doc_ids: torch.Tensor | None = None, positions=None):
        """(hidden [batch, seq, H], head weight [V, H], head bias or None), or None if unavailable."""
        if not self.native:
            return None
        hidden = self.model(input_ids, doc_ids=doc_ids, positions=positions, return_hidden=True)
        return hidden, self.model.lm_head.weight, None

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor, doc_ids: torch.Tensor | None = None, positions=None) -> torch.Tensor:
        if self.native:
            return self.model(input_ids, doc_ids=doc_ids, positions=positions)
        if doc_ids is not None:
            # transformers models take a 4-D mask; attention inside documents only, causal.
            seq = input_ids.shape[1]
            causal = torch.ones(seq, seq, dtype=torch.bool, device=input_ids.device).tril()
            mask = causal[None, None] & (doc_ids[:, None, :, None] == doc_ids[:, None, None, :])
            return self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions).logits
        return self.model(input_ids=input_ids, position_ids=positions).logits


def load_teacher(path: str | Path, *, dtype: str = "float32", device="cpu") -> Teacher:
    from distil.models.hf import SUPPORTED, resolve_checkpoint_dir
    from distil.models.io import is_native, load

    torch_dtype = DTYPES[dtype]
    local = resolve_checkpoint_dir(path)
    cfg_file = local / "config.json"
    if not cfg_file.is_file():
        raise DistilError(f"teacher checkpoint {local} has no config.json")
    if is_native(local):
        return Teacher(load(local, dtype=torch_dtype, device=device), native=True, name=str(path))
    try:
        model_type = json.loads(cfg_file.read_text()).get("model_type")
    except json.JSONDecodeError as e:
        raise DistilError(f"teacher config {cfg_file} is not valid JSON: {e}") from e
    if model_type in SUPPORTED:
        return Teacher(load(local, dtype=torch_dtype, device=device), native=True, name=str(path))
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(str(local), dtype=torch_dtype)
    except Exception as e:
        raise DistilError(f"could not load teacher {path} with transformers: {str(e).splitlines()[0]}") from e
    return Teacher(model.to(device), native=False, name=str(path))
