"""Setup: the configured teacher, built once.

    teacher = build_teacher(cfg, tokenizer, data, device)   # None when nothing is distilled
"""

from __future__ import annotations

from distil.config import Config
from distil.teachers.api import ApiTeacher
from distil.teachers.base import Teacher
from distil.teachers.cache import CacheTeacher
from distil.teachers.model import load_teacher


def build_teacher(cfg: Config, tokenizer, data, device, *, model_teacher: Teacher | None = None) -> Teacher | None:
    """``teacher.source`` made into a teacher; ``model_teacher`` is one loaded (or passed in) already."""
    if cfg.loss.kd_weight == 0 or cfg.teacher.source == "none":
        return None
    if cfg.teacher.source == "cache":
        return CacheTeacher.open(cfg, tokenizer, data)
    if cfg.teacher.source == "api":
        return ApiTeacher.from_config(cfg.api, tokenizer)
    teacher = model_teacher or load_teacher(cfg.teacher.path, dtype=cfg.teacher.dtype, device=device)
    return teacher.to(device)
