"""Turn attention layers into SSM layers, initialised from the attention weights they replace (MIL).

    hybrid = hybridize(teacher, ssm_layers=[3, 7], mixer="mamba2", init="mil", d_state=16, calibration=token_ids)

MIL ("Mamba in the Llama", Wang et al. 2024) reads linear attention as an SSM: the query becomes
C, the key B and the value x, and the output projection stays the output projection. So

    W_Q -> C rows,  W_K -> B rows,  W_V -> x rows,  W_O -> out_proj

per head. With grouped-query attention the key/value heads are repeated to the query heads that
use them. Everything else (MLPs, norms, embeddings, the other layers) is copied unchanged.

``init="mil"`` is **calibrated MIL**. The copy alone (``init="mil_plain"``: z, dt, A, D and the conv
as Mamba initialises them) is far worse than random init on a real model (SmolLM2-135M, one layer:
KL 3.3 against 0.14 for random at layer 3). The gated RMSNorm after the scan, with weight 1,
scales each head to RMS 1 where the attention heads it replaces have RMS 0.1-0.65, and the random
gate and conv scramble the signal first. So after the copy, one pass over a little calibration text
(:func:`calibrate`: each layer's input h, its unit mean direction u and the median p50 of h.u, and
each attention head's output RMS) sets:

* Mamba2: z rows = (5 / p50) u, so the gate silu(z) is ~5 on a typical token (open, near constant);
  dt rows 0 and dt_bias = ln(e - 1), so dt = 1; A_log = ln(-ln 0.8), a decay of 0.8 per token; D = 0
  (attention has no skip from a token's own value); the conv passes each token through (last tap
  0.1 on x channels, so silu stays near its linear part, and 1 on B and C; bias 0); and the gated
  norm's weight per head = the attention head's RMS / that head's RMS after the norm, measured on
  the calibration text, so out_proj (W_O) reads a signal of the scale it was trained on.
* discrete Mamba2 (no norm): z rows 0 and z_bias = 1.278, so the gate is exactly 1; A~ rows =
  (ln 0.25 / p50) u, a decay of ~0.8; D = 0; the conv is the identity (last tap 1, bias 0); only the
  first 16 state dimensions start with q.k (see ``DISCRETE_QK_DIMS``); and each head's x rows are
  scaled so its output RMS on the calibration text equals the attention head's.

Measured on SmolLM2-135M (docs/models.md): calibrated MIL starts closer to the teacher than random
init and than deleting the layer at layers 3, 15 and 27, for both mixers at state 16 and 64, and
stays ahead after training the layer. ``init="random"`` initialises the whole mixer as Mamba does.

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

**Size.** That layout is larger than the attention it replaces when the model uses grouped-query
attention: x is ``n_heads * head_dim`` wide where V is ``n_kv_heads * head_dim``, and the gate z
and the step sizes dt have no attention counterpart (SmolLM2-135M: 1.17M parameters per mixer
against 0.88M). ``width="kv"`` builds the size-matched layout instead: one SSM head and one B/C
group per KV head (``d_inner = n_kv_heads * head_dim``), x from that head's W_V, B from its W_K,
C from the mean of the W_Q of the query heads that share it, and its output columns the sum of
their W_O columns (each query head's output approximated by the group's one SSM head); SmolLM2:
0.39M per mixer. :func:`size_difference` accounts for the difference either way.

**q/k norms (Qwen3, Gemma 3).** Attention there normalises each head's q and k (RMSNorm over head_dim,
weight w, or 1 + w in Gemma) before rope. A linear SSM input cannot express the per-token 1/RMS, so
MIL drops it; the norm's per-channel weights can be folded into the copied W_Q and W_K rows (C and B)
or left out. Neither wins everywhere on Gemma 3 270M (KL at conversion, one layer, docs/models.md):
folded is far better at layers 8 and 11 (0.194 / 0.738 against 0.494 / 2.214) and far worse at the
global layer 5 (12.5 against 1.80). So calibrated MIL builds both and keeps the one whose output is
closer to what attention added to the residual stream on the calibration text (:func:`replacement_error`,
the local layer score); that choice picked the variant with the lower KL at all six layers measured.
``init="mil_plain"`` (no calibration) folds the weights.

``hybridize(model, [])`` returns an exact copy: the logits equal the teacher's.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass

import torch
from torch import nn

from distil.errors import DistilError
from distil.models.ssm import DiscreteMamba2Mixer, Mamba2Mixer
from distil.models.transformer import Block, TransformerLM

log = logging.getLogger(__name__)

MIXERS = {"mamba2": "M", "discrete_mamba2": "D"}
WIDTHS = ("heads", "kv")  # SSM heads per attention head, or per KV head (the size-matched layout)


def ssm_settings(model: TransformerLM, mixer: str, *, d_state: int, expand: float | None, d_conv: int,
                 chunk_size: int, width: str = "heads") -> dict:
    """Keyword arguments of the SSM mixer that replaces an attention layer of ``model``."""
    cfg = model.config
    if width not in WIDTHS:
        raise DistilError(f"width {width!r} should be one of {', '.join(WIDTHS)}")
    if width == "kv":
        if expand is not None:
            raise DistilError("width 'kv' fixes d_inner = n_kv_heads * head_dim; leave expand unset")
        if mixer != "mamba2":
            raise DistilError("width 'kv' (the size-matched layout) is built for mamba2 only")
        return dict(d_state=d_state, d_inner=cfg.n_kv_heads * cfg.head_dim, head_dim=cfg.head_dim,
                    n_groups=cfg.n_kv_heads, d_conv=d_conv, chunk_size=chunk_size, norm_eps=cfg.rms_norm_eps)
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
def mil_init(mixer: nn.Module, attention: nn.Module, cfg, calib: LayerCalibration | None = None) -> None:
    """Copy W_Q, W_K, W_V, W_O of ``attention`` into ``mixer`` (Mamba2Mixer or DiscreteMamba2Mixer);
    with ``calib``, then set gate, decay, skip, conv and output scale from it (calibrated MIL).

    For q/k-normed attention (Qwen3, Gemma 3) calibrated MIL builds the mixer twice, with the norms'
    weights folded into C and B and without, and keeps the one whose output is closer to what attention
    added to the residual stream on the calibration text (the module docstring's **q/k norms**)."""
    if calib is None or not hasattr(attention, "q_norm") or calib.contribution is None:
        _mil_copy(mixer, attention, cfg, calib, fold_qk_norm=True)
        return
    start = {k: v.clone() for k, v in mixer.state_dict().items()}
    built, errors = {}, {}
    for fold in (True, False):
        mixer.load_state_dict(start)
        _mil_copy(mixer, attention, cfg, calib, fold_qk_norm=fold)
        errors[fold] = replacement_error(mixer, calib)
        built[fold] = {k: v.clone() for k, v in mixer.state_dict().items()}
    fold = min(errors, key=errors.get)
    mixer.load_state_dict(built[fold])
    mixer.qk_norm_weights = "folded" if fold else "dropped"
    log.info("MIL with q/k norms: weights %s (replacement error %.4f folded, %.4f dropped)", mixer.qk_norm_weights,
             errors[True], errors[False])


@torch.no_grad()
def replacement_error(mixer: nn.Module, calib: LayerCalibration, batch_size: int = 8) -> float:
    """Mean over the calibration tokens of |what attention added - what the mixer adds|^2 / |x + what
    attention added|^2 (x the residual stream; "adds" after the norm that follows the mixer, in Gemma)."""
    total, count = 0.0, 0
    for start in range(0, len(calib.inputs), batch_size):
        h = calib.inputs[start : start + batch_size].to(mixer.in_proj.weight)
        out = mixer(h)[0]
        if calib.post_norm is not None:
            out = calib.post_norm(out)
        target = calib.contribution[start : start + batch_size].to(out)
        residual = calib.residual[start : start + batch_size].to(out)
        error = (target - out).float().pow(2).sum(-1) / (residual + target).float().pow(2).sum(-1).clamp_min(1e-30)
        total += error.sum().item()
        count += error.numel()
    return total / max(count, 1)


@torch.no_grad()
def _mil_copy(mixer: nn.Module, attention: nn.Module, cfg, calib: LayerCalibration | None, *, fold_qk_norm: bool) -> None:
    n_heads, n_kv, head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    kv_of = lambda h: h // (n_heads // n_kv)  # noqa: E731 - the KV head a query head uses
    W_q, W_k, W_v, W_o = (attention.q_proj.weight, attention.k_proj.weight, attention.v_proj.weight, attention.o_proj.weight)
    if hasattr(attention, "q_norm") and fold_qk_norm:  # fold the q/k norm weights into the rows (module docstring)
        W_q = (W_q.view(n_heads, head_dim, -1) * attention.q_norm.scale()[None, :, None]).reshape(W_q.shape)
        W_k = (W_k.view(n_kv, head_dim, -1) * attention.k_norm.scale()[None, :, None]).reshape(W_k.shape)
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
    if ssm_heads < n_heads:  # width "kv": one SSM head (and B/C group) per KV head
        _mil_per_kv_head(mixer, W_q, W_k, W_v, W_o, n_heads, n_kv, head_dim)
        if calib is not None:
            _calibrate_mamba2(mixer, calib, n_heads, head_dim)
        return
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
    if calib is not None:
        (_calibrate_mamba2 if isinstance(mixer, Mamba2Mixer) else _calibrate_discrete)(mixer, calib, n_heads, head_dim)


@torch.no_grad()
def _mil_per_kv_head(mixer, W_q, W_k, W_v, W_o, n_heads: int, n_kv: int, head_dim: int) -> None:
    """The size-matched MIL layout (Mamba2, ``n_groups = n_kv`` heads): KV head g gives x (W_V) and
    B (W_K); C is the mean of the W_Q of its query heads; the output columns are the sum of theirs."""
    if mixer.n_heads != n_kv or mixer.n_groups != n_kv:
        raise DistilError(f"the size-matched layout needs {n_kv} SSM heads and groups, got {mixer.n_heads} and "
                          f"{mixer.n_groups}")
    per, d_state, in_w = n_heads // n_kv, mixer.d_state, mixer.in_proj.weight
    x_off, b_off = mixer.d_inner, 2 * mixer.d_inner
    c_off = b_off + n_kv * d_state
    rows = min(d_state, head_dim)
    for g in range(n_kv):
        heads = range(g * per, (g + 1) * per)
        in_w[x_off + g * head_dim : x_off + (g + 1) * head_dim] = _head_rows(W_v, g, head_dim, head_dim)
        in_w[b_off + g * d_state : b_off + g * d_state + rows] = _head_rows(W_k, g, head_dim, rows)
        in_w[c_off + g * d_state : c_off + g * d_state + rows] = torch.stack(
            [_head_rows(W_q, h, head_dim, rows) for h in heads]).mean(0)
        if d_state > head_dim:
            in_w[b_off + g * d_state + head_dim : b_off + (g + 1) * d_state] = 0.0
        mixer.out_proj.weight[:, g * head_dim : (g + 1) * head_dim] = sum(
            W_o[:, h * head_dim : (h + 1) * head_dim] for h in heads)


# ---------------------------------------------------------------------------------------------
# Calibration: statistics of each converted layer on a little real text


@dataclass
class LayerCalibration:
    """What one attention layer sees and produces on calibration text (see the module docstring)."""

    inputs: torch.Tensor  # [n, seq, d_model] the mixer's input, input_layernorm(x)
    head_rms: torch.Tensor  # [n_heads] mean per-token RMS of each attention head's output, before o_proj
    direction: torch.Tensor  # [d_model] unit mean direction of the inputs
    median_projection: float  # median over tokens of inputs . direction
    residual: torch.Tensor | None = None  # [n, seq, d_model] the residual stream x entering the layer
    contribution: torch.Tensor | None = None  # [n, seq, d_model] what attention added to it
    post_norm: nn.Module | None = None  # the norm after the mixer (Gemma's sandwich norms), else None


@torch.no_grad()
def calibrate(model: TransformerLM, tokens: torch.Tensor, layers, *, batch_size: int = 8) -> dict[int, LayerCalibration]:
    """One pass of ``model`` over ``tokens`` [n, seq]: the statistics MIL needs for ``layers``."""
    if tokens.dim() != 2 or tokens.shape[0] == 0 or tokens.shape[1] < 2:
        raise DistilError("MIL calibration needs token ids of shape [sequences, length >= 2]")
    layers = [i for i in sorted(set(layers)) if model.config.pattern[i] == "A"]
    inputs = {i: [] for i in layers}
    heads = {i: [] for i in layers}
    residual = {i: [] for i in layers}
    added = {i: [] for i in layers}
    cfg = model.config
    hooks = []
    for i in layers:
        block = model.layers[i]
        hooks.append(block.input_layernorm.register_forward_hook(lambda m, a, out, i=i: inputs[i].append(out.float())))
        hooks.append(block.self_attn.o_proj.register_forward_pre_hook(
            lambda m, a, i=i: heads[i].append(a[0].float().unflatten(-1, (cfg.n_heads, cfg.head_dim)))))
        if cfg.qk_norm:  # what choosing between the q/k-norm variants compares against (mil_init)
            hooks.append(block.register_forward_pre_hook(lambda m, a, i=i: residual[i].append(a[0].float())))
            hooks.append(block.self_attn.register_forward_hook(
                lambda m, a, out, i=i, b=block: added[i].append(b.contribution(out[0]).float())))
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(tokens), batch_size):
            model(tokens[start : start + batch_size].to(next(model.parameters()).device), return_hidden=True)
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    out = {}
    for i in layers:
        h = torch.cat(inputs[i])  # [n, seq, d_model]
        head_out = torch.cat(heads[i])  # [n, seq, heads, head_dim]
        mean = h.reshape(-1, h.shape[-1]).mean(0)
        direction = mean / mean.norm().clamp_min(1e-12)
        projection = (h.reshape(-1, h.shape[-1]) @ direction).median().item()
        out[i] = LayerCalibration(h, head_out.pow(2).mean(-1).sqrt().reshape(-1, cfg.n_heads).mean(0),
                                  direction, projection)
        if cfg.qk_norm:
            block = model.layers[i]
            out[i].residual, out[i].contribution = torch.cat(residual[i]), torch.cat(added[i])
            out[i].post_norm = block.post_attention_layernorm if hasattr(block, "pre_feedforward_layernorm") else None
    return out


