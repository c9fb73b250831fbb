"""Setup: the configured teacher, built once.

    teacher = build_teacher(cfg, tokenizer, data, device)   # None when nothing is distilled
"""

from __future__ import annotations

import logging

from distil.config import Config
from distil.data.alignment import TokenizerPair
from distil.data.tokenize import load_tokenizer
from distil.teachers.api import ApiTeacher
from distil.teachers.base import Teacher
from distil.teachers.cache import CacheTeacher
from distil.teachers.cross import CrossTokenizerTeacher
from distil.teachers.model import load_teacher

log = logging.getLogger("distil")


def build_teacher(cfg: Config, tokenizer, data, device, *, model_teacher: Teacher | None = None) -> Teacher | None:
    """``teacher.source`` made into a teacher; ``model_teacher`` is one loaded (or passed in) already."""
    if cfg.loss.kd_weight == 0 or cfg.teacher.source == "none":
        return None
    if cfg.teacher.source == "cache":
        return CacheTeacher.open(cfg, tokenizer, data)
    if cfg.teacher.source == "api":
        return ApiTeacher.from_config(cfg.api, tokenizer)
    teacher = model_teacher or load_teacher(cfg.teacher.path, dtype=cfg.teacher.dtype, device=device)
    cross = cfg.loss.cross_tokenizer
    if cross.mode != "off" and not isinstance(teacher, CrossTokenizerTeacher):
        pair = TokenizerPair(tokenizer, load_tokenizer(cross.teacher_tokenizer or cfg.teacher.path))
        if pair.identical:
            log.info("loss.cross_tokenizer: the teacher's tokenizer is the student's; the ordinary loss")
        else:
            teacher = CrossTokenizerTeacher(teacher, pair, merge=cross.merge)
            log.info("loss.cross_tokenizer %s: %d of the teacher's %d vocabulary entries have the student's bytes",
                     cross.mode, len(teacher.matched[0]), teacher.vocab_size)
    return teacher.to(device)
