"""Which attention layers to turn into SSM layers.

    sel = select_layers(teacher, num_ssm=6, strategy="uniform", data=held_out_ids)
    sel.ssm_layers     # e.g. [0, 2, 3, 5, 6, 7]
    sel.scores         # {layer: KL to the teacher when that layer alone is replaced}

Strategies:

* ``"importance"``: replace each attention layer alone by its MIL-initialised SSM and measure the KL
  from the teacher on held-out tokens; the layers whose replacement costs least become SSM.
  ``score="leave_one_out"`` instead removes the layer's mixer outright (its residual branch is
  zeroed), a cheaper proxy used by layer-pruning work.
* ``"uniform"``: the attention layers that stay are spread evenly, one per bin of consecutive
  layers (as Zebra-Llama does); inside each bin the most important layer (highest score) stays.
  The source lab report found this beat pure importance at 45/50, where importance kept only the
  first 5 layers.
* ``"first"`` / ``"last"``: the first or last ``num_ssm`` layers; or an explicit list of layers.

Deterministic: the same model and data give the same selection (ties break on the layer index).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from distil.errors import DistilError
from distil.fsutil import atomic_write_text
from distil.losses import kd_loss


@dataclass
class LayerSelection:
    ssm_layers: list[int]
    strategy: str
    scores: dict[int, float] = field(default_factory=dict)  # higher = more important to keep as attention
    score_kind: str | None = None

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, json.dumps(asdict(self), indent=2))


@torch.no_grad()
def layer_scores(model, data: torch.Tensor, *, score: str = "mil", mixer: str = "mamba2", d_state: int = 16,
                 batch_size: int = 8, **hybrid_kwargs) -> dict[int, float]:
    """KL(teacher || model with layer i changed), per attention layer, on ``data`` [n, seq] token ids."""
    from distil.hybrid.mil import hybridize

    if data.dim() != 2 or data.shape[0] == 0:
        raise DistilError("layer scoring needs held-out token ids of shape [sequences, length]")
    model = model.eval()

    def logits_of(m):
        return torch.cat([m(data[i : i + batch_size]) for i in range(0, len(data), batch_size)])

    reference = logits_of(model)
    scores = {}
    for i, kind in enumerate(model.config.pattern):
        if kind != "A":
            continue
        if score == "mil":
            changed = hybridize(model, [i], mixer=mixer, init="mil", d_state=d_state, **hybrid_kwargs).eval()
            out = logits_of(changed)
        elif score == "leave_one_out":
            attention = model.layers[i].self_attn
            original = attention.o_proj.weight.detach().clone()
            attention.o_proj.weight.zero_()
            try:
                out = logits_of(model)
            finally:
                attention.o_proj.weight.copy_(original)
        else:
            raise DistilError(f"score {score!r} should be 'mil' or 'leave_one_out'")
        scores[i] = kd_loss(out, reference, "forward_kl").item()
    return scores


def select_layers(model, num_ssm: int, strategy="importance", data: torch.Tensor | None = None, *, score: str = "mil",
                  scores: dict[int, float] | None = None, **score_kwargs) -> LayerSelection:
    """Choose ``num_ssm`` attention layers to convert (see the module docstring)."""
    attention_layers = [i for i, k in enumerate(model.config.pattern) if k == "A"]
    if isinstance(strategy, (list, tuple)):
        layers = sorted(int(i) for i in strategy)
        if any(i not in attention_layers for i in layers):
            raise DistilError(f"layers {layers} are not all attention layers of the model ({attention_layers})")
        return LayerSelection(layers, "explicit")
    if not 0 <= num_ssm <= len(attention_layers):
        raise DistilError(f"num_ssm = {num_ssm} but the model has {len(attention_layers)} attention layers")
    if strategy == "first":
        return LayerSelection(attention_layers[:num_ssm], strategy)
    if strategy == "last":
        return LayerSelection(attention_layers[len(attention_layers) - num_ssm :], strategy)
    if strategy not in ("importance", "uniform"):
        raise DistilError(f"unknown placement strategy {strategy!r}; choose importance, uniform, first, last or a list")
    if scores is None:
        if data is None:
            raise DistilError(f"strategy {strategy!r} needs held-out data to score layers")
        scores = layer_scores(model, data, score=score, **score_kwargs)
    if strategy == "importance":
        least_important = sorted(attention_layers, key=lambda i: (scores[i], i))
        return LayerSelection(sorted(least_important[:num_ssm]), strategy, scores, score)
    keep = len(attention_layers) - num_ssm
    kept = []
    if keep:
        bounds = [round(b * len(attention_layers) / keep) for b in range(keep + 1)]
        for b in range(keep):
            bin_layers = attention_layers[bounds[b] : bounds[b + 1]]
            kept.append(max(bin_layers, key=lambda i: (scores[i], -i)))
    return LayerSelection(sorted(set(attention_layers) - set(kept)), strategy, scores, score)
