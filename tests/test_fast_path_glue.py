"""The code that calls mamba_ssm's and causal_conv1d's CUDA kernels, checked on CPU.

CI has no GPU, so the kernels themselves run only in tests/test_gpu.py. What can go wrong on our
side of the call (argument order, shapes, layouts, the conv window, in-place state updates,
splitting [x | B | C], expanding per-head parameters) is checked here: each kernel is replaced by
a stand-in written from its documented contract (the docstrings of causal_conv1d_fn /
causal_conv1d_update, mamba_chunk_scan_combined and selective_state_update), which enforces the
same argument checks as the real kernel, and the mixer's fast path must then equal its reference.
"""

import sys
import types

import pytest
import torch
import torch.nn.functional as F

import distil.models.ssm as ssm
from distil.models import Mamba2Mixer

pytestmark = pytest.mark.numerics  # CI runs these again under ATEN_CPU_CAPABILITY=default

# ---------------------------------------------------------------------------------------------
# Stand-ins, from the kernels' contracts (float64-friendly loops, independent of distil's scan).


def causal_conv1d_fn(x, weight, bias=None, seq_idx=None, initial_states=None, return_final_states=False,
                     final_states_out=None, activation=None):
    """x [batch, dim, seqlen], weight [dim, width], bias [dim] -> out [batch, dim, seqlen]."""
    assert activation in (None, "silu", "swish")
    assert x.dim() == 3 and weight.dim() == 2 and weight.shape[0] == x.shape[1], (x.shape, weight.shape)
    assert bias is None or bias.shape == (x.shape[1],)
    assert x.stride(2) == 1 or x.stride(1) == 1
    assert initial_states is None and not return_final_states, "distil passes the history inside x"
    width = weight.shape[1]
    padded = F.pad(x.to(weight.dtype), (width - 1, 0))
    out = sum(padded[..., k:k + x.shape[-1]] * weight[:, k, None] for k in range(width))
    if bias is not None:
        out = out + bias[:, None]
    return (F.silu(out) if activation else out).to(x.dtype)


def causal_conv1d_update(x, conv_state, weight, bias=None, activation=None, cache_seqlens=None,
                         conv_state_indices=None):
    """x [batch, dim], conv_state [batch, dim, state_len >= width - 1], updated in place."""
    assert x.dim() == 2 and conv_state.dim() == 3 and conv_state.shape[:2] == x.shape
    assert conv_state.dtype == x.dtype, "the kernel wants the state in the input's dtype"
    width = weight.shape[1]
    assert weight.shape == (x.shape[1], width) and conv_state.shape[-1] >= width - 1
    window = torch.cat([conv_state, x[..., None]], dim=-1)[..., -width:].to(weight.dtype)
    conv_state.copy_(torch.cat([conv_state, x[..., None]], dim=-1)[..., 1:])
    out = (window * weight).sum(-1) + (0 if bias is None else bias)
    return (F.silu(out) if activation else out).to(x.dtype)


def mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None,
                              seq_idx=None, cu_seqlens=None, dt_softplus=False, dt_limit=(0.0, float("inf")),
                              return_final_states=False, return_varlen_states=False):
    """x [b, l, h, p], dt [b, l, h], A [h], B/C [b, l, g, n] -> y [b, l, h, p] (, final [b, h, p, n])."""
    batch, length, heads, head_dim = x.shape
    groups, d_state = B.shape[2:]
    assert dt.shape == (batch, length, heads) and A.shape == (heads,) and C.shape == B.shape
    assert B.shape[:2] == (batch, length) and heads % groups == 0
    assert x.stride(-1) == 1 and B.stride(-1) == 1 and C.stride(-1) == 1
    assert D is None and z is None and dt_bias is None and not dt_softplus, "distil applies these itself"
    state = (torch.zeros(batch, heads, head_dim, d_state, dtype=torch.float64) if initial_states is None
             else initial_states.double())
    assert state.shape == (batch, heads, head_dim, d_state)
    B, C = (t.double().repeat_interleave(heads // groups, dim=2) for t in (B, C))
    ys = []
    for t in range(length):
        step_dt = dt[:, t].double()  # [b, h]
        state = (state * torch.exp(step_dt * A.double())[..., None, None]
                 + (x[:, t].double() * step_dt[..., None])[..., None] * B[:, t, :, None, :])
        ys.append(torch.einsum("bhpn,bhn->bhp", state, C[:, t]))
    y = torch.stack(ys, 1).to(x.dtype)
    return (y, state.to(x.dtype)) if return_final_states else y


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    """state [b, h, p, n] (in place), x/dt [b, h, p], A [h, p, n], B/C [b, g, n], D/dt_bias [h, p]."""
    batch, heads, head_dim, d_state = state.shape
    assert x.shape == dt.shape == (batch, heads, head_dim) and A.shape == (heads, head_dim, d_state)
    assert B.shape == C.shape and B.shape[0] == batch and B.shape[2] == d_state and heads % B.shape[1] == 0
    assert D is None or D.shape == (heads, head_dim)
    assert dt_bias is None or dt_bias.shape == (heads, head_dim)
    dt = dt + (0 if dt_bias is None else dt_bias)
    dt = F.softplus(dt) if dt_softplus else dt
    B, C = (t.repeat_interleave(heads // t.shape[1], dim=1) for t in (B, C))
    new = state * torch.exp(dt[..., None] * A) + (dt * x)[..., None] * B[:, :, None, :]
    state.copy_(new)
    y = torch.einsum("bhpn,bhn->bhp", new, C) + (0 if D is None else D * x)
    y = y * F.silu(z) if z is not None else y
    return y.to(x.dtype)


@pytest.fixture
def fake_kernels(monkeypatch):
    """Install the stand-ins as the packages distil imports, and send the mixer down the fast path
    for the kernels named in the returned set."""
    conv = types.ModuleType("causal_conv1d")
    conv.causal_conv1d_fn, conv.causal_conv1d_update = causal_conv1d_fn, causal_conv1d_update
    combined = types.ModuleType("mamba_ssm.ops.triton.ssd_combined")
    combined.mamba_chunk_scan_combined = mamba_chunk_scan_combined
    update = types.ModuleType("mamba_ssm.ops.triton.selective_state_update")
    update.selective_state_update = selective_state_update
    for name in ("mamba_ssm", "mamba_ssm.ops", "mamba_ssm.ops.triton"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "causal_conv1d", conv)
    monkeypatch.setitem(sys.modules, "mamba_ssm.ops.triton.ssd_combined", combined)
    monkeypatch.setitem(sys.modules, "mamba_ssm.ops.triton.selective_state_update", update)
    enabled: set[str] = set()
    monkeypatch.setattr(ssm, "use_fast_path", lambda name, tensor: name in enabled)
    return enabled


def _mixer():
    torch.manual_seed(0)
    mixer = Mamba2Mixer(24, d_state=6, expand=2, head_dim=8, n_groups=3, d_conv=4, chunk_size=5).double()
    with torch.no_grad():
        for p in mixer.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return mixer


KERNEL_SETS = [{"causal_conv1d"}, {"mamba_ssm"}, {"causal_conv1d", "mamba_ssm"}]


@pytest.mark.parametrize("kernels", KERNEL_SETS, ids=lambda k: "+".join(sorted(k)))
def test_fast_forward_and_carried_state_equal_the_reference(fake_kernels, kernels):
    mixer = _mixer()
    x = torch.randn(2, 23, 24, dtype=torch.float64)
    with torch.no_grad():
        ref, ref_state = mixer(x)
        fake_kernels.update(kernels)
        fast, fast_state = mixer(x)
        first, state = mixer(x[:, :9])
        second, state = mixer(x[:, 9:], state=state)
    torch.testing.assert_close(fast, ref, atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(fast_state.ssm, ref_state.ssm, atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(fast_state.conv, ref_state.conv, atol=0, rtol=0)
    torch.testing.assert_close(torch.cat([first, second], 1), ref, atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(state.ssm, ref_state.ssm, atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("kernels", KERNEL_SETS, ids=lambda k: "+".join(sorted(k)))
def test_fast_step_equals_forward_and_leaves_the_callers_state(fake_kernels, kernels):
    mixer = _mixer()
    x = torch.randn(3, 12, 24, dtype=torch.float64)
    with torch.no_grad():
        whole, _ = mixer(x)
        _, state = mixer(x[:, :5])
        fake_kernels.update(kernels)
        steps = []
        for t in range(5, 12):
            before = (state.conv.clone(), state.ssm.clone())
            y, new_state = mixer.step(x[:, t], state)
            # the kernels update their state in place: the caller's state must be left as it was
            torch.testing.assert_close(state.conv, before[0], atol=0, rtol=0)
            torch.testing.assert_close(state.ssm, before[1], atol=0, rtol=0)
            steps.append(y)
            state = new_state
    torch.testing.assert_close(torch.stack(steps, 1), whole[:, 5:], atol=1e-10, rtol=1e-9)


def test_fast_forward_gradients_equal_the_reference(fake_kernels):
    """The stand-ins are differentiable, so this checks that the glue keeps every parameter in the graph."""
    mixer = _mixer()
    x = torch.randn(2, 11, 24, dtype=torch.float64, requires_grad=True)
    grads = {}
    for kernels in (set(), {"causal_conv1d", "mamba_ssm"}):
        fake_kernels.clear()
        fake_kernels.update(kernels)
        out, _ = mixer(x)
        loss = (out * torch.linspace(-1, 1, out.shape[-1], dtype=torch.float64)).sum()
        grads[bool(kernels)] = torch.autograd.grad(loss, [x, *mixer.parameters()])
    for a, b in zip(grads[True], grads[False]):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-8)
