"""A decoder in plain PyTorch for the Llama, Qwen, Mistral, Gemma 3, SmolLM3 and Phi-3 families, and its hybrid form.

    cfg = ModelConfig(vocab_size=4096, d_model=256, n_layers=4, n_heads=4)
    model = TransformerLM(cfg)
    logits = model(input_ids)                      # [batch, seq, vocab]
    hidden = model(input_ids, return_hidden=True)  # [batch, seq, d_model], before the LM head

RMSNorm, rotary position embeddings (rotate-half convention, as transformers' Llama), a SwiGLU MLP,
grouped-query attention through ``scaled_dot_product_attention``, optional QKV bias (Qwen2), optional
per-head q/k RMSNorm (Qwen3) and tied or untied embeddings. Parameter names follow transformers' Llama (``embed_tokens``,
``layers.N.self_attn.q_proj`` ...) so checkpoints map over without renaming.

The config's switches cover the other families' differences (each family's mapping from a transformers
config is one description in :mod:`distil.models.families`): Gemma 3's (1 + w) RMSNorm
(``norm_plus_one``), norms before and after both the mixer and the MLP (``sandwich_norms``, transformers'
names ``post_attention_layernorm`` / ``pre_feedforward_layernorm`` / ``post_feedforward_layernorm``), GeGLU
(``mlp_activation="gelu_tanh"``), the √d embedding scale, a query scale other than head_dim^-0.5,
tanh soft-capping of the logits, sliding-window layers given per layer (``layer_types``) with their
own rope base (``rope_local_theta``), and SmolLM3's layers without rope (``nope_layers``).

Each layer's mixer is given by ``ModelConfig.pattern``: ``A`` attention, ``M`` Mamba2, ``D``
discrete Mamba2 (see :mod:`distil.models.ssm`). Norms, MLPs, embeddings and residuals are shared.

Inference state (``states``) is one entry per layer: ``(k, v)`` for attention layers, an
:class:`~distil.models.ssm.SSMState` for SSM layers. Passing it in and asking for it back lets
a sequence run in pieces (generation, or streamed training chunks).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from distil.errors import DistilError
from distil.kernels import decode_attention_backends
from distil.models import ssm

MIXER_KINDS = {"A": "attention", "M": "mamba2", "D": "discrete_mamba2"}
ROPE_TYPES = ("default", "linear", "llama3")
ACTIVATIONS = {"silu": F.silu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh")}


@dataclass
class ModelConfig:
    vocab_size: int
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None
    head_dim: int | None = None
    intermediate_size: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # None or {"rope_type": "llama3", ...} as in transformers
    max_seq_len: int = 2048
    tie_embeddings: bool = True
    qkv_bias: bool = False
    qk_norm: bool = False  # RMSNorm over each head's query and key before rope (Qwen3)
    sliding_window: int | None = None
    # Per layer "full" or "sliding" (Gemma 3's 5 local : 1 global); None: every layer slides when
    # sliding_window is set (Mistral).
    layer_types: list[str] | None = None
    rope_local_theta: float | None = None  # rope base of the sliding layers (Gemma 3); None: rope_theta
    nope_layers: list[int] | None = None  # layers whose attention has no rotary embedding (SmolLM3)
    norm_plus_one: bool = False  # RMSNorm scales by (1 + w), weights start at 0 (Gemma)
    sandwich_norms: bool = False  # norms after the mixer and around the MLP too (Gemma 2/3)
    mlp_activation: str = "silu"  # silu (SwiGLU) or gelu_tanh (GeGLU, Gemma)
    scale_embeddings: bool = False  # embeddings times sqrt(d_model) (Gemma)
    query_scale: float | None = None  # attention score scale; None: head_dim ** -0.5
    logit_softcap: float | None = None  # tanh soft-capping of the final logits (Gemma 2)
    family: str | None = None  # the transformers family it came from or exports to; None: inferred
    # Hybrid students: one letter per layer, A = attention, M = Mamba2, D = discrete Mamba2.
    pattern: str | None = None
    # Keyword arguments of the SSM mixers by pattern letter: {"M": {"d_state": 16, ...}, "D": {...}}.
    ssm: dict = field(default_factory=dict)
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None:
            if self.d_model % self.n_heads:
                raise DistilError(f"d_model = {self.d_model} is not divisible by n_heads = {self.n_heads}")
            self.head_dim = self.d_model // self.n_heads
        if self.intermediate_size is None:
            self.intermediate_size = 64 * math.ceil(8 * self.d_model / 3 / 64)
        if self.n_heads % self.n_kv_heads:
            raise DistilError(f"n_heads = {self.n_heads} is not a multiple of n_kv_heads = {self.n_kv_heads}")
        if self.pattern is None:
            self.pattern = "A" * self.n_layers
        if len(self.pattern) != self.n_layers or set(self.pattern) - set(MIXER_KINDS):
            raise DistilError(
                f"pattern {self.pattern!r} should have one letter per layer ({self.n_layers}) from "
                f"{', '.join(f'{k}={v}' for k, v in MIXER_KINDS.items())}"
            )
        if self.rope_scaling is not None and self.rope_scaling.get("rope_type", "default") not in ROPE_TYPES:
            raise DistilError(
                f"rope scaling {self.rope_scaling.get('rope_type')!r} is not supported (supported: {', '.join(ROPE_TYPES)})"
            )
        if self.mlp_activation not in ACTIVATIONS:
            raise DistilError(f"mlp_activation {self.mlp_activation!r} is not supported (supported: {', '.join(ACTIVATIONS)})")
        if self.nope_layers is not None:
            self.nope_layers = sorted(int(i) for i in self.nope_layers)
            if any(not 0 <= i < self.n_layers for i in self.nope_layers):
                raise DistilError(f"nope_layers {self.nope_layers} should be layer indices below {self.n_layers}")
        if self.layer_types is not None:
            self.layer_types = list(self.layer_types)
            if len(self.layer_types) != self.n_layers or set(self.layer_types) - {"full", "sliding"}:
                raise DistilError(f"layer_types should give 'full' or 'sliding' for each of the {self.n_layers} layers")
            if "sliding" in self.layer_types and self.sliding_window is None:
                raise DistilError("layer_types has sliding layers but sliding_window is not set")

    def window(self, layer: int) -> int | None:
        """The attention window of ``layer`` (None: it sees every earlier token)."""
        if self.layer_types is None or self.layer_types[layer] == "sliding":
            return self.sliding_window
        return None

    def rope_kind(self, layer: int) -> str:
        """"none" for a layer without rope, "local" for a sliding layer with its own rope base, else "global"."""
        if self.nope_layers and layer in self.nope_layers:
            return "none"
        if self.rope_local_theta is not None and self.window(layer) is not None:
            return "local"
        return "global"

    @property
    def is_hybrid(self) -> bool:
        return set(self.pattern) != {"A"}


class RMSNorm(nn.Module):
    """Llama's RMSNorm, or with ``plus_one`` Gemma's, which scales by (1 + w) with w starting at 0."""

    def __init__(self, dim: int, eps: float = 1e-6, plus_one: bool = False):
        super().__init__()
        self.eps, self.plus_one = eps, plus_one
        self.weight = nn.Parameter(torch.zeros(dim) if plus_one else torch.ones(dim))

    def scale(self) -> torch.Tensor:
        """The per-channel factor applied after normalising: w, or 1 + w."""
        return 1.0 + self.weight if self.plus_one else self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.plus_one:  # Gemma: scale in fp32, then cast
            return (x32 * (1.0 + self.weight.float())).to(dtype)
        # Llama: cast back before the weight, as transformers' LlamaRMSNorm does.
        return self.weight * x32.to(dtype)


def rope_inv_freq(cfg: ModelConfig, kind: str = "global") -> torch.Tensor:
    """Rotary frequencies of the global layers, or with ``kind="local"`` of the sliding layers of a model
    with its own local base (Gemma 3: default rope at ``rope_local_theta``, no scaling)."""
    dim = cfg.head_dim
    theta = cfg.rope_local_theta if kind == "local" else cfg.rope_theta
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = (cfg.rope_scaling or {}) if kind == "global" else {}
    if scaling.get("rope_type") == "linear":
        inv_freq = inv_freq / scaling["factor"]
    if scaling.get("rope_type") == "llama3":
        # Llama 3.1 frequency-dependent scaling (transformers' _compute_llama3_parameters).
        factor = scaling["factor"]
        low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
        old_len = scaling["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype):
    """cos/sin tables [batch, seq, head_dim] for integer positions [batch, seq], computed in fp32."""
    freqs = positions[..., None].float() * inv_freq.float()  # [batch, seq, head_dim / 2]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [batch, heads, seq, head_dim]; cos/sin: [batch, seq, head_dim]."""
    cos, sin = cos[:, None], sin[:, None]
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos + rotated * sin


