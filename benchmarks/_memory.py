"""Peak-memory helpers shared by the benchmark scripts (CPU: /proc VmHWM; CUDA: the allocator)."""

from __future__ import annotations


def kib(field: str) -> int:
    """A /proc/self/status field in KiB (VmRSS:, VmHWM:)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


def reset_peak(device: str) -> int:
    """Reset the peak counter; returns the current usage in bytes (the baseline)."""
    import torch

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak resident set size (VmHWM) to the current one
    return kib("VmRSS:") * 1024


def peak_since(device: str, base: int) -> int:
    import torch

    return (torch.cuda.max_memory_allocated() if device == "cuda" else kib("VmHWM:") * 1024) - base
