"""State-space mixers for hybrid students: Mamba2 and discrete Mamba2, with a pure-PyTorch SSD scan.

    mixer = Mamba2Mixer(d_model=512, d_state=16, expand=2, head_dim=64)
    y, state = mixer(x)                    # x [batch, seq, d_model]; state = SSMState(conv, ssm)
    y2, state = mixer(x_next, state=state) # continue the sequence (streamed chunks, generation)
    y_t, state = mixer.step(x_t, state)    # one token [batch, d_model]

Both mixers run the same recurrence per head,

    h_t = exp(a_t) * h_{t-1} + x_t B_t^T        (h: [head_dim, d_state], a_t <= 0 the log-decay)
    y_t = h_t C_t + D * x_t

computed by the chunked SSD algorithm of Mamba2 (Dao & Gu 2024, "ssd_minimal"): quadratic
attention-like products inside each chunk, a linear recurrence over chunk states between them.
:func:`ssd_sequential` is the step-by-step recurrence the tests compare it with.

* :class:`Mamba2Mixer` has mamba_ssm's ``Mamba2`` parameters, names, shapes and ``in_proj`` layout
  ``[z | x | B | C | dt]``, so state dicts move unchanged between distil, mamba_ssm and
  transformers' ``Mamba2Mixer``; a_t = dt_t * A with dt = softplus(dt_raw + dt_bias), A = -exp(A_log),
  and the input is dt_t * x_t. Output: gated RMSNorm(y * silu(z)), then ``out_proj``.
* :class:`DiscreteMamba2Mixer` is the Phi-Mamba / MOHAWK / Llamba form: ``in_proj`` gives
  ``[x | B | C | z | A~]``, a_t = -softplus(A~_t) per head, no dt scaling of the input, output
  gated by silu(z + z_bias), then ``out_proj``.

On CUDA, Mamba2 uses mamba_ssm's Triton kernels for the scan and the decode step, and
causal_conv1d's kernels for the convolution, each when installed, through
:func:`distil.kernels.use_fast_path` (each independently); CPU always runs the reference here. The discrete mixer always
runs the reference (mamba_ssm's kernel scales the input by dt, which that form does not do).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from distil.kernels import use_fast_path


def _fp(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Upcast to the scan's compute dtype: fp64 for fp64 inputs (reference checks), else fp32."""
    return t.to(torch.float64 if like.dtype == torch.float64 else torch.float32)


@dataclass
class SSMState:
    conv: torch.Tensor  # [batch, conv_channels, d_conv - 1], the last inputs to the causal conv
    ssm: torch.Tensor  # [batch, heads, head_dim, d_state]

    def detach(self) -> SSMState:
        return SSMState(self.conv.detach(), self.ssm.detach())


# ---------------------------------------------------------------------------------------------
# The scan


def _segsum(x: torch.Tensor) -> torch.Tensor:
    """[..., T] -> [..., T, T] with out[i, j] = sum_{j < k <= i} x[k] (and -inf above the diagonal)."""
    T = x.shape[-1]
    x = x[..., None].expand(*x.shape, T)
    strict = torch.tril(torch.ones(T, T, dtype=torch.bool, device=x.device), diagonal=-1)
    x = x.masked_fill(~strict, 0)
    out = torch.cumsum(x, dim=-2)
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool, device=x.device), diagonal=0)
    return out.masked_fill(~causal, -torch.inf)


