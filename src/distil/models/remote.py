"""Export a model no stock transformers class holds as a folder with its own modeling code.

    export_remote(model, "out/")   # AutoModelForCausalLM.from_pretrained("out/", trust_remote_code=True)

For hybrids of families GraniteMoeHybrid cannot hold (Qwen3's q/k norms, Gemma 3's norms, GeGLU and
sliding layers, SmolLM3's layers without rope, the size-matched ``width="kv"`` Mamba2 layout, discrete
Mamba2). The folder holds ``config.json`` (``model_type: distil``, distil's model config under
``distil``), ``model.safetensors`` with distil's own parameter names under ``model.``, and the model's
code: distil's own ``transformer.py`` and ``ssm.py`` copied in (their pure-PyTorch reference path,
so the logits are distil's exactly; nothing imports distil), ``configuration_distil.py`` and
``modeling_distil.py`` (``DistilForCausalLM``: logits and loss; ``generate`` works, recomputing the
prefix each step, as the wrapper keeps no cache). Padding is accepted on the right only.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import torch

from distil.fsutil import atomic_dir
from distil.models import ssm as ssm_module
from distil.models import transformer as transformer_module
from distil.models.transformer import config_dict

CONFIGURATION = '''"""The config of a model exported by distil (its own ModelConfig under ``distil``)."""

from transformers import PretrainedConfig


class DistilConfig(PretrainedConfig):
    model_type = "distil"

    def __init__(self, distil=None, **kwargs):
        self.distil = dict(distil or {})
        kwargs.setdefault("vocab_size", self.distil.get("vocab_size"))
        kwargs.setdefault("hidden_size", self.distil.get("d_model"))
        kwargs.setdefault("num_hidden_layers", self.distil.get("n_layers"))
        kwargs.setdefault("num_attention_heads", self.distil.get("n_heads"))
        kwargs.setdefault("tie_word_embeddings", self.distil.get("tie_embeddings", True))
        super().__init__(**kwargs)
'''

MODELING = '''"""A model exported by distil, for AutoModelForCausalLM with trust_remote_code=True.

The network is distil's own TransformerLM (``distil_transformer.py``, ``distil_ssm.py``: copies of
distil's source, pure PyTorch). This wrapper gives transformers' interface: logits, the shifted
cross-entropy loss when ``labels`` are given, and ``generate`` (no cache: each step reruns the prefix).
"""

import torch
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_distil import DistilConfig
from .distil_transformer import ModelConfig, TransformerLM


class DistilForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = DistilConfig
    base_model_prefix = "model"
    _no_split_modules = ["Block"]

    def __init__(self, config):
        super().__init__(config)
        self.model = TransformerLM(ModelConfig(**config.distil))
        self.post_init()

    def _init_weights(self, module):
        pass  # the weights come from model.safetensors

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def get_output_embeddings(self):
        return self.model.lm_head

    def _finish_loading(self):
        # transformers builds the model on the meta device and loads the saved tensors into it: the rotary
        # tables (buffers that are not saved) are computed again here, and a tied head is tied again.
        self.model.set_rope_buffers(self.model.embed_tokens.weight.device)
        if self.model.config.tie_embeddings:
            self.model.lm_head.weight = self.model.embed_tokens.weight
        self._loaded = True

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        if not getattr(self, "_loaded", False):
            self._finish_loading()
        if attention_mask is not None and not bool((attention_mask.cummin(-1).values == attention_mask).all()):
            raise ValueError("this model accepts padding on the right only (attention_mask 1s then 0s per row)")
        logits = self.model(input_ids)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
        return {"input_ids": input_ids}
'''

SHIM_SSM = '''
def use_fast_path(name, tensor):  # an exported model always runs distil's pure-PyTorch reference
    return False
'''

SHIM_TRANSFORMER = '''
import contextlib
import types

from .distil_ssm import DiscreteMamba2Mixer, Mamba2Mixer

ssm = types.SimpleNamespace(Mamba2Mixer=Mamba2Mixer, DiscreteMamba2Mixer=DiscreteMamba2Mixer)


class DistilError(ValueError):
    pass


def decode_attention_backends(tensor):
    return contextlib.nullcontext()
'''


def _standalone(module, shim: str, replaced: tuple[str, ...]) -> str:
    """``module``'s source with its distil imports replaced by ``shim`` (after the __future__ import)."""
    lines = inspect.getsource(module).splitlines()
    kept = [line for line in lines if line.strip() not in replaced]
    missing = [r for r in replaced if r not in (line.strip() for line in lines)]
    if missing:  # the copied module's imports changed: the shim no longer matches
        raise RuntimeError(f"{module.__name__} no longer has the imports the export replaces: {missing}")
    at = next(i for i, line in enumerate(kept) if line.startswith("from __future__")) + 1
    return "\n".join([*kept[:at], shim, *kept[at:]]) + "\n"


def code_files() -> dict[str, str]:
    return {
        "configuration_distil.py": CONFIGURATION,
        "modeling_distil.py": MODELING,
        "distil_ssm.py": _standalone(ssm_module, SHIM_SSM, ("from distil.kernels import use_fast_path",)),
        "distil_transformer.py": _standalone(transformer_module, SHIM_TRANSFORMER, (
            "from distil.errors import DistilError", "from distil.kernels import decode_attention_backends",
            "from distil.models import ssm")),
    }


def export_remote(model, path: str | Path, *, tokenizer=None, overwrite: bool = True) -> str:
    """Write ``model`` with its own modeling code; returns the architecture name."""
    from safetensors.torch import save_file

    cfg = model.config
    config = {
        "architectures": ["DistilForCausalLM"], "model_type": "distil",
        "auto_map": {"AutoConfig": "configuration_distil.DistilConfig",
                     "AutoModelForCausalLM": "modeling_distil.DistilForCausalLM"},
        "distil": config_dict(cfg), "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads, "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "dtype": "float32",
    }
    # Tied heads are saved once more under lm_head (safetensors refuses shared storage; loading ties them again).
    state = {f"model.{k}": v.detach().clone().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_dir(path, overwrite=overwrite) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        for name, text in code_files().items():
            (tmp / name).write_text(text)
        save_file({k: v.to(torch.float32) for k, v in state.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return "DistilForCausalLM (trust_remote_code)"
