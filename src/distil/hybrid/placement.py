"""Which attention layers to turn into SSM layers.

    sel = select_layers(teacher, num_ssm=6, strategy="uniform", data=held_out_ids)
    sel.ssm_layers     # e.g. [0, 2, 3, 5, 6, 7]
    sel.scores         # {layer: KL to the teacher when that layer alone is replaced}

Strategies:

* ``"importance"``: score each attention layer (:func:`layer_scores`: by default how far its
  calibrated MIL SSM's output is from the attention output, relative to the residual stream; or the
  end-to-end KL with that layer alone replaced, ``score="mil"``, or removed, ``"leave_one_out"``);
  the layers whose replacement costs least become SSM.
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
from distil.hybrid.mil import calibrate, fresh_mil_mixer
from distil.losses import kd_loss


@dataclass
class LayerSelection:
    ssm_layers: list[int]
    strategy: str
    scores: dict[int, float] = field(default_factory=dict)  # higher = more important to keep as attention
    score_kind: str | None = None

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, json.dumps(asdict(self), indent=2))


SCORES = ("local", "mil", "leave_one_out")


@torch.no_grad()
def layer_scores(model, data: torch.Tensor, *, score: str = "local", mixer: str = "mamba2", d_state: int = 16,
                 batch_size: int = 4, progress: bool = False, **hybrid_kwargs) -> dict[int, float]:
    """Importance of each attention layer on ``data`` [n, seq] token ids (higher = keep as attention).

    * ``"local"``: the relative error, in the residual stream, of the layer's calibrated MIL SSM
      against the attention output it replaces, per token ``|attn(h) - ssm(h)|^2 / |x + attn(h)|^2``,
      averaged. One pass of the model over ``data`` plus one SSM mixer per layer: 23 s for the 30
      layers of SmolLM2-135M on 4k tokens, where ``"mil"`` takes 187 s (rank correlation 0.91).
    * ``"mil"``: KL(model || model with layer i as its calibrated MIL SSM), end to end.
    * ``"leave_one_out"``: the same KL with the layer's mixer removed (its output zero).

    The KL forms run the model once, keep each layer's input, and rerun only the changed layer and
    the ones above it, one batch at a time (no copy of the model, no full-vocabulary logits of the
    whole set at once). The MIL mixers are calibrated on ``data`` itself.
    """
    from tqdm.auto import tqdm

    if score not in SCORES:
        raise DistilError(f"score {score!r} should be one of {', '.join(SCORES)}")
    if data.dim() != 2 or data.shape[0] == 0:
        raise DistilError("layer scoring needs held-out token ids of shape [sequences, length]")
    model = model.eval()
    layers = [i for i, kind in enumerate(model.config.pattern) if kind == "A"]
    device = next(model.parameters()).device
    data = data.to(device)
    mixers = {}
    if score in ("local", "mil"):
        calib = calibrate(model, data, layers)
        mixers = {i: fresh_mil_mixer(model, i, mixer, calib[i], d_state=d_state, **hybrid_kwargs).eval() for i in layers}
        del calib
    error = {i: 0.0 for i in layers}
    norm = {i: 0.0 for i in layers}
    kl = {i: 0.0 for i in layers}
    batches = range(0, len(data), batch_size)
    bar = tqdm(total=len(batches) * len(layers), desc=f"scoring layers ({score})", disable=not progress, leave=False)
    for start in batches:
        tokens = data[start : start + batch_size]
        inputs, tables = _layer_inputs(model, tokens)
        reference = None
        for i in layers:
            block = model.layers[i]
            x = inputs[i]
            h = block.input_layernorm(x)
            if score == "local":
                # What each adds to the residual stream (after the norm that follows the mixer, in Gemma).
                attention = block.contribution(block.self_attn(h, *tables[i])[0])
                replaced = block.contribution(mixers[i](h)[0])
                # Per token: a few tokens carry residual norms 100x the rest ("massive activations"), and
                # a ratio of sums would rank layers by those tokens alone (rank correlation with the
                # end-to-end KL 0.39 on SmolLM2, against 0.91 per token; docs/benchmarks.md).
                relative = (attention - replaced).float().pow(2).sum(-1) / (x + attention).float().pow(2).sum(-1).clamp_min(1e-30)
                error[i] += relative.sum().item()
                norm[i] += relative.numel()
            else:
                if reference is None:
                    reference = model.head(model.norm(inputs[-1]))
                out = mixers[i](h)[0] if score == "mil" else torch.zeros_like(x)
                x = block.finish(x, out)
                changed = _logits_from(model, i + 1, x, tables)
                kl[i] += kd_loss(changed, reference, "forward_kl").item() * len(tokens)
            bar.update(1)
    bar.close()
    if score == "local":
        return {i: error[i] / norm[i] for i in layers}
    return {i: kl[i] / len(data) for i in layers}


def _layer_inputs(model, tokens):
    """Each layer's input (the residual stream) for ``tokens``, plus each layer's rotary (cos, sin); the
    last entry of the inputs is the final layer's output."""
    positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
    x = model.embed(tokens)
    tables = model.rope_tables(positions, x.dtype)
    inputs = []
    for layer, (cos, sin) in zip(model.layers, tables):
        inputs.append(x)
        x, _ = layer(x, cos, sin)
    inputs.append(x)
    return inputs, tables


def _logits_from(model, first_layer: int, x, tables):
    """Logits when the residual stream is ``x`` at the input of layer ``first_layer``."""
    for i in range(first_layer, len(model.layers)):
        x, _ = model.layers[i](x, *tables[i])
    return model.head(model.norm(x))


def select_layers(model, num_ssm: int, strategy="importance", data: torch.Tensor | None = None, *, score: str = "local",
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
