"""Inference/streaming state of a TransformerLM: per layer, attention KV or an SSM state.

    states = empty_states(model, batch)             # nothing cached, every row fresh
    logits, states = model(chunk, positions=pos, states=states, return_states=True)
    states = carry(states, reset=row_starts_new_doc, kv_window=4096)   # detach, reset rows, trim KV

Used by ``stream`` packing (truncated backpropagation through time): each batch row walks through
one document chunk by chunk; state flows from chunk to chunk without gradients, and is zeroed for
a row the moment it starts a new document.
"""

from __future__ import annotations

import torch

from distil.models.ssm import SSMState
from distil.models.transformer import KVBuffer


def _per_layer(model, batch: int, device, attention_state) -> list:
    """One state per layer: ``attention_state(shape, device, dtype)`` for attention layers (shape
    [batch, kv_heads, length, head_dim] without the length), the SSM mixers' zero state otherwise."""
    device = device or next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    cfg = model.config
    return [attention_state((batch, cfg.n_kv_heads, cfg.head_dim), device, dtype) if layer.kind == "A"
            else layer.mamba.empty_state(batch, device=device, dtype=dtype) for layer in model.layers]


def empty_states(model, batch: int, device=None) -> list:
    """Per-layer states with nothing cached (KV of length 0 with a per-row valid count)."""

    def empty(shape, device, dtype):
        kv = torch.zeros(shape[0], shape[1], 0, shape[2], device=device, dtype=dtype)
        return kv, kv.clone(), torch.zeros(shape[0], dtype=torch.long, device=device)

    return _per_layer(model, batch, device, empty)


def preallocated_states(model, batch: int, max_len: int, device=None) -> list:
    """States for decoding up to ``max_len`` positions: each attention layer's KV cache is a
    :class:`~distil.models.transformer.KVBuffer` filled in place, SSM layers start from zero state.
    Outputs equal those with ``states=None``; generation uses this."""
    def buffers(shape, device, dtype):
        full = (shape[0], shape[1], max_len, shape[2])
        return KVBuffer(torch.empty(full, device=device, dtype=dtype), torch.empty(full, device=device, dtype=dtype), 0)

    return _per_layer(model, batch, device, buffers)


def carry(states: list, *, reset: torch.Tensor | None = None, kv_window: int | None = None) -> list:
    """Detach every state; zero the rows in ``reset`` [batch] (bool); keep at most ``kv_window`` keys."""
    out = []
    for state in states:
        if isinstance(state, SSMState):
            conv, ssm = state.conv.detach(), state.ssm.detach()
            if reset is not None:
                keep = (~reset).to(conv.dtype)
                conv = conv * keep[:, None, None]
                ssm = ssm * (~reset).to(ssm.dtype)[:, None, None, None]
            out.append(SSMState(conv, ssm))
        else:
            k, v, valid = state[0].detach(), state[1].detach(), state[2]
            if reset is not None:
                valid = torch.where(reset, torch.zeros_like(valid), valid)
            if kv_window is not None and k.shape[2] > kv_window:
                k, v = k[:, :, -kv_window:], v[:, :, -kv_window:]
            valid = valid.clamp_max(k.shape[2])
            # Keys no row can see any more need not be kept.
            longest = int(valid.max().item()) if valid.numel() else 0
            if longest < k.shape[2]:
                k, v = k[:, :, k.shape[2] - longest :], v[:, :, v.shape[2] - longest :]
            out.append((k, v, valid))
    return out