# Calibrated MIL constants (measured on SmolLM2-135M, docs/models.md "MIL initialisation").
GATE_OPEN = 5.0  # Mamba2: z . h ~ 5 on a typical token, silu(5) ~ 4.97: the gate passes y through
DECAY = 0.8  # per-token decay of the state, exp(dt * A) with dt = 1
X_TAP = 0.1  # Mamba2: last conv tap on x channels, so silu(0.1 v) stays near its linear part
SILU_ONE = 1.2784645  # silu(SILU_ONE) = 1: discrete Mamba2's gate bias, so the gate is exactly 1
DISCRETE_QK_DIMS = 16  # discrete Mamba2: state dimensions that start with the attention's q.k


@torch.no_grad()
def _calibrate_mamba2(mixer, calib: LayerCalibration, n_heads: int, head_dim: int) -> None:
    d_inner, conv_dim = mixer.d_inner, mixer.conv_dim
    in_w = mixer.in_proj.weight
    projection = calib.median_projection if calib.median_projection > 1e-6 else 1.0
    in_w[:d_inner] = (GATE_OPEN / projection) * calib.direction.to(in_w)  # z: the gate open on every channel
    in_w[d_inner + conv_dim :] = 0.0  # dt rows: dt = softplus(dt_bias) = 1 on every token
    mixer.dt_bias.fill_(math.log(math.e - 1))
    mixer.A_log.fill_(math.log(-math.log(DECAY)))
    mixer.D.zero_()  # attention has no skip connection from a token's own value
    mixer.conv1d.weight.zero_()  # the conv passes each token through: last tap only
    mixer.conv1d.weight[:d_inner, 0, -1] = X_TAP
    mixer.conv1d.weight[d_inner:, 0, -1] = 1.0
    mixer.conv1d.bias.zero_()
    _match_head_scale(mixer, calib, n_heads, head_dim, scale_norm=True)


