"""Turn attention layers into SSM layers, initialised from the attention weights they replace (MIL).

    hybrid = hybridize(teacher, ssm_layers=[3, 7], mixer="mamba2", init="mil", d_state=16)

MIL ("Mamba in the Llama", Wang et al. 2024) reads linear attention as an SSM: the query becomes
C, the key B and the value x, and the output projection stays the output projection. So

    W_Q -> C rows,  W_K -> B rows,  W_V -> x rows,  W_O -> out_proj

per head. With grouped-query attention the key/value heads are repeated to the query heads that
use them. Everything else (MLPs, norms, embeddings, the other layers) is copied unchanged, and the
new mixer's z, dt, A, D and conv are initialised as Mamba initialises them. ``init="random"``
initialises the whole mixer that way instead.

Layout of the SSM that MIL builds (one B/C group per attention head, as attention has one q/k per
head): ``n_groups = n_heads``, SSM ``head_dim`` = attention head_dim, and
``d_inner = expand * d_model`` with ``expand`` defaulting to ``n_heads * head_dim / d_model`` (1 for
standard Llama shapes). With a larger ``expand`` each group gets ``r`` SSM heads; the first of them
takes the attention head's value and output columns, the others start random with zero output
columns, so the layer still computes the MIL mapping at initialisation.

**d_state != head_dim.** B and C have ``d_state`` rows per head, W_K and W_Q ``head_dim``. With a
smaller state the first ``d_state`` rows of each head's W_K/W_Q are copied (a truncated q.k
product); with a larger one the extra C rows start random and the extra B rows at zero, so the
extra state dimensions add nothing until trained. Biases of q/k/v (Qwen2) are dropped: the SSM's
``in_proj`` has none.

``hybridize(model, [])`` returns an exact copy: the logits equal the teacher's.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from distil.errors import DistilError
from distil.models.transformer import Block, TransformerLM

MIXERS = {"mamba2": "M", "discrete_mamba2": "D"}


def ssm_settings(model: TransformerLM, mixer: str, *, d_state: int, expand: float | None, d_conv: int,
                 chunk_size: int) -> dict:
    """Keyword arguments of the SSM mixer that replaces an attention layer of ``model``."""
    cfg = model.config
    attn_inner = cfg.n_heads * cfg.head_dim
    d_inner = attn_inner if expand is None else int(expand * cfg.d_model)
    if d_inner % attn_inner:
        raise DistilError(f"expand = {expand} gives d_inner = {d_inner}, not a multiple of n_heads * head_dim = {attn_inner}")
    if mixer == "mamba2":
        # The gated norm takes the model's RMSNorm epsilon, as GraniteMoeHybrid (the export target) does.
        return dict(d_state=d_state, d_inner=d_inner, head_dim=cfg.head_dim, n_groups=cfg.n_heads, d_conv=d_conv,
                    chunk_size=chunk_size, norm_eps=cfg.rms_norm_eps)
    if mixer == "discrete_mamba2":
        n_v = d_inner // cfg.head_dim
        return dict(d_state=d_state, d_inner=d_inner, n_qk_heads=cfg.n_heads, n_v_heads=n_v, d_conv=d_conv,
                    chunk_size=chunk_size)
    raise DistilError(f"unknown mixer {mixer!r}; choose one of {', '.join(MIXERS)}")


def _head_rows(weight: torch.Tensor, head: int, head_dim: int, rows: int) -> torch.Tensor:
    """The first ``rows`` rows of one head's block of a [heads * head_dim, d] projection."""
    return weight[head * head_dim : head * head_dim + min(rows, head_dim)]


