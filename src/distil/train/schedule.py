"""Learning-rate schedules as multipliers of the peak LR: warmup then cosine, WSD, or constant."""

from __future__ import annotations

import math


def lr_multiplier(step: int, *, total_steps: int, warmup_steps: int, schedule: str, min_ratio: float,
                  decay_fraction: float = 0.2) -> float:
    """Multiplier for optimizer step ``step`` (0-based)."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "wsd":  # warmup-stable-decay: flat, then a linear decay over the last decay_fraction
        decay_steps = max(1, round(total_steps * decay_fraction))
        decay_start = total_steps - decay_steps
        if step < decay_start:
            return 1.0
        progress = min(1.0, (step - decay_start) / decay_steps)
        return 1.0 - (1.0 - min_ratio) * progress
    raise ValueError(f"unknown schedule {schedule!r}")
