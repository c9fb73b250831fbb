"""Crash-safe file writing, and where distil keeps its caches.

Everything is written to a temporary name, fsynced, then renamed: a reader sees either the old
file or the complete new one, never half of it.

Caches (token files, API answers, converted GGUFs) live under ``cache_dir()``:
``$DISTIL_CACHE_DIR``, else ``~/.cache/distil``. A cache setting left at its default
(``~/.cache/distil/...``) follows ``$DISTIL_CACHE_DIR`` (``cache_path``).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

DEFAULT_CACHE = "~/.cache/distil"


def _read_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# Temporary names come from mkstemp / mkdtemp (0600 / 0700); the final file or folder gets the mode
# a file written normally would have, so others on a shared machine can read reports and models.
UMASK = _read_umask()
FILE_MODE = 0o666 & ~UMASK
DIR_MODE = 0o777 & ~UMASK


@contextlib.contextmanager
def cache_lock(path: str | Path) -> Iterator[None]:
    """Hold ``<path>.lock`` while building a cache entry, so that two processes that want the same
    entry at once (two runs, or two test workers) build it once: the second waits, then finds it."""
    from filelock import FileLock

    make_parents(Path(path))
    with FileLock(f"{path}.lock"):
        yield


def cache_dir() -> Path:
    """Where distil keeps derived files: ``$DISTIL_CACHE_DIR``, else ``~/.cache/distil``."""
    return Path(os.environ.get("DISTIL_CACHE_DIR") or DEFAULT_CACHE).expanduser()


def cache_path(setting: str | Path) -> Path:
    """A cache location from a setting: one under the default ``~/.cache/distil`` moves with
    ``$DISTIL_CACHE_DIR``; any other path is taken as given (``~`` expanded)."""
    text = str(setting)
    if text == DEFAULT_CACHE or text.startswith(DEFAULT_CACHE + "/"):
        return cache_dir() / text[len(DEFAULT_CACHE) :].lstrip("/")
    return Path(text).expanduser()


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - some filesystems do not allow opening dirs
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def make_parents(path: Path) -> None:
    """``mkdir -p`` of ``path``'s parent; a file in the way is a NotADirectoryError naming it."""
    first_missing(path.parent)
    path.parent.mkdir(parents=True, exist_ok=True)


def first_missing(path: Path) -> Path | None:
    """The top-most folder of ``path`` (itself included) that does not exist yet; a file in the way
    is a NotADirectoryError naming it."""
    top = None
    for candidate in (path, *path.parents):
        if candidate.is_dir():
            return top
        if candidate.exists() and not candidate.is_dir():  # re-checked: another thread may have just made it
            raise NotADirectoryError(errno.ENOTDIR, "not a folder", str(candidate))
        top = candidate
    return top


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success fsync it and rename it into place."""
    path = Path(path)
    make_parents(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp)
    os.chmod(tmp, FILE_MODE)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


@contextlib.contextmanager
def atomic_dir(path: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Build a directory under a temporary name and rename it to ``path`` when complete.

    An existing ``path`` is replaced only with ``overwrite``; it stays intact until the new one is
    complete.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(errno.EEXIST, "already exists", str(path))
    make_parents(path)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    os.chmod(tmp, DIR_MODE)
    try:
        yield tmp
        for child in tmp.rglob("*"):
            if child.is_file():
                os.chmod(child, FILE_MODE)  # some writers (safetensors) make their files 0600
                with open(child, "rb") as f:
                    os.fsync(f.fileno())
            elif child.is_dir():
                os.chmod(child, DIR_MODE)
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
