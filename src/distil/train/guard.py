"""The spike guard: skip non-finite steps; roll back and lower the LR after a sustained spike.

    guard = SpikeGuard(factor=3.0, patience=3, window=50, lr_factor=0.5)
    action = guard.check(loss, grad_norm)   # "ok" | "skip" | "rollback"

* A non-finite loss or gradient norm: the step is skipped (no optimizer update) and counted.
* A loss above ``factor`` times the running median of the last ``window`` good losses for
  ``patience`` consecutive steps: the trainer rolls back to the last good checkpoint and multiplies
  the learning rate by ``lr_factor`` (kept in ``lr_scale``).

Why: a 45/50 hybrid run in the source lab report had loss spikes that never recovered, always at
the same step. The guard's state is part of every checkpoint.
"""

from __future__ import annotations

import math
from collections import deque
from statistics import median


class SpikeGuard:
    def __init__(self, *, factor: float = 3.0, patience: int = 3, window: int = 50, lr_factor: float = 0.5,
                 min_history: int = 5):
        self.factor, self.patience, self.window, self.lr_factor = factor, patience, window, lr_factor
        self.min_history = min_history
        self.history: deque[float] = deque(maxlen=window)
        self.consecutive = 0
        self.lr_scale = 1.0
        self.skipped = 0
        self.rollbacks = 0

    def check(self, loss: float, grad_norm: float) -> str:
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            self.skipped += 1
            return "skip"
        if self.factor > 0 and len(self.history) >= self.min_history and loss > self.factor * median(self.history):
            self.consecutive += 1
            if self.consecutive >= self.patience:
                self.consecutive = 0
                self.rollbacks += 1
                self.lr_scale *= self.lr_factor
                return "rollback"
            return "ok"  # a spike, not yet sustained: the step stands, the history ignores it
        self.consecutive = 0
        self.history.append(loss)
        return "ok"

    def state_dict(self) -> dict:
        return {"history": list(self.history), "consecutive": self.consecutive, "lr_scale": self.lr_scale,
                "skipped": self.skipped, "rollbacks": self.rollbacks}

    def load_state_dict(self, state: dict, *, keep_lr_scale: bool = False) -> None:
        self.history = deque(state["history"], maxlen=self.window)
        self.consecutive = state["consecutive"]
        if not keep_lr_scale:
            self.lr_scale = state["lr_scale"]
        self.skipped, self.rollbacks = state["skipped"], max(self.rollbacks, state["rollbacks"])

    def rolled_back(self, state: dict) -> None:
        """The run went back to a checkpoint taken with ``state``: its history, the current LR scale
        and the rollback count (which the checkpoint predates) are kept."""
        self.load_state_dict(state, keep_lr_scale=True)
