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


def memory_pass(cmd: list[str]) -> float:
    """Peak extra memory (MiB) from a second run of ``cmd`` (which prints a JSON row with ``peak_mib``)
    with distil's allocator tuning off: the tuned allocator keeps freed blocks resident, which hides
    each step's own peak from VmHWM. Timings are taken with the tuning on, as users run."""
    import json
    import os
    import subprocess

    if "--repeats" in cmd:
        cmd = cmd[: cmd.index("--repeats")] + ["--repeats", "1"] + cmd[cmd.index("--repeats") + 2 :]
    cmd = ["--repeats=1" if c.startswith("--repeats=") else c for c in cmd]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "DISTIL_MALLOC_TUNING": "0"})
    if out.returncode:
        raise SystemExit(out.stderr)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"]