@torch.no_grad()
def _calibrate_discrete(mixer, calib: LayerCalibration, n_heads: int, head_dim: int) -> None:
    d_inner, conv_dim = mixer.d_inner, mixer.conv_dim
    in_w = mixer.in_proj.weight
    projection = calib.median_projection if calib.median_projection > 1e-6 else 1.0
    in_w[conv_dim : conv_dim + d_inner] = 0.0  # z: the gate is silu(z_bias) = 1
    mixer.z_bias.fill_(SILU_ONE)
    decay_logit = math.log(math.expm1(-math.log(DECAY)))  # -softplus(a) = log DECAY at a = decay_logit
    in_w[conv_dim + d_inner :] = (decay_logit / projection) * calib.direction.to(in_w)
    mixer.D.zero_()
    if mixer.d_state > DISCRETE_QK_DIMS:
        # Without softmax or a norm, the full q.k of a real model is dominated by its low-frequency
        # dimensions (SmolLM2 layer 15, state 64: KL 0.137 with all 64, 0.061 with the first 16, random
        # 0.096). Only the first DISCRETE_QK_DIMS state rows start live; the others get B rows 0, so
        # they add nothing until trained (as state dimensions beyond head_dim do).
        b_off = mixer.d_inner
        for h in range(mixer.n_qk_heads):
            in_w[b_off + h * mixer.d_state + DISCRETE_QK_DIMS : b_off + (h + 1) * mixer.d_state] = 0.0
    mixer.conv1d.weight.zero_()
    mixer.conv1d.weight[:, 0, -1] = 1.0
    if mixer.conv1d.bias is not None:
        mixer.conv1d.bias.zero_()
    if mixer.in_proj.bias is not None:
        mixer.in_proj.bias.zero_()
    _match_head_scale(mixer, calib, n_heads, head_dim, scale_norm=False)


