"""The one dispatch point for optional fast paths (mamba_ssm, causal_conv1d, Triton, Liger).

    if use_fast_path("mamba_ssm", x):      # False on CPU, when not installed, or when forced off
        y = mamba_chunk_scan_combined(...)
    else:
        y = reference_scan(...)

Each fast path has a pure-PyTorch reference with the same signature next to its call site. The
choice is resolved once per (kernel, device type) and logged. Tests force either side with
``force("reference")`` / ``force("fast")`` or the environment variable ``DISTIL_KERNELS``.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import platform

import torch

from distil import __version__
from distil.runtime import threads_follow_load, tune_allocator

log = logging.getLogger("distil")

KERNELS = {
    "mamba_ssm": "mamba_ssm",
    "causal_conv1d": "causal_conv1d",
    "triton": "triton",
    "liger_kernel": "liger_kernel",
    # torch.compile (inductor) of elementwise chunk code: Triton kernels on CUDA.
    "compile": "triton",
}
_forced: str | None = os.environ.get("DISTIL_KERNELS") or None  # "reference" | "fast" | None
_decided: dict[tuple[str, str], bool] = {}


def installed(name: str) -> bool:
    module = KERNELS.get(name, name)
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def force(mode: str | None) -> None:
    """Force every dispatch to "reference" or "fast" (None: automatic). Clears cached decisions."""
    global _forced
    if mode not in (None, "reference", "fast"):
        raise ValueError(f"kernel mode {mode!r} should be 'reference', 'fast' or None")
    _forced = mode
    _decided.clear()


def use_fast_path(name: str, tensor: torch.Tensor) -> bool:
    device = tensor.device.type
    key = (name, device)
    if key not in _decided:
        if _forced == "reference":
            choice, why = False, "forced to the reference"
        elif device != "cuda":
            choice, why = False, f"{device} always takes the reference"
        elif not installed(name):
            choice, why = False, f"{name} is not installed"
        else:
            choice, why = True, "installed and on CUDA"
        if _forced == "fast" and not choice and device == "cuda" and installed(name):
            choice, why = True, "forced to the fast path"
        _decided[key] = choice
        log.info("kernel %s on %s: %s path (%s)", name, device, "fast" if choice else "reference", why)
    return _decided[key]


def _version(module: str) -> str:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:
        return "not installed"


def describe_environment() -> dict[str, str]:
    info = {
        "distil": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "tokenizers": _version("tokenizers"),
        "safetensors": _version("safetensors"),
    }
    if torch.cuda.is_available():
        info["device"] = f"cuda: {torch.cuda.get_device_name(0)} (x{torch.cuda.device_count()})"
        info["bf16"] = str(torch.cuda.is_bf16_supported())
    else:
        mode = ", fewer while other processes use the cores" if threads_follow_load() else ""
        info["device"] = f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads{mode})"
    for name, dist in (("mamba_ssm", "mamba-ssm"), ("causal_conv1d", "causal-conv1d"), ("triton", "triton"),
                       ("liger_kernel", "liger-kernel"), ("lm_eval", "lm-eval"), ("tensorboard", "tensorboard"),
                       ("wandb", "wandb")):
        info[name] = _version(dist) if installed(name) else "not installed"
    info["fast paths"] = "on CUDA when installed" if torch.cuda.is_available() else "none on CPU (reference paths)"
    info["allocator"] = ("glibc thresholds raised (DISTIL_MALLOC_TUNING=0 to disable)" if tune_allocator()
                         else "default")
    return info


_DECODE_BACKENDS = None


def decode_attention_backends(tensor: torch.Tensor):
    """SDPA backends for decoding steps (one query, a key length that grows every call).

    On CUDA this leaves out cuDNN attention, which PyTorch picks first on Hopper but whose CPU-side
    setup cost about 2.8 ms per call when the key length changes every step (H100, torch 2.11:
    a 24-layer 2048-wide model decoded 11 tokens/s by default, 57 with the memory-efficient
    kernel; docs/benchmarks.md). Elsewhere: no restriction.
    """
    global _DECODE_BACKENDS
    import contextlib

    if tensor.device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if _DECODE_BACKENDS is None:
        _DECODE_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
        log.info("decode attention on cuda: flash / memory-efficient / math SDPA (cuDNN left out)")
    return sdpa_kernel(_DECODE_BACKENDS)
