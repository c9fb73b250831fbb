"""What a training run's resident memory is made of: bytes in use against what glibc's heap holds.

    python benchmarks/heap_account.py benchmarks/profile_smollm2.yaml --run-dir /tmp/heap
    python benchmarks/heap_account.py benchmarks/profile_demo.yaml --set teacher.source=cache --run-dir /tmp/heap-demo

Runs ``distil train <args> --profile`` in this process while a thread samples, every 2 ms, glibc's
own count of bytes in use (``mallinfo2``: ordinary blocks plus mmapped ones), the size of what it
holds from the OS (arena plus mmapped) and the kernel's resident set (anonymous and file pages).
Per phase of the loop (setup, then the ``--profile`` phases) it prints the peaks and the makeup of
the resident set at its peak. The gap between "in use" and "heap" is memory freed by torch that
glibc keeps (distil raises its thresholds, distil/runtime.py); the gap between "heap" and
"RSS anon" is memory outside malloc (Python's own arenas, thread stacks). Linux with glibc only.
"""

from __future__ import annotations

import ctypes
import sys
import threading
import time


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]


def _status() -> dict:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS", "RssAnon", "RssFile")):
                out[line.split(":")[0]] = int(line.split()[1]) * 1024
    return out


def main() -> None:
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2
    phase = ["setup"]
    peaks: dict[str, dict] = {}

    def sample() -> None:
        while True:
            info = libc.mallinfo2()
            in_use, held = info.uordblks + info.hblkhd, info.arena + info.hblkhd
            status = _status()
            p = peaks.setdefault(phase[0], {"in use": 0, "heap": 0, "VmRSS": 0})
            p["in use"], p["heap"] = max(p["in use"], in_use), max(p["heap"], held)
            if status["VmRSS"] > p["VmRSS"]:
                p.update(status)
            time.sleep(0.002)

    import distil.train.profile as profile

    original = profile.StepProfile.phase

    def labelled(self, name):
        phase[0] = name
        return original(self, name)

    profile.StepProfile.phase = labelled
    threading.Thread(target=sample, daemon=True).start()
    from distil.cli import main as distil_main

    sys.argv = ["distil", "train", *sys.argv[1:], "--profile"]
    try:
        distil_main()
    except SystemExit as exit:
        if exit.code:
            raise
    time.sleep(0.01)
    print("\n| phase | malloc in use, peak (GB) | glibc heap, peak (GB) | RSS peak (GB) | of it anonymous | of it file |")
    print("|---|---|---|---|---|---|")
    for name, p in peaks.items():
        print(f"| {name} | {p['in use'] / 1e9:.2f} | {p['heap'] / 1e9:.2f} | {p['VmRSS'] / 1e9:.2f} | "
              f"{p.get('RssAnon', 0) / 1e9:.2f} | {p.get('RssFile', 0) / 1e9:.2f} |")


if __name__ == "__main__":
    main()
