"""Teachers: one small protocol (teachers/base.py), five kinds.

    teacher = load_teacher("path/or/model.gguf")          # ModelTeacher (distil's model) or HFTeacher
    teacher = MemoTeacher(model)                          # a ModelTeacher remembering its outputs
    teacher = CacheTeacher.open(cfg, tokenizer, data)     # top-k read from disk with each batch
    teacher = ApiTeacher.from_config(cfg.api, tok)    # top-k from an OpenAI-compatible endpoint
    teacher = build_teacher(cfg, tokenizer, data, device) # whichever the config names

    signal = teacher.signal(batch, Request("topk", k=64, temperature=1.0))

Each says what it ``gives`` ("head", "logits", "topk"); the loss picks its request once at setup.
"""

from distil.teachers.api import ApiTeacher
from distil.teachers.base import SIGNALS, Request, Teacher
from distil.teachers.build import build_teacher
from distil.teachers.cache import CacheTeacher
from distil.teachers.memo import MemoTeacher
from distil.teachers.model import DTYPES, HFTeacher, ModelTeacher, load_teacher

__all__ = ["SIGNALS", "ApiTeacher", "CacheTeacher", "DTYPES", "HFTeacher", "MemoTeacher", "ModelTeacher", "Request",
           "Teacher", "build_teacher", "load_teacher"]
