"""Process-level tuning applied when distil is imported.

On Linux with glibc, freed blocks above a size threshold go straight back to the OS, so every
large temporary tensor (a [chunk x vocab] block of the loss, an activation) is paid for again in
page faults when the next one is allocated: measured here at 2-4x the cost of the arithmetic on
such a block. PyTorch's CPU performance guide recommends jemalloc or tcmalloc for this reason;
distil instead raises glibc's mmap and trim thresholds with ``mallopt`` so those blocks are
reused. The resident size no longer shrinks after a peak, and freed blocks that no later
request fits stay resident too: on the issue-29 training run (docs/benchmarks.md, "Memory
account") the tuning made steps 25% faster and the peak 12% higher (2.16 against 1.92 GB).

Set ``DISTIL_MALLOC_TUNING=0`` to leave the allocator alone.

Threads on a shared machine: torch runs one OpenMP thread per core, and each parallel op waits
for its slowest thread. When another process takes a core, the thread that shares it is
descheduled for whole scheduler slices while the others spin at the barrier: on 2 cores with one
competing process a training step took 2.6-3.3x, an on-policy step 2.6x its quiet time
(docs/benchmarks.md). Unless the thread count is set (``train.threads``, ``$DISTIL_NUM_THREADS``
or ``$OMP_NUM_THREADS``), :class:`ThreadGovernor` watches how much CPU *other* processes use
(``/proc/stat`` less this process and its children) and runs torch on the cores they leave free,
back up to one per core when they finish. The training loop, evaluation and sampling call
:func:`adapt_threads` between ops; it looks at most once a second.
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
import sys
import time
from pathlib import Path

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
    """Torch's intra-op threads: ``threads`` (``train.threads``), else ``$DISTIL_NUM_THREADS`` (a
    number, ``auto`` or ``torch``), else ``auto``: one per core while the machine is otherwise idle,
    the free cores while other processes run (:class:`ThreadGovernor`). ``$OMP_NUM_THREADS`` counts
    as a choice too. Returns the fixed count, or None when the count follows the load."""
    global _governor
    raw = os.environ.get("DISTIL_NUM_THREADS", "").strip().lower()
    if threads is None and raw and raw not in ("auto", "torch"):
        if not raw.isdigit() or int(raw) < 1:
            raise DistilError(f"DISTIL_NUM_THREADS = {raw!r} should be a whole number >= 1, auto or torch")
        threads = int(raw)
    import torch

    if threads is not None:
        _governor = None
        torch.set_num_threads(threads)
        log.debug("torch threads: %d (fixed)", threads)
        return threads
    if raw == "torch" or os.environ.get("OMP_NUM_THREADS") or not Path("/proc/stat").exists():
        _governor = None  # torch's own count, fixed: what distil did before the governor
        return None
    if _governor is None:
        _governor = ThreadGovernor(max(1, os.cpu_count() or 1))
        log.debug("torch threads: up to %d, fewer while other processes use the cores", _governor.max_threads)
    return None


def threads_follow_load() -> bool:
    """Whether the thread count follows the machine's load (no count was set)."""
    return _governor is not None


def adapt_threads() -> None:
    """Follow the load (at most once a second; a no-op when the thread count is fixed)."""
    if _governor is not None:
        _governor.poll()


def _cpu_seconds() -> tuple[float, float]:
    """(busy seconds of all cores, CPU seconds of this process and its live children) so far."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    jiffies = [int(x) for x in fields[:8]]  # user nice system idle iowait irq softirq steal
    hz = os.sysconf("SC_CLK_TCK")
    busy = (sum(jiffies) - jiffies[3] - jiffies[4]) / hz
    own = sum(os.times()[:2])
    for task in Path("/proc/self/task").iterdir():  # DataLoader workers and the like are ours too
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        for pid in children:
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
            except OSError:
                continue
            utime, stime = stat.rsplit(")", 1)[1].split()[11:13]
            own += (int(utime) + int(stime)) / hz
    return busy, own


class ThreadGovernor:
    """Torch threads = the cores other processes leave free (at least 1, at most ``max_threads``).

    Every ``interval`` seconds: ``others`` = cores' busy time less this process's (and its
    children's) CPU time, per second of wall time. A thread is given up once others use more than
    ``margin`` of a core (a competitor starved by spinning threads still shows ~0.6 core), and
    taken back when they stop. ``read`` returns (busy seconds, own seconds): tests pass their own.
    """

    def __init__(self, max_threads: int, *, interval: float = 1.0, margin: float = 0.3, read=_cpu_seconds,
                 clock=time.monotonic):
        self.max_threads, self.interval, self.margin = max_threads, interval, margin
        self.read, self.clock = read, clock
        self.threads = max_threads
        self.others = 0.0
        self._warned = False
        self._last = (self.clock(), *self.read())

    def poll(self) -> int:
        now = self.clock()
        if now - self._last[0] < self.interval:
            return self.threads
        busy, own = self.read()
        wall = now - self._last[0]
        self.others = max(0.0, ((busy - self._last[1]) - (own - self._last[2])) / wall)
        self._last = (now, busy, own)
        wanted = max(1, min(self.max_threads, self.max_threads - math.ceil(self.others - self.margin)))
        if wanted != self.threads:
            self._apply(wanted)
        return self.threads

    def _apply(self, threads: int) -> None:
        import torch

        message = (f"other processes use {self.others:.1f} of {self.max_threads} cores: torch threads "
                   f"{self.threads} -> {threads}")
        if threads < self.threads and not self._warned:  # once a process, then as info
            self._warned = True
            log.warning("%s (set train.threads or DISTIL_NUM_THREADS=N to fix the count)", message)
        else:
            log.info(message)
        self.threads = threads
        torch.set_num_threads(threads)


_governor: ThreadGovernor | None = None


def available_memory(device) -> int:
    """Bytes that ``device`` can still give: free CUDA memory, or the machine's available RAM."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    import psutil

    return int(psutil.virtual_memory().available)
