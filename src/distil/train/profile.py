"""Where a training step's time and memory go (``distil train --profile``, ``train.profile: true``).

    profile = StepProfile(device)
    with profile.phase("teacher"):
        signal = teacher.signal(batch, request)
    profile.report(floor)          # a table: seconds per step, share of the step, peak memory per phase

The training loop marks its phases: ``data`` (the next batch; rollouts sample here), ``student``
(the student's forward pass to its last hidden states), ``teacher`` (the teacher's signal: forward
pass, cache read or API answer), ``loss`` (head and loss, fused and chunked), ``backward``,
``optimizer`` (clipping and the AdamW step), ``validation`` and ``checkpoint``.

Memory: the peak resident set size (RSS) of the process during each phase. On Linux the kernel's
high-water mark (``VmHWM``) is reset at the start of each phase (``/proc/self/clear_refs``), so each
phase's peak is its own; elsewhere the running peak is all there is. On CUDA also the peak memory
allocated by torch in each phase. Time: wall seconds per phase (CUDA synchronised at the edges),
counted from the second step on (the first step warms up allocators and kernels).

The floor is what the run's state needs at the least: the process before any model was loaded
(Python, torch and its libraries), the teacher's weights, the student's weights with their gradients
and AdamW's two moments, and the loss's two ``[chunk x vocabulary]`` fp32 blocks (student and
teacher scores of one chunk). Activations are not in it: they grow with the batch.

Profiling only measures: a run's losses are the same with it and without (tests/test_profile.py).
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from collections import defaultdict
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch

PHASES = ("data", "student", "teacher", "loss", "backward", "optimizer", "validation", "checkpoint")
GB = 2**30


def no_phase(name: str):
    """The loop's phase marker when nothing is profiled."""
    return nullcontext()


def current_rss() -> int:
    """The process's resident set size now, in bytes."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return peak_rss()


def peak_rss() -> int:
    """The process's peak resident set size since the last reset (Linux) or its start, in bytes."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def reset_peak_rss() -> bool:
    """Restart the peak RSS from the current RSS; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@dataclass
class Floor:
    """The least memory the run's state needs, in bytes, by part."""

    runtime: int  # the process before any model was loaded
    teacher: int  # the teacher's weights
    student: int  # weights, gradients and AdamW's two moments of the trained ones
    loss: int  # two [chunk x vocabulary] fp32 blocks

    @property
    def total(self) -> int:
        return self.runtime + self.teacher + self.student + self.loss


def state_floor(runtime: int, teacher_model, student, chunk: int, vocab: int) -> Floor:
    def size(params):
        return sum(p.numel() * p.element_size() for p in params)

    teacher = size(teacher_model.parameters()) if teacher_model is not None else 0
    trained = [p for p in student.parameters() if p.requires_grad]
    frozen = [p for p in student.parameters() if not p.requires_grad]
    return Floor(runtime, teacher, 4 * size(trained) + size(frozen), 2 * chunk * vocab * 4)


class StepProfile:
    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.seconds: dict[str, float] = defaultdict(float)
        self.peak: dict[str, int] = defaultdict(int)
        self.cuda_peak: dict[str, int] = defaultdict(int)
        self.per_phase_peaks = reset_peak_rss()
        self.steps = 0  # timed steps (the second on)
        self.timing = False

    def step_done(self) -> None:
        """Call after each optimizer step: time is counted from the second step on."""
        if self.timing:
            self.steps += 1
        self.timing = True

    @contextmanager
    def phase(self, name: str):
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        reset_peak_rss()
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.cuda:
                torch.cuda.synchronize(self.device)
                self.cuda_peak[name] = max(self.cuda_peak[name], torch.cuda.max_memory_allocated(self.device))
            if self.timing or name in ("validation", "checkpoint"):
                self.seconds[name] += time.perf_counter() - start
            self.peak[name] = max(self.peak[name], peak_rss())

    def summary(self, floor: Floor) -> dict:
        steps = max(self.steps, 1)
        in_step = [p for p in PHASES if p not in ("validation", "checkpoint")]
        step_seconds = sum(self.seconds[p] for p in in_step) / steps
        phases = {}
        for name in PHASES:
            if name not in self.peak:
                continue
            per_step = self.seconds[name] / steps if name in in_step else None
            phases[name] = {"seconds_per_step": per_step,
                            "share_of_step": per_step / step_seconds if per_step is not None and step_seconds else None,
                            "seconds_total": self.seconds[name], "peak_rss_bytes": self.peak[name]}
            if self.cuda:
                phases[name]["peak_cuda_allocated_bytes"] = self.cuda_peak[name]
        peak = max(self.peak.values(), default=0)
        return {"timed_steps": self.steps, "step_seconds": step_seconds, "phases": phases, "peak_rss_bytes": peak,
                "per_phase_peaks": self.per_phase_peaks,
                "floor_bytes": {"runtime": floor.runtime, "teacher": floor.teacher, "student": floor.student,
                                "loss": floor.loss, "total": floor.total},
                "peak_over_floor": peak / floor.total if floor.total else None}


def format_summary(summary: dict) -> str:
    """The summary as a Markdown table and two lines."""
    cuda = any("peak_cuda_allocated_bytes" in v for v in summary["phases"].values())
    head = "| phase | s/step | share of step | peak RSS GB |" + (" peak CUDA allocated GB |" if cuda else "")
    lines = [head, "|---|---|---|---|" + ("---|" if cuda else "")]
    for name, v in summary["phases"].items():
        per_step = f"{v['seconds_per_step']:.3f}" if v["seconds_per_step"] is not None else \
            f"{v['seconds_total']:.2f} s in all"
        share = f"{100 * v['share_of_step']:.1f}%" if v["share_of_step"] is not None else "-"
        row = f"| {name} | {per_step} | {share} | {v['peak_rss_bytes'] / GB:.2f} |"
        if cuda:
            row += f" {v['peak_cuda_allocated_bytes'] / GB:.2f} |"
        lines.append(row)
    f = summary["floor_bytes"]
    lines.append(f"\nstep: {summary['step_seconds']:.3f} s (mean of {summary['timed_steps']} steps after the first); "
                 f"peak RSS {summary['peak_rss_bytes'] / GB:.2f} GB"
                 + ("" if summary["per_phase_peaks"] else " (per-phase peaks unavailable here: running peaks)"))
    lines.append(f"floor {f['total'] / GB:.2f} GB = runtime {f['runtime'] / GB:.2f} + teacher weights "
                 f"{f['teacher'] / GB:.2f} + student weights, gradients and AdamW {f['student'] / GB:.2f} + loss "
                 f"chunks {f['loss'] / GB:.2f}; peak / floor = {summary['peak_over_floor']:.2f}x")
    return "\n".join(lines)


def profile_json(summary: dict) -> str:
    return json.dumps(summary, indent=2) + "\n"
