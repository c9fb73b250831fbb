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
import os
import shutil
import socket
import time
from pathlib import Path

from distil.errors import DistilError
from distil.fsutil import FILE_MODE, atomic_write_text


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


# -- the state of a run folder, and its lock -------------------------------------------------------

LOCK_FILE = ".lock"


def run_state(path: str | Path) -> str:
    """``absent`` (no folder, or an empty one), ``complete`` (summary.json), ``resumable`` (a
    checkpoint), ``unstarted`` (a run folder killed before its first checkpoint: config.yaml and
    nothing to resume) or ``foreign`` (a folder that is not a distil run)."""
    path = Path(path)
    if not path.is_dir() or not any(p for p in path.iterdir() if p.name != LOCK_FILE):
        return "absent"
    if (path / "summary.json").is_file():
        return "complete"
    steps = path / "checkpoints"
    if steps.is_dir() and any(p.is_dir() and p.name.startswith("step_") and not p.name.endswith(".tmp")
                              for p in steps.iterdir()):
        return "resumable"
    return "unstarted" if (path / "config.yaml").is_file() else "foreign"


def remove_stale_temps(path: Path) -> list[Path]:
    """Remove the temporary files and folders a killed writer left (``.<name>.<random>.tmp``,
    ``.<name>.old``) in the run folder, its checkpoints and plots; returns what was removed."""
    stale = []
    for folder in (path, path / "checkpoints", path / "plots"):
        if folder.is_dir():
            stale += [p for p in folder.iterdir() if p.name.startswith(".") and p.name.endswith((".tmp", ".old"))]
    for p in stale:
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    return stale


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


class RunLock:
    """``<run>/.lock`` holding the owner's pid and host: one live process per run folder.

    A lock whose process is gone (a killed run) is stale and is taken over."""

    def __init__(self, folder: Path):
        self.file = Path(folder) / LOCK_FILE
        self.held = False

    def holder(self) -> dict | None:
        """The live process holding the folder (not this one), or None."""
        try:
            info = json.loads(self.file.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        pid = info.get("pid")
        if not isinstance(pid, int) or pid == os.getpid():
            return None
        if info.get("host") == socket.gethostname() and not _pid_alive(pid):
            return None  # stale: that process is gone
        return info

    def check(self) -> None:
        owner = self.holder()
        if owner is not None:
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner.get("time", 0)))
            raise DistilError(f"run folder {self.file.parent} is in use by process {owner['pid']} on "
                              f"{owner.get('host', '?')} (since {since}); wait for it to finish or use another "
                              "--run-dir")

    def acquire(self) -> RunLock:
        self.check()
        record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "time": time.time()})
        try:
            fd = os.open(self.file, os.O_CREAT | os.O_EXCL | os.O_WRONLY, FILE_MODE)
        except FileExistsError:  # stale (checked above): take it over
            atomic_write_text(self.file, record)
        else:
            with os.fdopen(fd, "w") as f:
                f.write(record)
        self.held = True
        return self

    def release(self) -> None:
        if self.held:
            try:
                if json.loads(self.file.read_text()).get("pid") == os.getpid():
                    self.file.unlink()
            except (OSError, json.JSONDecodeError):
                pass
            self.held = False