@torch.no_grad()
def mil_init(mixer: nn.Module, attention: nn.Module, cfg) -> None:
    """Copy W_Q, W_K, W_V, W_O of ``attention`` into ``mixer`` (Mamba2Mixer or DiscreteMamba2Mixer)."""
    from distil.models.ssm import DiscreteMamba2Mixer, Mamba2Mixer

    n_heads, n_kv, head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    kv_of = lambda h: h // (n_heads // n_kv)  # noqa: E731 - the KV head a query head uses
    W_q, W_k, W_v, W_o = (attention.q_proj.weight, attention.k_proj.weight, attention.v_proj.weight, attention.o_proj.weight)
    d_state = mixer.d_state
    ssm_head_dim = mixer.head_dim
    assert ssm_head_dim == head_dim
    ssm_heads = mixer.d_inner // head_dim
    ratio = ssm_heads // n_heads  # SSM heads per attention head
    in_w = mixer.in_proj.weight
    if isinstance(mixer, Mamba2Mixer):
        x_off, b_off = mixer.d_inner, 2 * mixer.d_inner  # [z | x | B | C | dt]
    elif isinstance(mixer, DiscreteMamba2Mixer):
        x_off, b_off = 0, mixer.d_inner  # [x | B | C | z | A~]
    else:  # pragma: no cover
        raise TypeError(type(mixer))
    c_off = b_off + n_heads * d_state
    mixer.out_proj.weight.zero_()
    for h in range(n_heads):
        ssm_head = h * ratio
        in_w[x_off + ssm_head * head_dim : x_off + (ssm_head + 1) * head_dim] = _head_rows(W_v, kv_of(h), head_dim, head_dim)
        mixer.out_proj.weight[:, ssm_head * head_dim : (ssm_head + 1) * head_dim] = W_o[:, h * head_dim : (h + 1) * head_dim]
        rows = min(d_state, head_dim)
        b_rows = slice(b_off + h * d_state, b_off + h * d_state + rows)
        c_rows = slice(c_off + h * d_state, c_off + h * d_state + rows)
        in_w[b_rows] = _head_rows(W_k, kv_of(h), head_dim, rows)
        in_w[c_rows] = _head_rows(W_q, h, head_dim, rows)
        if d_state > head_dim:  # extra state dimensions: no input until trained
            in_w[b_off + h * d_state + head_dim : b_off + (h + 1) * d_state] = 0.0
    # Extra SSM heads of a group (ratio > 1) keep their random x rows and the zero output columns
    # set above, so the layer computes the MIL mapping at initialisation.


def _fresh_mixer(kind: str, d_model: int, settings: dict, device, dtype) -> nn.Module:
    from distil.models.ssm import DiscreteMamba2Mixer, Mamba2Mixer

    mixer = (Mamba2Mixer if kind == "M" else DiscreteMamba2Mixer)(d_model, **settings)
    for module in mixer.modules():
        if isinstance(module, nn.Linear):  # as TransformerLM initialises its projections
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    return mixer.to(device=device, dtype=dtype)


def hybridize(model: TransformerLM, ssm_layers, mixer: str = "mamba2", init: str = "mil", *, d_state: int = 16,
              expand: float | None = None, d_conv: int = 4, chunk_size: int = 128, seed: int = 0,
              attention_from: TransformerLM | None = None) -> TransformerLM:
    """A copy of ``model`` whose layers ``ssm_layers`` use an SSM mixer instead of attention.

    Layers already SSM in ``model`` are kept as they are (trained SSM layers carry over). MIL reads
    the attention weights of ``attention_from`` (same shapes; default ``model`` itself), so that a
    progressive stage can take MIL from the original model while the rest comes from the last stage.
    """
    if init not in ("mil", "random"):
        raise DistilError(f"init {init!r} should be 'mil' or 'random'")
    if mixer not in MIXERS:
        raise DistilError(f"unknown mixer {mixer!r}; choose one of {', '.join(MIXERS)}")
    cfg = model.config
    source = attention_from if attention_from is not None else model
    shape = lambda c: (c.n_layers, c.d_model, c.n_heads, c.n_kv_heads, c.head_dim)  # noqa: E731
    if shape(source.config) != shape(cfg):
        raise DistilError(f"attention_from (layers, d_model, heads, kv heads, head_dim) = {shape(source.config)} "
                          f"differs from the model's {shape(cfg)}")
    ssm_layers = sorted(set(int(i) for i in ssm_layers))
    bad = [i for i in ssm_layers if not 0 <= i < cfg.n_layers]
    if bad:
        raise DistilError(f"layers {bad} are out of range for a {cfg.n_layers}-layer model")
    letter = MIXERS[mixer]
    settings = ssm_settings(model, mixer, d_state=d_state, expand=expand, d_conv=d_conv, chunk_size=chunk_size)
    existing = cfg.ssm.get(letter)
    if existing is not None and existing != settings and any(cfg.pattern[i] == letter for i in range(cfg.n_layers)):
        raise DistilError(f"the model's {mixer} layers use {existing}; new ones would use {settings}")
    new = copy.deepcopy(model)
    pattern = list(cfg.pattern)
    param = next(model.parameters())
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        for i in ssm_layers:
            if pattern[i] != "A":
                continue
            block: Block = new.layers[i]
            fresh = _fresh_mixer(letter, cfg.d_model, settings, param.device, param.dtype)
            if init == "mil":
                if source.config.pattern[i] != "A":
                    raise DistilError(f"layer {i} of attention_from is not an attention layer: no weights for MIL")
                mil_init(fresh, source.layers[i].self_attn if source is not model else block.self_attn, cfg)
            block.set_mixer(letter, fresh)
            pattern[i] = letter
    finally:
        torch.random.set_rng_state(generator_state)
    new.config = copy.deepcopy(cfg)
    new.config.pattern = "".join(pattern)
    new.config.ssm = {**cfg.ssm, letter: settings} if letter in pattern else dict(cfg.ssm)
    return new
