"""Stage 2 of a conversion: align each new mixer to the attention it replaces, before end-to-end KD.

    result = align_layers(hybrid, original, tokens, layers=[3, 7], steps=200, lr=1e-3, loss="nmse")
    result.history[3]      # that layer's alignment loss at every step

MOHAWK's stage 2 (hidden-state alignment), Zebra-Llama's intermediate-layer distillation and
LoLCATs' attention transfer all do this: each converted layer's new mixer (Mamba2 or discrete
Mamba2) learns to reproduce, from the same input, what the attention it replaced wrote into the
residual stream. It is cheap:

* the original model runs **once** over the alignment text (``record``): for every converted
  layer, the mixer's input (the block's normed hidden state) and the attention's output are kept
  (on CPU, fp32);
* each new mixer then trains **alone** on those pairs: no LM head, no other layer, no backward
  through the network. Layers are independent, so they train one after the other and only one
  layer's optimizer state is alive at a time;
* only the new mixers' parameters change: every other parameter stays bit-identical.

Losses (``loss``): ``mse``; ``nmse`` (the default: MSE divided by the target's mean square on the
recorded pairs, so layers of different scale count alike and 1.0 means "no better than zero");
``cosine`` (1 - cosine similarity per token).

Batches are drawn from the recorded windows by a generator seeded with (seed, layer, step), and
the state (``AlignState``: done layers, the current layer's step, its mixer and optimizer states,
the loss history) can be saved at any step: resuming it gives the same mixers as an uninterrupted
run, bit for bit.

Not implemented: MOHAWK's stage 1 (matrix orientation, matching the SSM's materialised mixing
matrix to the attention matrix). It needs each mixer's [L x L] mixing matrix per head, which the
chunked scan never forms; it would be a separate code path rather than an option of this one.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from distil.errors import DistilError

LOSSES = ("mse", "nmse", "cosine")


def _mixer(block) -> torch.nn.Module:
    return block.self_attn if block.kind == "A" else block.mamba


@torch.no_grad()
def record(original, layers: list[int], tokens: torch.Tensor, *, batch_size: int = 4) -> dict[int, tuple]:
    """One pass of ``original`` over ``tokens`` [n, seq]: for each layer in ``layers``, its mixer's
    input and output ([n, seq, d_model] each, CPU fp32)."""
    pairs: dict[int, tuple[list, list]] = {i: ([], []) for i in layers}
    hooks = []
    for i in layers:
        def hook(module, args, output, _i=i):
            pairs[_i][0].append(args[0].detach().float().cpu())
            pairs[_i][1].append(output[0].detach().float().cpu())

        hooks.append(_mixer(original.layers[i]).register_forward_hook(hook))
    try:
        was_training = original.training
        original.eval()
        device = next(original.parameters()).device
        for start in range(0, tokens.shape[0], batch_size):
            original(tokens[start : start + batch_size].to(device))
        original.train(was_training)
    finally:
        for h in hooks:
            h.remove()
    return {i: (torch.cat(ins), torch.cat(outs)) for i, (ins, outs) in pairs.items()}


def alignment_loss(prediction: torch.Tensor, target: torch.Tensor, kind: str, scale: float = 1.0) -> torch.Tensor:
    """``mse``; ``nmse`` (MSE / ``scale``, the target's mean square); ``cosine`` (1 - cos per token)."""
    prediction = prediction.float()
    if kind == "cosine":
        return (1 - torch.nn.functional.cosine_similarity(prediction, target, dim=-1, eps=1e-8)).mean()
    mse = (prediction - target).pow(2).mean()
    return mse / scale if kind == "nmse" else mse


@dataclass
class AlignState:
    """Where an alignment stands: layers finished, the current layer's step and states, the losses."""

    done: list[int] = field(default_factory=list)
    finished: dict[int, dict] = field(default_factory=dict)  # the done layers' aligned mixer weights
    layer: int | None = None
    step: int = 0
    mixer: dict | None = None
    optimizer: dict | None = None
    history: dict[int, list[float]] = field(default_factory=dict)

    def state_dict(self) -> dict:
        return {"done": list(self.done), "finished": {str(k): v for k, v in self.finished.items()},
                "layer": self.layer, "step": self.step, "mixer": self.mixer,
                "optimizer": self.optimizer, "history": {str(k): v for k, v in self.history.items()}}

    @classmethod
    def from_state_dict(cls, state: dict) -> AlignState:
        return cls(done=list(state["done"]), finished={int(k): v for k, v in state.get("finished", {}).items()},
                   layer=state["layer"], step=state["step"], mixer=state["mixer"],
                   optimizer=state["optimizer"], history={int(k): list(v) for k, v in state["history"].items()})


@dataclass
class AlignResult:
    history: dict[int, list[float]]  # per layer: the loss at each step

    def final(self) -> dict[int, float]:
        return {layer: losses[-1] for layer, losses in self.history.items() if losses}


def align_layers(hybrid, original, tokens: torch.Tensor, *, layers: list[int], steps: int, lr: float = 1e-3,
                 loss: str = "nmse", batch_size: int = 4, seed: int = 0, state: AlignState | None = None,
                 checkpoint_every: int = 0, on_checkpoint: Callable[[AlignState], None] | None = None,
                 progress: bool = True, pairs: dict | None = None) -> AlignResult:
    """Train ``hybrid``'s mixers at ``layers`` to reproduce ``original``'s mixer outputs there.

    ``tokens`` [n, seq] is the alignment text (``pairs`` from ``record`` may be passed instead of
    recomputing). With ``checkpoint_every`` N, ``on_checkpoint(state)`` is called every N steps and
    after each layer; passing that state back resumes exactly."""
    if loss not in LOSSES:
        raise DistilError(f"alignment loss {loss!r} is not one of {', '.join(LOSSES)}")
    if steps < 0 or lr <= 0 or batch_size < 1:
        raise DistilError("alignment needs steps >= 0, lr > 0 and batch_size >= 1")
    for i in layers:
        if hybrid.layers[i].kind == "A":
            raise DistilError(f"layer {i} of the hybrid is attention: only converted (SSM) layers are aligned")
    state = state or AlignState()
    pairs = pairs if pairs is not None else record(original, layers, tokens, batch_size=batch_size)
    device = next(hybrid.parameters()).device
    for layer, weights in state.finished.items():  # a resumed run: the layers aligned before the stop
        hybrid.layers[layer].mamba.load_state_dict(weights)
    todo = [i for i in layers if i not in state.done]
    bar = tqdm(total=len(todo) * steps, desc="align", disable=not progress, dynamic_ncols=True)
    for layer in todo:
        inputs, targets = pairs[layer]
        scale = float(targets.pow(2).mean().clamp_min(1e-12))
        mixer = hybrid.layers[layer].mamba
        optimizer = torch.optim.AdamW(mixer.parameters(), lr=lr, weight_decay=0.0)
        start = 0
        if state.layer == layer and state.mixer is not None:  # resuming inside this layer
            mixer.load_state_dict(state.mixer)
            optimizer.load_state_dict(state.optimizer)
            start = state.step
        history = state.history.setdefault(layer, [])
        del history[start:]
        bar.update(start)
        mixer.train()
        for step in range(start, steps):
            g = torch.Generator().manual_seed(seed * 1_000_003 + layer * 10_007 + step)
            index = torch.randint(0, inputs.shape[0], (batch_size,), generator=g)
            prediction, _ = mixer(inputs[index].to(device))
            value = alignment_loss(prediction, targets[index].to(device), loss, scale)
            optimizer.zero_grad(set_to_none=True)
            value.backward()
            optimizer.step()
            history.append(value.item())
            bar.update(1)
            bar.set_postfix(layer=layer, loss=f"{value.item():.4f}")
            if checkpoint_every and on_checkpoint and (step + 1) % checkpoint_every == 0 and step + 1 < steps:
                state.layer, state.step = layer, step + 1
                state.mixer = {k: v.detach().clone() for k, v in mixer.state_dict().items()}
                state.optimizer = copy.deepcopy(optimizer.state_dict())
                on_checkpoint(state)
        state.done.append(layer)
        state.finished[layer] = {k: v.detach().clone() for k, v in mixer.state_dict().items()}
        state.layer, state.step, state.mixer, state.optimizer = None, 0, None, None
        if on_checkpoint:
            on_checkpoint(state)
    bar.close()
    return AlignResult(history={i: state.history.get(i, []) for i in layers})