class KVBuffer(tuple):
    """An attention layer's (k, v) cache as views of the first ``length`` positions of preallocated buffers.

    Decoding appends each new key in place instead of concatenating (a fresh allocation of the whole
    cache per token and layer). One buffer serves one line of decoding: continuing two branches from
    the same KVBuffer would write into the same slots. Made by :func:`distil.models.state.preallocated_states`.
    """

    def __new__(cls, k_buffer: torch.Tensor, v_buffer: torch.Tensor, length: int):
        self = super().__new__(cls, (k_buffer[:, :, :length], v_buffer[:, :, :length]))
        self.buffers, self.length = (k_buffer, v_buffer), length
        return self

    def append(self, k: torch.Tensor, v: torch.Tensor) -> KVBuffer | tuple:
        end = self.length + k.shape[2]
        k_buffer, v_buffer = self.buffers
        if end > k_buffer.shape[2]:  # past the preallocated length: fall back to concatenation
            return torch.cat([self[0], k], dim=2), torch.cat([self[1], v], dim=2)
        k_buffer[:, :, self.length:end] = k
        v_buffer[:, :, self.length:end] = v
        return KVBuffer(k_buffer, v_buffer, end)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int = 0):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.sliding_window = cfg.window(layer)
        self.scale = cfg.query_scale
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)
        if cfg.qk_norm:  # Qwen3, Gemma 3: one RMSNorm over head_dim, shared by the heads, on q and on k
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, cfg.norm_plus_one)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, cfg.norm_plus_one)

    def forward(self, x, cos, sin, *, doc_ids=None, state=None):
        """``state`` is (k, v) or (k, v, valid) where valid [batch] counts the cached keys each row may
        still see (streamed rows that started a new document see none of the previous one's)."""
        batch, seq, _ = x.shape
        q = self.q_proj(x).view(batch, seq, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(batch, seq, self.n_kv_heads, self.head_dim)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = self.v_proj(x).view(batch, seq, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if cos is not None:  # None: a layer without rope (SmolLM3)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        past, valid = 0, None
        if state is not None:
            past = state[0].shape[2]
            valid = state[2] if len(state) > 2 else None
            if isinstance(state, KVBuffer):
                new_state = state.append(k, v)
                k, v = new_state[0], new_state[1]
            else:
                k, v = torch.cat([state[0], k], dim=2), torch.cat([state[1], v], dim=2)
                new_state = (k, v) if valid is None else (k, v, valid + seq)
        else:
            new_state = (k, v)
        mask = None
        # One new token after the cache sees every cached key: no mask needed unless a window or a
        # per-row valid count hides some.
        if (past and (seq > 1 or valid is not None)) or doc_ids is not None or self.sliding_window is not None:
            mask = attention_mask(seq, past, x.device, doc_ids=doc_ids, window=self.sliding_window)
            if valid is not None:  # [batch, 1, 1, past + seq]: hide keys from a row's previous document
                key_ok = torch.arange(past + seq, device=x.device)[None, :] >= (past - valid)[:, None]
                mask = mask & key_ok[:, None, None, :]
        if self.n_kv_heads != self.n_heads:
            repeat = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        if mask is None and past:
            with decode_attention_backends(q):
                out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        elif mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=seq > 1, scale=self.scale)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        out = out.transpose(1, 2).reshape(batch, seq, self.n_heads * self.head_dim)
        return self.o_proj(out), new_state


def attention_mask(seq: int, past: int, device, *, doc_ids=None, window=None) -> torch.Tensor:
    """Boolean mask [batch or 1, 1, seq, past + seq]; True where a query may attend to a key.

    ``doc_ids`` [batch, seq] keeps attention inside each packed document (no past allowed then).
    """
    q_pos = torch.arange(past, past + seq, device=device)[:, None]
    k_pos = torch.arange(past + seq, device=device)[None, :]
    mask = k_pos <= q_pos
    if window is not None:
        mask = mask & (k_pos > q_pos - window)
    mask = mask[None, None]
    if doc_ids is not None:
        if past:
            raise ValueError("doc_ids cannot be combined with a KV cache")
        same_doc = doc_ids[:, None, :, None] == doc_ids[:, None, None, :]
        mask = mask & same_doc
    return mask


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.d_model, bias=False)
        self.act = ACTIVATIONS[cfg.mlp_activation]

    def forward(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


def make_mixer(kind: str, cfg: ModelConfig, layer: int = 0) -> nn.Module:
    if kind == "A":
        return Attention(cfg, layer)
    if kind == "M":
        return ssm.Mamba2Mixer(cfg.d_model, **cfg.ssm.get("M", {}))
    return ssm.DiscreteMamba2Mixer(cfg.d_model, **cfg.ssm.get("D", {}))


class Block(nn.Module):
    """One layer: x + mixer(norm(x)), then x + mlp(norm(x)). With ``sandwich_norms`` (Gemma) the mixer's
    and the MLP's outputs are normed too before they join the residual stream; transformers' names then
    mean: ``post_attention_layernorm`` after the mixer, ``pre_feedforward_layernorm`` /
    ``post_feedforward_layernorm`` around the MLP (without sandwich norms ``post_attention_layernorm``
    is the norm before the MLP, as in Llama)."""

    def __init__(self, cfg: ModelConfig, kind: str, layer: int = 0):
        super().__init__()
        self.kind, self.layer = kind, layer
        self.rope_kind = cfg.rope_kind(layer)
        norm = lambda: RMSNorm(cfg.d_model, cfg.rms_norm_eps, cfg.norm_plus_one)  # noqa: E731
        self.input_layernorm = norm()
        # Attention keeps transformers' name `self_attn`; SSM mixers are `mamba` as in hybrid models there.
        if kind == "A":
            self.self_attn = make_mixer(kind, cfg, layer)
        else:
            self.mamba = make_mixer(kind, cfg, layer)
        self.post_attention_layernorm = norm()
        if cfg.sandwich_norms:
            self.pre_feedforward_layernorm = norm()
        self.mlp = MLP(cfg)
        if cfg.sandwich_norms:
            self.post_feedforward_layernorm = norm()

    def set_mixer(self, kind: str, mixer: nn.Module) -> None:
        """Swap in another mixer, keeping the module (so parameter) order of a block built as ``kind``:
        optimizer states and checkpoints of a converted model then line up with the same model
        loaded from disk."""
        modules = {name: module for name, module in self._modules.items() if name not in ("self_attn", "mamba")}
        norm = modules.pop("input_layernorm")
        self._modules.clear()
        self._modules.update({"input_layernorm": norm, "self_attn" if kind == "A" else "mamba": mixer, **modules})
        self.kind = kind

    def forward(self, x, cos, sin, *, doc_ids=None, state=None):
        h = self.input_layernorm(x)
        if self.kind == "A":
            h, new_state = self.self_attn(h, cos, sin, doc_ids=doc_ids, state=state)
        else:
            h, new_state = self.mamba(h, state=state)
        return self.finish(x, h), new_state

    def contribution(self, mixed: torch.Tensor) -> torch.Tensor:
        """What the mixer's output ``mixed`` adds to the residual stream: itself, or normed (sandwich norms)."""
        return self.post_attention_layernorm(mixed) if hasattr(self, "pre_feedforward_layernorm") else mixed

    def finish(self, x: torch.Tensor, mixed: torch.Tensor) -> torch.Tensor:
        """The rest of the layer once its mixer has given ``mixed`` for the residual stream ``x``."""
        x = x + self.contribution(mixed)
        if hasattr(self, "pre_feedforward_layernorm"):
            return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        return x + self.mlp(self.post_attention_layernorm(x))


class TransformerLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg, kind, i) for i, kind in enumerate(cfg.pattern))
        self.norm = RMSNorm(cfg.d_model, cfg.rms_norm_eps, cfg.norm_plus_one)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.set_rope_buffers()
        self.apply(self._init_weights)
        # GPT-2 style: residual projections start smaller so the residual stream stays O(1) with depth.
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layers))

    def set_rope_buffers(self, device=None) -> None:
        """(Re)compute the rotary frequency buffers (not saved; a model built on the meta device needs them)."""
        self.register_buffer("inv_freq", rope_inv_freq(self.config).to(device), persistent=False)
        if any(layer.rope_kind == "local" for layer in self.layers):
            self.register_buffer("inv_freq_local", rope_inv_freq(self.config, "local").to(device), persistent=False)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings, times sqrt(d_model) in the weight's dtype when the config scales them (Gemma)."""
        x = self.embed_tokens(input_ids)
        if self.config.scale_embeddings:
            x = x * torch.tensor(self.config.d_model**0.5, dtype=x.dtype)
        return x

    def rope_tables(self, positions: torch.Tensor, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each layer's rotary (cos, sin) for ``positions`` [batch, seq]; layers of one kind share theirs."""
        tables = {"global": rope_cos_sin(self.inv_freq, positions, dtype), "none": (None, None)}
        if hasattr(self, "inv_freq_local"):
            tables["local"] = rope_cos_sin(self.inv_freq_local, positions, dtype)
        return [tables[layer.rope_kind] for layer in self.layers]

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Logits from the final hidden states (after the final norm), soft-capped when the config asks."""
        logits = self.lm_head(x)
        if self.config.logit_softcap is not None:
            cap = self.config.logit_softcap
            logits = cap * torch.tanh(logits / cap)
        return logits

    @staticmethod
    def _init_weights(module):
        if isinstance(module, nn.Linear) and not getattr(module, "_distil_custom_init", False):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if hasattr(module, "reset_ssm_parameters"):
            module.reset_ssm_parameters()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        positions: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        states: list | None = None,
        return_states: bool = False,
        return_hidden: bool = False,
    ):
        """Logits [batch, seq, vocab] (or hidden states before the head when ``return_hidden``).

        With ``return_states`` returns ``(output, states)``; feed ``states`` back to continue the
        sequence. ``positions`` default to continuing after the cached length.
        """
        batch, seq = input_ids.shape
        if positions is None:
            start = 0
            if states is not None:  # continue after the cached keys (SSM layers need no positions)
                start = next((s[0].shape[2] for s in states if isinstance(s, tuple)), 0)
            positions = torch.arange(start, start + seq, device=input_ids.device).expand(batch, seq)
        x = self.embed(input_ids)
        tables = self.rope_tables(positions, x.dtype)
        new_states = []
        for i, layer in enumerate(self.layers):
            cos, sin = tables[i]
            x, layer_state = layer(x, cos, sin, doc_ids=doc_ids, state=None if states is None else states[i])
            new_states.append(layer_state)
        x = self.norm(x)
        out = x if return_hidden else self.head(x)
        return (out, new_states) if return_states else out


def config_dict(cfg: ModelConfig) -> dict:
    # Unset fields are left out: transformers' AutoTokenizer reads this file too and warns about a
    # `rope_scaling` key even when it is null. Loading fills the defaults back in.
    return {k: v for k, v in asdict(cfg).items() if v is not None}


def config_from_json(path: Path) -> ModelConfig:
    data = json.loads(path.read_text())
    data.pop("format", None)
    return ModelConfig(**data)
