"""Setup: the configured teacher, built once.

    teacher = build_teacher(cfg, tokenizer, data, device)   # None when nothing is distilled
"""

from __future__ import annotations

import logging

from distil.config import Config
from distil.data.alignment import TokenizerPair
from distil.data.tokenize import load_tokenizer, tokenizer_hash
from distil.errors import DistilError
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
        teacher = CacheTeacher.open(cfg, tokenizer, data)
        if teacher.cache.settings.teacher_tokenizer_hash is None:
            return teacher
        teacher_tokenizer = load_tokenizer(teacher.cache.path / "teacher_tokenizer")
        if tokenizer_hash(teacher_tokenizer) != teacher.cache.settings.teacher_tokenizer_hash:
            raise DistilError(f"{teacher.cache.path / 'teacher_tokenizer'} is not the tokenizer the cache was written "
                              "with (its hash differs from the manifest's)")
        pair = TokenizerPair(tokenizer, teacher_tokenizer)
        return CrossTokenizerTeacher(teacher, pair, merge=cfg.loss.cross_tokenizer.merge)
    if cfg.teacher.source == "api":
        cross = cfg.loss.cross_tokenizer
        if cross.mode == "off":
            return ApiTeacher.from_config(cfg.api, tokenizer)
        # The server's token strings map onto the teacher's vocabulary; its text offsets give the alignment.
        pair = TokenizerPair(tokenizer, load_tokenizer(cross.teacher_tokenizer))
        if pair.identical:
            return ApiTeacher.from_config(cfg.api, tokenizer)
        return CrossTokenizerTeacher(ApiTeacher.from_config(cfg.api, pair.teacher.tokenizer), pair, merge=cross.merge)
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
