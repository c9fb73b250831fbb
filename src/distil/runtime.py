"""Process-level tuning applied when distil is imported.

On Linux with glibc, freed blocks above a size threshold go straight back to the OS, so every
large temporary tensor (a [chunk x vocab] block of the loss, an activation) is paid for again in
page faults when the next one is allocated: measured here at 2-4x the cost of the arithmetic on
such a block. PyTorch's CPU performance guide recommends jemalloc or tcmalloc for this reason;
distil instead raises glibc's mmap and trim thresholds with ``mallopt`` so those blocks are
reused. Peak memory is unchanged; the resident size no longer shrinks after a peak.

Set ``DISTIL_MALLOC_TUNING=0`` to leave the allocator alone.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys

from distil.errors import DistilError

log = logging.getLogger("distil")

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_applied = False


def tune_allocator() -> bool:
    """Raise glibc's malloc thresholds once per process; returns whether they were applied."""
    global _applied
    if _applied:
        return True
    if os.environ.get("DISTIL_MALLOC_TUNING", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, (1 << 31) - 1) == 1
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to tune
        return False
    _applied = ok
    return ok


def set_threads(threads: int | None = None) -> int | None:
    """Torch's intra-op threads: ``threads`` (``train.threads``), else ``$DISTIL_NUM_THREADS``, else
    torch's default (one per core). On a shared machine fewer threads than cores can be much faster:
    a 2-thread run on 2 busy cores spends its time waiting for the slower thread (docs/training.md)."""
    if threads is None:
        raw = os.environ.get("DISTIL_NUM_THREADS", "").strip()
        if not raw:
            return None
        if not raw.isdigit() or int(raw) < 1:
            raise DistilError(f"DISTIL_NUM_THREADS = {raw!r} should be a whole number >= 1")
        threads = int(raw)
    import torch

    torch.set_num_threads(threads)
    log.info("torch threads: %d", threads)
    return threads