@torch.no_grad()
def _match_head_scale(mixer, calib: LayerCalibration, n_heads: int, head_dim: int, *, scale_norm: bool) -> None:
    """Give each head's output (what ``out_proj`` reads) the RMS the attention head's output had on
    the calibration text: through the gated norm's weight (Mamba2), else by scaling the head's x rows
    (discrete Mamba2, whose output is linear in x)."""
    captured = []
    hook = mixer.out_proj.register_forward_pre_hook(lambda m, a: captured.append(a[0].float()))
    if scale_norm:
        mixer.norm.weight.fill_(1.0)
    try:
        for start in range(0, len(calib.inputs), 8):
            mixer(calib.inputs[start : start + 8].to(mixer.in_proj.weight))
    finally:
        hook.remove()
    ssm_heads = mixer.d_inner // head_dim
    rms = torch.cat(captured).unflatten(-1, (ssm_heads, head_dim)).pow(2).mean(-1).sqrt().reshape(-1, ssm_heads).mean(0)
    if ssm_heads < n_heads:  # size-matched: one SSM head per KV group takes the mean scale of its query heads
        target = calib.head_rms.reshape(ssm_heads, n_heads // ssm_heads).mean(1)
    else:  # every SSM head of a group takes its attention head's scale
        target = calib.head_rms.repeat_interleave(ssm_heads // n_heads)
    scale = (target / rms.clamp_min(1e-12)).to(mixer.in_proj.weight)
    if scale_norm:
        mixer.norm.weight.copy_(scale.repeat_interleave(head_dim))
    else:  # discrete layout [x | B | C | z | A~]: x rows first
        mixer.in_proj.weight[: mixer.d_inner].mul_(scale.repeat_interleave(head_dim)[:, None])


def _fresh_mixer(kind: str, d_model: int, settings: dict, device, dtype) -> nn.Module:
    mixer = (Mamba2Mixer if kind == "M" else DiscreteMamba2Mixer)(d_model, **settings)
    for module in mixer.modules():
        if isinstance(module, nn.Linear):  # as TransformerLM initialises its projections
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    return mixer.to(device=device, dtype=dtype)


INITS = ("mil", "mil_plain", "random")


def fresh_mil_mixer(model: TransformerLM, layer: int, mixer: str, calib: LayerCalibration | None, *, d_state: int = 16,
                    expand: float | None = None, d_conv: int = 4, chunk_size: int = 128,
                    width: str = "heads") -> nn.Module:
    """The SSM mixer that would replace attention layer ``layer`` of ``model`` (MIL, calibrated when
    ``calib`` is given), built alone: the model is not copied."""
    settings = ssm_settings(model, mixer, d_state=d_state, expand=expand, d_conv=d_conv, chunk_size=chunk_size,
                            width=width)
    param = next(model.parameters())
    built = _fresh_mixer(MIXERS[mixer], model.config.d_model, settings, param.device, param.dtype)
    mil_init(built, model.layers[layer].self_attn, model.config, calib)
    return built


def hybridize(model: TransformerLM, ssm_layers, mixer: str = "mamba2", init: str = "mil", *, d_state: int = 16,
              expand: float | None = None, d_conv: int = 4, chunk_size: int = 128, seed: int = 0,
              attention_from: TransformerLM | None = None, width: str = "heads",
              calibration: torch.Tensor | dict[int, LayerCalibration] | None = None) -> TransformerLM:
    """A copy of ``model`` whose layers ``ssm_layers`` use an SSM mixer instead of attention.

    Layers already SSM in ``model`` are kept as they are (trained SSM layers carry over). MIL reads
    the attention weights of ``attention_from`` (same shapes; default ``model`` itself), so that a
    progressive stage can take MIL from the original model while the rest comes from the last stage.
    ``init="mil"`` needs ``calibration``: token ids [n, seq] of any text (1-4k tokens suffice), or
    the result of :func:`calibrate` on ``attention_from``. ``width="kv"`` builds the size-matched
    Mamba2 layout (one SSM head per KV head; the module docstring's **Size**).
    """
    if init not in INITS:
        raise DistilError(f"init {init!r} should be one of {', '.join(INITS)}")
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
    settings = ssm_settings(model, mixer, d_state=d_state, expand=expand, d_conv=d_conv, chunk_size=chunk_size,
                            width=width)
    existing = cfg.ssm.get(letter)
    if existing is not None and existing != settings and any(cfg.pattern[i] == letter for i in range(cfg.n_layers)):
        raise DistilError(f"the model's {mixer} layers use {existing}; new ones would use {settings}")
    todo = [i for i in ssm_layers if cfg.pattern[i] == "A"]
    if init == "mil" and todo:
        if calibration is None:
            raise DistilError("init='mil' calibrates on a little text: pass calibration=<token ids [n, seq]> "
                              "(or init='mil_plain' for the uncalibrated copy of the attention weights)")
        if isinstance(calibration, torch.Tensor):
            calibration = calibrate(source, calibration, todo)
        missing = [i for i in todo if i not in calibration]
        if missing:
            raise DistilError(f"no calibration statistics for layers {missing}")
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
            if init in ("mil", "mil_plain"):
                if source.config.pattern[i] != "A":
                    raise DistilError(f"layer {i} of attention_from is not an attention layer: no weights for MIL")
                mil_init(fresh, source.layers[i].self_attn if source is not model else block.self_attn, cfg,
                         calibration[i] if init == "mil" else None)
            block.set_mixer(letter, fresh)
            pattern[i] = letter
    finally:
        torch.random.set_rng_state(generator_state)
    new.config = copy.deepcopy(cfg)
    new.config.pattern = "".join(pattern)
    new.config.ssm = {**cfg.ssm, letter: settings} if letter in pattern else dict(cfg.ssm)
    return new


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def size_difference(teacher: TransformerLM, hybrid: TransformerLM) -> dict:
    """Why a hybrid's parameter count differs from its teacher's, from its first converted layer.

    Returns ``{"teacher", "hybrid", "layers", "attention", "mixer", "parts", "why"}``: total counts,
    the number of converted layers, one attention block's and one SSM mixer's parameters, the
    mixer's parts (name -> count) and a sentence naming what the SSM has that attention has not.
    """
    converted = [i for i, (a, b) in enumerate(zip(teacher.config.pattern, hybrid.config.pattern)) if a == "A" != b]
    out = {"teacher": teacher.num_parameters(), "hybrid": hybrid.num_parameters(), "layers": len(converted)}
    if not converted:
        return {**out, "attention": 0, "mixer": 0, "parts": {}, "why": "no layer was converted"}
    i = converted[0]
    attention, mixer = teacher.layers[i].self_attn, hybrid.layers[i].mamba
    d = mixer.d_model
    if isinstance(mixer, Mamba2Mixer):
        bc = 2 * mixer.n_groups * mixer.d_state * d
        parts = {"z gate": mixer.d_inner * d, "x (from W_V)": mixer.d_inner * d, "B, C (from W_K, W_Q)": bc,
                 "dt": mixer.n_heads * d, "conv1d": _count(mixer.conv1d),
                 "A, D, dt bias, norm": mixer.A_log.numel() + mixer.D.numel() + mixer.dt_bias.numel() + _count(mixer.norm),
                 "out (from W_O)": _count(mixer.out_proj)}
    else:
        x_bc = mixer.conv_dim * d
        parts = {"x, B, C (from W_V, W_K, W_Q)": x_bc, "z gate": mixer.d_inner * d + mixer.z_bias.numel(),
                 "A (per head)": mixer.in_proj.weight.shape[0] * d - x_bc - mixer.d_inner * d,
                 "conv1d": _count(mixer.conv1d), "D": mixer.D.numel(), "out (from W_O)": _count(mixer.out_proj)}
    n_attn, n_mixer = _count(attention), _count(mixer)
    copied = sum(v for k, v in parts.items() if "(from" in k)
    new = {k: v for k, v in parts.items() if "(from" not in k}
    cfg = teacher.config
    why = (f"each SSM mixer has {n_mixer:,} parameters against the attention's {n_attn:,} ({n_mixer - n_attn:+,} per "
           f"converted layer, {len(converted)} layers): the parts MIL copies from attention take {copied:,} "
           f"({copied - n_attn:+,}; x is {mixer.d_inner} wide where V is {cfg.n_kv_heads * cfg.head_dim}, and B, C hold "
           f"state {mixer.d_state} where K, Q hold head_dim {cfg.head_dim}), and "
           + ", ".join(f"{k} {v:,}" for k, v in new.items()) + " have no attention counterpart")
    return {**out, "attention": n_attn, "mixer": n_mixer, "parts": parts, "why": why}
