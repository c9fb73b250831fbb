"""A teacher model: distil's own (``ModelTeacher``) or any transformers causal LM (``HFTeacher``).

    teacher = load_teacher("path/or/hub-id/or/model.gguf")
    hidden, weight, bias = teacher.head_inputs(input_ids)   # ModelTeacher: for the fused loss
    logits = teacher.logits(input_ids)
    signal = teacher.signal(batch, Request("topk", k=64))    # the protocol (teachers/base.py)

Checkpoints of the families in distil.models.families load into distil's own TransformerLM (bit-exact with
transformers, see tests/test_hf_interop.py), which exposes hidden states and the head so the
fused loss never materialises the teacher's logits. Any other architecture runs through
``transformers.AutoModelForCausalLM`` and gives full logits.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from distil.errors import DistilError
from distil.losses.topk import teacher_topk
from distil.models.hf import SUPPORTED, resolve_checkpoint_dir
from distil.models.io import is_native
from distil.models.loading import load
from distil.teachers.base import Request

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class _FrozenModel:
    """A frozen model in eval mode, and the logits -> top-k step both kinds share."""

    carries_state = False

    def __init__(self, model: torch.nn.Module, name: str):
        self.model = model.eval()
        self.model.requires_grad_(False)
        self.name = name

    def to(self, device):
        self.model.to(device)
        return self

    def close(self) -> None:
        pass

    @staticmethod
    def _finish(logits: torch.Tensor, request: Request):
        if request.kind == "topk":  # as a top-k cache would hold it: log-probs at the loss temperature
            return teacher_topk(logits, request.k, temperature=request.temperature)
        return logits


class ModelTeacher(_FrozenModel):
    """distil's own TransformerLM (also Llama / Qwen2 / Mistral checkpoints and GGUFs loaded into it)."""

    carries_state = True
    native = True

    def __init__(self, model: torch.nn.Module, *, name: str = "teacher"):
        super().__init__(model, name)
        # Soft-capped logits (Gemma 2) are no linear function of the hidden states: no head inputs then.
        self.gives = ("logits", "topk") if model.config.logit_softcap is not None else ("head", "logits", "topk")

    @property
    def vocab_size(self) -> int:
        return self.model.config.vocab_size

    @torch.no_grad()
    def head_inputs(self, input_ids: torch.Tensor, doc_ids: torch.Tensor | None = None, positions=None):
        """(hidden [batch, seq, H], head weight [V, H], head bias None)."""
        hidden = self.model(input_ids, doc_ids=doc_ids, positions=positions, return_hidden=True)
        return hidden, self.model.lm_head.weight, None

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor, doc_ids: torch.Tensor | None = None, positions=None) -> torch.Tensor:
        return self.model(input_ids, doc_ids=doc_ids, positions=positions)

    @torch.no_grad()
    def signal(self, batch: dict, request: Request, stream: dict | None = None):
        input_ids, doc_ids, positions = batch["input_ids"], batch.get("attn_doc_ids"), batch.get("positions")
        if stream is not None:  # stream packing: the state flows in from the previous chunk and out to the next
            hidden, stream["teacher"] = self.model(input_ids, positions=positions, states=stream["teacher"],
                                                   return_states=True, return_hidden=True)
            weight = self.model.lm_head.weight
            return (hidden, weight, None) if request.kind == "head" else self._finish(self.model.head(hidden), request)
        if request.kind == "head":
            return self.head_inputs(input_ids, doc_ids, positions)
        return self._finish(self.logits(input_ids, doc_ids, positions), request)


class HFTeacher(_FrozenModel):
    """Any ``transformers`` causal LM: full logits (and top-k from them), no head inputs."""

    gives = ("logits", "topk")
    native = False

    def __init__(self, model: torch.nn.Module, *, name: str = "teacher"):
        super().__init__(model, name)

    @property
    def vocab_size(self) -> int:
        return self.model.get_output_embeddings().weight.shape[0]

    def head_inputs(self, *args):
        return None

    @torch.no_grad()
    def signal(self, batch: dict, request: Request, stream: dict | None = None):
        assert request.kind != "head", "a transformers teacher gives no head inputs"
        return self._finish(self.logits(batch["input_ids"], batch.get("attn_doc_ids"), batch.get("positions")), request)

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor, doc_ids: torch.Tensor | None = None, positions=None) -> torch.Tensor:
        if doc_ids is not None:
            # transformers models take a 4-D mask; attention inside documents only, causal.
            seq = input_ids.shape[1]
            causal = torch.ones(seq, seq, dtype=torch.bool, device=input_ids.device).tril()
            mask = causal[None, None] & (doc_ids[:, None, :, None] == doc_ids[:, None, None, :])
            return self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions).logits
        return self.model(input_ids=input_ids, position_ids=positions).logits


def load_teacher(path: str | Path, *, dtype: str = "float32", device="cpu") -> ModelTeacher | HFTeacher:
    torch_dtype = DTYPES[dtype]
    local = resolve_checkpoint_dir(path)
    cfg_file = local / "config.json"
    if not cfg_file.is_file():
        raise DistilError(f"teacher checkpoint {local} has no config.json")
    if is_native(local):
        return ModelTeacher(load(local, dtype=torch_dtype, device=device), name=str(path))
    try:
        model_type = json.loads(cfg_file.read_text()).get("model_type")
    except json.JSONDecodeError as e:
        raise DistilError(f"teacher config {cfg_file} is not valid JSON: {e}") from e
    if model_type in SUPPORTED:
        return ModelTeacher(load(local, dtype=torch_dtype, device=device), name=str(path))
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(str(local), dtype=torch_dtype)
    except Exception as e:
        raise DistilError(f"could not load teacher {path} with transformers: {str(e).splitlines()[0]}") from e
    return HFTeacher(model.to(device), name=str(path))
