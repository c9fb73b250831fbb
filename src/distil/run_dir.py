"""The run folder ``runs/<name>/``: config, metrics, checkpoints, report and plots.

    run = RunDir.create("runs/debug", overwrite=False)
    run.log(step=10, tokens=20480, split="train", name="loss", value=3.2)
    run.mark_complete({"final_val_loss": 2.9})

``metrics.jsonl`` holds one JSON object per line with step, tokens, split, name, value and time.
A run is complete only once ``summary.json`` exists (written atomically at the very end), so a
run that was killed half-way never looks complete. An existing run is never overwritten unless
the caller asks.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from distil.errors import DistilError
from distil.fsutil import atomic_write_text


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.metrics_path = self.path / "metrics.jsonl"
        self.checkpoints = self.path / "checkpoints"
        self.plots = self.path / "plots"
        self.summary_path = self.path / "summary.json"
        self._metrics_file = None
        self._sinks: list = []  # optional TensorBoard / W&B writers, fed the same records

    def add_sinks(self, *, tensorboard: bool = False, wandb_project: str | None = None, config: dict | None = None) -> None:
        """Also send every metric to TensorBoard (``<run>/tensorboard``) and/or Weights & Biases."""
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise DistilError('output.tensorboard needs TensorBoard: pip install -e ".[tb]"') from e
            writer = SummaryWriter(str(self.path / "tensorboard"))
            self._sinks.append(("tensorboard", writer))
        if wandb_project:
            try:
                import wandb
            except ImportError as e:
                raise DistilError("output.wandb_project needs Weights & Biases: pip install wandb") from e
            self._sinks.append(("wandb", wandb.init(project=wandb_project, name=self.path.name, dir=str(self.path),
                                                    config=config or {}, resume="allow")))

    @classmethod
    def create(cls, path: str | Path, *, overwrite: bool = False, resume: bool = False) -> RunDir:
        run = cls(path)
        if run.path.exists() and any(run.path.iterdir()) and not resume:
            if not overwrite:
                raise DistilError(
                    f"run folder {run.path} already exists; choose another --run-dir or name, "
                    "or pass --overwrite (or --set output.overwrite=true) to replace it"
                )
            shutil.rmtree(run.path)
        run.checkpoints.mkdir(parents=True, exist_ok=True)
        run.plots.mkdir(parents=True, exist_ok=True)
        if run.summary_path.exists():
            run.summary_path.unlink()  # a resumed run is incomplete until it finishes again
        return run

    @property
    def complete(self) -> bool:
        return self.summary_path.is_file()

    def log(self, *, step: int, tokens: int, split: str, name: str, value: float) -> None:
        if self._metrics_file is None:
            self._metrics_file = self.metrics_path.open("a", encoding="utf-8")
        record = {"step": step, "tokens": tokens, "split": split, "name": name, "value": float(value), "time": time.time()}
        self._metrics_file.write(json.dumps(record) + "\n")
        self._metrics_file.flush()
        for kind, sink in self._sinks:
            if kind == "tensorboard":
                sink.add_scalar(f"{split}/{name}", float(value), step)
            else:
                sink.log({f"{split}/{name}": float(value), "tokens": tokens}, step=step)

    def close(self) -> None:
        if self._metrics_file is not None:
            self._metrics_file.close()
            self._metrics_file = None
        for kind, sink in self._sinks:
            if kind == "tensorboard":
                sink.flush()

    def truncate_metrics(self, step: int) -> None:
        """Drop records after ``step`` (a resumed or rolled-back run repeats those steps)."""
        self.close()
        if not self.metrics_path.is_file():
            return
        kept = [json.dumps(r) for r in read_metrics(self.metrics_path) if r["step"] <= step]
        atomic_write_text(self.metrics_path, "".join(line + "\n" for line in kept))

    def write_text(self, relative: str, text: str) -> Path:
        target = self.path / relative
        atomic_write_text(target, text)
        return target

    def mark_complete(self, summary: dict) -> None:
        self.close()
        for kind, sink in self._sinks:
            sink.close() if kind == "tensorboard" else sink.finish()
        self._sinks = []
        atomic_write_text(self.summary_path, json.dumps({"complete": True, **summary}, indent=2))


def read_metrics(path: str | Path) -> list[dict]:
    """Records of a metrics.jsonl; a torn last line (a killed writer) is skipped."""
    records = []
    path = Path(path)
    if not path.is_file():
        return records
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records