def _expand_groups(t: torch.Tensor, heads: int) -> torch.Tensor:
    """[b, l, groups, n] -> [b, l, heads, n]: each group serves heads // groups consecutive heads."""
    groups = t.shape[2]
    return t if groups == heads else t.repeat_interleave(heads // groups, dim=2)


def ssd_chunked(x, log_decay, B, C, *, chunk_size: int, initial_state=None):
    """Chunked SSD scan.

    Args:
        x: [b, l, h, p] inputs (already scaled by dt for Mamba2).
        log_decay: [b, l, h] a_t <= 0.
        B, C: [b, l, g, n], g dividing h.
        initial_state: [b, h, p, n] or None.
    Returns y [b, l, h, p] and the final state [b, h, p, n]. Computed in fp32 (fp64 stays fp64).
    """
    batch, length, heads, head_dim = x.shape
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    x, log_decay = x.to(dtype), log_decay.to(dtype)
    B, C = _expand_groups(B, heads).to(dtype), _expand_groups(C, heads).to(dtype)
    pad = (-length) % chunk_size
    if pad:  # zero input and zero log-decay (no decay) leave outputs and the final state unchanged
        x, B, C = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (x, B, C))
        log_decay = F.pad(log_decay, (0, 0, 0, pad))
    chunks = x.shape[1] // chunk_size

    def split(t):
        return t.reshape(batch, chunks, chunk_size, *t.shape[2:])

    x, B, C, a = split(x), split(B), split(C), split(log_decay)  # [b, c, l, h, ...]
    a = a.permute(0, 3, 1, 2)  # [b, h, c, l]
    a_cumsum = torch.cumsum(a, dim=-1)
    # 1. Within each chunk: y_i = sum_{j <= i} C_i.B_j exp(a_{j+1} + ... + a_i) x_j.
    decay = torch.exp(_segsum(a))  # [b, h, c, l, l]
    y_diag = torch.einsum("bclhn,bcshn,bhcls,bcshp->bclhp", C, B, decay, x)
    # 2. Each chunk's own final state, as if it started from zero.
    decay_to_end = torch.exp(a_cumsum[..., -1:] - a_cumsum)  # [b, h, c, l]
    states = torch.einsum("bclhn,bhcl,bclhp->bchpn", B, decay_to_end, x)
    # 3. Carry states across chunks.
    if initial_state is None:
        initial_state = torch.zeros(batch, heads, head_dim, B.shape[-1], dtype=dtype, device=x.device)
    states = torch.cat([initial_state.to(dtype)[:, None], states], dim=1)  # [b, c + 1, h, p, n]
    chunk_decay = torch.exp(_segsum(F.pad(a_cumsum[..., -1], (1, 0))))  # [b, h, c + 1, c + 1]
    states = torch.einsum("bhzc,bchpn->bzhpn", chunk_decay, states)
    states, final_state = states[:, :-1], states[:, -1]
    # 4. The carried-in state's contribution to each position.
    y_off = torch.einsum("bclhn,bchpn,bhcl->bclhp", C, states, torch.exp(a_cumsum))
    y = (y_diag + y_off).reshape(batch, chunks * chunk_size, heads, head_dim)[:, :length]
    return y, final_state


def recurrence_step(state, decay, x, B, C):
    """One step of the SSM recurrence, the one place it is written: h = decay * h + x B^T, y = h C.
    ``state`` [b, h, p, n], ``decay`` [b, h], ``x`` [b, h, p], ``B`` and ``C`` [b, h, n]."""
    state = state * decay[..., None, None] + x[..., None] * B[:, :, None, :]
    return torch.einsum("bhpn,bhn->bhp", state, C), state


def conv_step(xbc: torch.Tensor, conv_state: torch.Tensor, conv1d: nn.Conv1d):
    """One token through the depthwise causal conv: (pre-activation output [b, c], new state [b, c, k - 1])."""
    window = torch.cat([conv_state.to(xbc.dtype), xbc[..., None]], dim=-1)  # [b, c, k]
    out = (window * conv1d.weight[:, 0]).sum(-1)
    if conv1d.bias is not None:
        out = out + conv1d.bias
    return out, window[..., 1:]


def ssd_sequential(x, log_decay, B, C, *, initial_state=None):
    """The recurrence one step at a time: the reference for :func:`ssd_chunked` (and for ``step``)."""
    batch, length, heads, head_dim = x.shape
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    B, C = _expand_groups(B, heads).to(dtype), _expand_groups(C, heads).to(dtype)
    state = (torch.zeros(batch, heads, head_dim, B.shape[-1], dtype=dtype, device=x.device)
             if initial_state is None else initial_state.to(dtype))
    ys = []
    for t in range(length):
        y, state = recurrence_step(state, torch.exp(log_decay[:, t].to(dtype)), x[:, t].to(dtype), B[:, t], C[:, t])
        ys.append(y)
    return torch.stack(ys, dim=1), state


