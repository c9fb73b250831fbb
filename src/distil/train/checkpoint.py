"""Training checkpoints: written atomically every N steps and at the end, the last K kept.

    save_checkpoint(run.checkpoints, step, model, optimizer, extra={...}, keep=2)
    latest = latest_checkpoint(run.checkpoints)       # Path or None
    state = load_checkpoint(latest, model, optimizer)  # returns `extra`

A checkpoint is a directory ``step_00000100/`` holding the model in distil's native format
(``config.json`` + ``model.safetensors``, loadable with ``distil.models.load``) and
``trainer.pt`` (optimizer, data position, RNG states, spike-guard state, step history). It is
built under a temporary name, fsynced and renamed, so a kill at any moment leaves either the
previous checkpoint or the new one, never half of one.
"""

from __future__ import annotations

import errno
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from distil.errors import DistilError
from distil.fsutil import atomic_dir
from distil.models.io import load_state, read_safetensors, save_file_state

STEP_DIR = re.compile(r"^step_(\d{8})$")


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoints(folder: Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if p.is_dir() and STEP_DIR.match(p.name)), key=lambda p: p.name)


def latest_checkpoint(folder: Path) -> Path | None:
    found = checkpoints(folder)
    return found[-1] if found else None


def save_checkpoint(folder: Path, step: int, model, optimizer_state: dict, *, extra: dict, keep: int = 2,
                    tokenizer=None, model_state: dict | None = None) -> Path:
    """``optimizer_state`` is ``optimizer.state_dict()`` (or a full DCP state dict under FSDP, with
    ``model_state`` the gathered full model state dict)."""
    target = Path(folder) / f"step_{step:08d}"
    with atomic_dir(target, overwrite=True) as tmp:
        save_file_state(model, tmp, model_state)
        try:
            torch.save({"optimizer": optimizer_state, "rng": rng_state(), **extra}, tmp / "trainer.pt")
        except RuntimeError as e:  # torch reports a failed write (a full disk) as "enforce fail at inline_container"
            if "PytorchStreamWriter" not in str(e) and "inline_container" not in str(e):
                raise
            full = shutil.disk_usage(tmp).free < (64 << 20)
            raise OSError(errno.ENOSPC if full else errno.EIO, "could not write the checkpoint",
                          str(tmp / "trainer.pt")) from None
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    for old in checkpoints(folder)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return target


def read_checkpoint(path: Path) -> tuple[dict, dict]:
    """(model state dict, trainer state) of a checkpoint directory; RNG states are restored."""
    path = Path(path)
    if not (path / "trainer.pt").is_file() or not (path / "model.safetensors").is_file():
        raise DistilError(f"checkpoint {path} is incomplete (model.safetensors or trainer.pt missing)")
    model_state = read_safetensors(path / "model.safetensors")
    try:
        state = torch.load(path / "trainer.pt", map_location="cpu", weights_only=False)
    except Exception as e:
        raise DistilError(f"checkpoint {path / 'trainer.pt'} is corrupt or unreadable: {e}") from e
    set_rng_state(state.pop("rng"))
    return model_state, state


def load_checkpoint(path: Path, model, optimizer) -> dict:
    """Load model and optimizer in place (unsharded model); returns the rest of the trainer state."""
    model_state, state = read_checkpoint(path)
    load_state(model, model_state, source=str(path))
    optimizer.load_state_dict(state.pop("optimizer"))
    return state