def causal_conv(inputs: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, conv_state: torch.Tensor | None):
    """Depthwise causal conv over [b, l, channels], continuing from ``conv_state`` [b, channels, k - 1].

    Returns the output [b, l, channels] and the new state (the last k - 1 inputs).
    """
    kernel = weight.shape[-1]
    seq = inputs.transpose(1, 2)  # [b, c, l]
    history = conv_state if conv_state is not None else seq.new_zeros(seq.shape[0], seq.shape[1], kernel - 1)
    full = torch.cat([history.to(seq.dtype), seq], dim=-1)
    out = F.conv1d(full, weight, bias, groups=seq.shape[1])
    return out.transpose(1, 2), full[..., -(kernel - 1):] if kernel > 1 else full[..., :0]


# ---------------------------------------------------------------------------------------------
# Mamba2


class Mamba2Mixer(nn.Module):
    """mamba_ssm's Mamba2 mixer (see the module docstring). Arguments mean what mamba_ssm's do."""

    def __init__(self, d_model: int, *, d_state: int = 128, expand: int | float = 2, head_dim: int = 64,
                 n_groups: int = 1, d_conv: int = 4, chunk_size: int = 256, d_inner: int | None = None,
                 dt_min: float = 0.001, dt_max: float = 0.1, dt_init_floor: float = 1e-4, norm_eps: float = 1e-5):
        super().__init__()
        self.d_model, self.d_state, self.head_dim, self.n_groups = d_model, d_state, head_dim, n_groups
        self.d_conv, self.chunk_size = d_conv, chunk_size
        self.d_inner = d_inner or int(expand * d_model)
        if self.d_inner % head_dim:
            raise ValueError(f"d_inner = {self.d_inner} is not divisible by head_dim = {head_dim}")
        self.n_heads = self.d_inner // head_dim
        if self.n_heads % n_groups:
            raise ValueError(f"{self.n_heads} heads cannot be split into n_groups = {n_groups}")
        self.dt_range = (dt_min, dt_max, dt_init_floor)
        self.conv_dim = self.d_inner + 2 * n_groups * d_state
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner + 2 * n_groups * d_state + self.n_heads, bias=False)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, d_conv, groups=self.conv_dim, padding=d_conv - 1, bias=True)
        self.dt_bias = nn.Parameter(torch.empty(self.n_heads))
        self.A_log = nn.Parameter(torch.empty(self.n_heads))
        self.D = nn.Parameter(torch.empty(self.n_heads))
        self.norm = GatedRMSNorm(self.d_inner, group_size=self.d_inner // n_groups, eps=norm_eps)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self) -> None:
        """Mamba's initialisation of dt, A and D (the projections are initialised by the model)."""
        dt_min, dt_max, floor = self.dt_range
        dt = torch.exp(torch.rand(self.n_heads) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=floor)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        self.A_log.copy_(torch.log(torch.empty(self.n_heads).uniform_(1, 16)))
        self.D.fill_(1.0)

    def _split(self, projected):
        return projected.split([self.d_inner, self.conv_dim, self.n_heads], dim=-1)

    def forward(self, hidden: torch.Tensor, state: SSMState | None = None):
        batch, length, _ = hidden.shape
        if state is not None and length == 1:
            y, state = self.step(hidden[:, 0], state)
            return y[:, None], state
        z, xbc, dt = self._split(self.in_proj(hidden))
        if use_fast_path("causal_conv1d", hidden):
            xbc_act, conv_state = _fast_conv(xbc, self.conv1d, state)
        else:
            xbc_act, conv_state = causal_conv(xbc, self.conv1d.weight, self.conv1d.bias, None if state is None else state.conv)
            xbc_act = F.silu(xbc_act)
        x, B, C = xbc_act.split([self.d_inner, self.n_groups * self.d_state, self.n_groups * self.d_state], dim=-1)
        x = x.reshape(batch, length, self.n_heads, self.head_dim)
        B = B.reshape(batch, length, self.n_groups, self.d_state)
        C = C.reshape(batch, length, self.n_groups, self.d_state)
        dt = F.softplus(_fp(dt, hidden) + _fp(self.dt_bias, hidden))  # [b, l, h]
        A = -torch.exp(_fp(self.A_log, hidden))
        initial = None if state is None else state.ssm
        if use_fast_path("mamba_ssm", hidden):
            y, final = _fast_scan(x, dt, A, B, C, self.chunk_size, initial)
        else:
            y, final = ssd_chunked(x * dt[..., None].to(x.dtype), dt * A, B, C, chunk_size=self.chunk_size,
                                   initial_state=initial)
        y = y + x.to(y.dtype) * self.D.to(y.dtype)[:, None]
        y = y.reshape(batch, length, self.d_inner).to(hidden.dtype)
        out = self.out_proj(self.norm(y, z))
        return out, SSMState(conv_state, final)

    def step(self, hidden: torch.Tensor, state: SSMState):
        """One token [b, d_model] -> ([b, d_model], new state); equals ``forward`` on that token."""
        z, xbc, dt = self._split(self.in_proj(hidden))
        if use_fast_path("causal_conv1d", hidden):
            xbc_act, conv_state = _fast_conv_step(xbc, self.conv1d, state.conv)
        else:
            conv_out, conv_state = conv_step(xbc, state.conv, self.conv1d)
            xbc_act = F.silu(conv_out)
        if use_fast_path("mamba_ssm", hidden):
            y, ssm_state = _fast_ssm_step(self, xbc_act, dt, state.ssm)
            return self.out_proj(self.norm(y.to(hidden.dtype), z)), SSMState(conv_state, ssm_state)
        x, B, C = xbc_act.split([self.d_inner, self.n_groups * self.d_state, self.n_groups * self.d_state], dim=-1)
        batch = hidden.shape[0]
        x = x.reshape(batch, self.n_heads, self.head_dim)
        heads_per_group = self.n_heads // self.n_groups
        B = B.reshape(batch, self.n_groups, self.d_state).repeat_interleave(heads_per_group, dim=1)
        C = C.reshape(batch, self.n_groups, self.d_state).repeat_interleave(heads_per_group, dim=1)
        dt = F.softplus(_fp(dt, hidden) + _fp(self.dt_bias, hidden))  # [b, h]
        A = -torch.exp(_fp(self.A_log, hidden))
        x, B, C = _fp(x, hidden), _fp(B, hidden), _fp(C, hidden)
        y, ssm = recurrence_step(_fp(state.ssm, hidden), torch.exp(dt * A), x * dt[..., None], B, C)
        y = y + x * _fp(self.D, hidden)[:, None]
        y = y.reshape(batch, self.d_inner).to(hidden.dtype)
        return self.out_proj(self.norm(y, z)), SSMState(conv_state, ssm.to(state.ssm.dtype))

    def empty_state(self, batch: int, device=None, dtype=torch.float32) -> SSMState:
        return SSMState(torch.zeros(batch, self.conv_dim, self.d_conv - 1, device=device, dtype=dtype),
                        torch.zeros(batch, self.n_heads, self.head_dim, self.d_state, device=device,
                                    dtype=torch.float64 if dtype == torch.float64 else torch.float32))


class GatedRMSNorm(nn.Module):
    """RMSNorm(y * silu(z)) within groups of ``group_size`` channels (mamba_ssm's RMSNormGated,
    norm_before_gate=False; transformers' MambaRMSNormGated)."""

    def __init__(self, dim: int, *, group_size: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.group_size, self.eps = group_size, eps

    def forward(self, y, z):
        # fp32 for bf16/fp16/fp32 inputs, fp64 for fp64 ones: a float32 norm inside a float64
        # reference check made step == forward hold only where both shapes rounded alike (AVX2, not AVX-512)
        dtype = y.dtype
        y = _fp(y, y) * F.silu(_fp(z, y))
        grouped = y.view(*y.shape[:-1], -1, self.group_size)
        grouped = grouped * torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * grouped.view(y.shape).to(dtype)


def _fast_conv(xbc, conv1d, state):  # CUDA with causal_conv1d; on CPU in tests/test_fast_path_glue.py
    from causal_conv1d import causal_conv1d_fn

    seq = xbc.transpose(1, 2)
    kernel = conv1d.weight.shape[-1]
    history = state.conv.to(seq.dtype) if state is not None else seq.new_zeros(seq.shape[0], seq.shape[1], kernel - 1)
    full = torch.cat([history, seq], dim=-1).contiguous()
    # The kernel pads causally itself; outputs past the history are this chunk's.
    out = causal_conv1d_fn(full, conv1d.weight[:, 0], conv1d.bias, activation="silu")[..., kernel - 1:]
    return out.transpose(1, 2), full[..., -(kernel - 1):]


def _fast_scan(x, dt, A, B, C, chunk_size, initial):  # CUDA with mamba_ssm; on CPU in tests/test_fast_path_glue.py
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

    y, final = mamba_chunk_scan_combined(x.contiguous(), dt.to(x.dtype).contiguous(), A, B.contiguous(), C.contiguous(),
                                         chunk_size, initial_states=None if initial is None else initial.to(x.dtype),
                                         return_final_states=True)
    return _fp(y, x), _fp(final, x)


def _fast_conv_step(xbc, conv1d, conv_state):  # CUDA with causal_conv1d; on CPU in tests/test_fast_path_glue.py
    """One token through causal_conv1d_update (which updates its state in place: a copy keeps the
    caller's state as it was, as the reference does)."""
    from causal_conv1d import causal_conv1d_update

    conv = conv_state.to(xbc.dtype, copy=True)
    out = causal_conv1d_update(xbc.contiguous(), conv, conv1d.weight[:, 0], conv1d.bias, activation="silu")
    return out, conv


def _fast_ssm_step(mixer, xbc_act, dt, ssm_state):  # CUDA with mamba_ssm; on CPU in tests/test_fast_path_glue.py
    """One token through mamba_ssm's selective_state_update (in place on a copy of the state)."""
    from mamba_ssm.ops.triton.selective_state_update import selective_state_update

    batch, heads, p, n = xbc_act.shape[0], mixer.n_heads, mixer.head_dim, mixer.d_state
    x, B, C = xbc_act.split([mixer.d_inner, mixer.n_groups * n, mixer.n_groups * n], dim=-1)
    ssm = ssm_state.clone()
    A = -torch.exp(_fp(mixer.A_log, xbc_act))[:, None, None].expand(heads, p, n)
    y = selective_state_update(ssm, x.reshape(batch, heads, p), dt[..., None].expand(batch, heads, p),
                               A, B.reshape(batch, mixer.n_groups, n), C.reshape(batch, mixer.n_groups, n),
                               D=mixer.D[:, None].expand(heads, p), dt_bias=mixer.dt_bias[:, None].expand(heads, p),
                               dt_softplus=True)
    return y.reshape(batch, mixer.d_inner), ssm


# ---------------------------------------------------------------------------------------------
# Discrete Mamba2 (Phi-Mamba / MOHAWK / Llamba)


class DiscreteMamba2Mixer(nn.Module):
    """The discrete Mamba2 mixer: a_t = -softplus(A~_t) per head, gate silu(z + z_bias).

    ``n_qk_heads`` B/C heads of size ``d_state`` (attention's query/key heads under MIL) serve
    ``n_v_heads`` value heads of size ``d_inner / n_v_heads``.
    """

    def __init__(self, d_model: int, *, d_state: int = 64, n_qk_heads: int = 32, n_v_heads: int = 32,
                 expand: int | float = 1, d_inner: int | None = None, d_conv: int = 4, chunk_size: int = 128,
                 bias: bool = False, conv_bias: bool = True):
        super().__init__()
        self.d_model, self.d_state, self.d_conv, self.chunk_size = d_model, d_state, d_conv, chunk_size
        self.d_inner = d_inner or int(expand * d_model)
        self.n_qk_heads, self.n_v_heads = n_qk_heads, n_v_heads
        if self.d_inner % n_v_heads or n_v_heads % n_qk_heads:
            raise ValueError(f"d_inner = {self.d_inner}, n_v_heads = {n_v_heads}, n_qk_heads = {n_qk_heads} do not divide")
        self.head_dim = self.d_inner // n_v_heads
        self.conv_dim = self.d_inner + 2 * n_qk_heads * d_state
        self.in_proj = nn.Linear(d_model, self.conv_dim + self.d_inner + n_v_heads, bias=bias)
        self.z_bias = nn.Parameter(torch.zeros(self.d_inner))
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, d_conv, groups=self.conv_dim, padding=d_conv - 1, bias=conv_bias)
        self.D = nn.Parameter(torch.ones(n_v_heads))
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias)

    @torch.no_grad()
    def reset_ssm_parameters(self) -> None:
        self.z_bias.zero_()
        self.D.fill_(1.0)

    def _split(self, projected):
        xbc, z, a_raw = projected.split([self.conv_dim, self.d_inner, self.n_v_heads], dim=-1)
        return xbc, z, a_raw

    def _heads(self, xbc, batch, length):
        x, B, C = xbc.split([self.d_inner, self.n_qk_heads * self.d_state, self.n_qk_heads * self.d_state], dim=-1)
        return (x.reshape(batch, length, self.n_v_heads, self.head_dim),
                B.reshape(batch, length, self.n_qk_heads, self.d_state), C.reshape(batch, length, self.n_qk_heads, self.d_state))

    def forward(self, hidden: torch.Tensor, state: SSMState | None = None):
        batch, length, _ = hidden.shape
        if state is not None and length == 1:
            y, state = self.step(hidden[:, 0], state)
            return y[:, None], state
        xbc, z, a_raw = self._split(self.in_proj(hidden))
        xbc, conv_state = causal_conv(xbc, self.conv1d.weight, self.conv1d.bias, None if state is None else state.conv)
        x, B, C = self._heads(xbc, batch, length)
        log_decay = -F.softplus(_fp(a_raw, hidden))  # [b, l, h]
        y, final = ssd_chunked(x, log_decay, B, C, chunk_size=self.chunk_size, initial_state=None if state is None else state.ssm)
        y = y + x.to(y.dtype) * self.D.to(y.dtype)[:, None]
        y = y.reshape(batch, length, self.d_inner).to(hidden.dtype)
        return self.out_proj(y * F.silu(z + self.z_bias)), SSMState(conv_state, final)

    def step(self, hidden: torch.Tensor, state: SSMState):
        xbc, z, a_raw = self._split(self.in_proj(hidden))
        conv_out, conv_state = conv_step(xbc, state.conv, self.conv1d)
        batch = hidden.shape[0]
        x, B, C = (t[:, 0] for t in self._heads(conv_out[:, None], batch, 1))
        ratio = self.n_v_heads // self.n_qk_heads
        B, C = _fp(B.repeat_interleave(ratio, dim=1), hidden), _fp(C.repeat_interleave(ratio, dim=1), hidden)
        decay = torch.exp(-F.softplus(_fp(a_raw, hidden)))  # [b, h]
        x = _fp(x, hidden)
        y, ssm = recurrence_step(_fp(state.ssm, hidden), decay, x, B, C)
        y = y + x * _fp(self.D, hidden)[:, None]
        y = y.reshape(batch, self.d_inner).to(hidden.dtype)
        return self.out_proj(y * F.silu(z + self.z_bias)), SSMState(conv_state, ssm.to(state.ssm.dtype))

    def empty_state(self, batch: int, device=None, dtype=torch.float32) -> SSMState:
        return SSMState(torch.zeros(batch, self.conv_dim, self.d_conv - 1, device=device, dtype=dtype),
                        torch.zeros(batch, self.n_v_heads, self.head_dim, self.d_state, device=device,
                                    dtype=torch.float64 if dtype == torch.float64 else torch.float32))
