"""A teacher that computes each batch's outputs once: ``MemoTeacher(model)``.

    teacher = MemoTeacher(trained_model, name="demo teacher")
    train(cfg_forward_kl, teacher=teacher, ...)   # the teacher runs on these batches ...
    train(cfg_reverse_kl, teacher=teacher, ...)   # ... and this run reads the remembered outputs
"""

from __future__ import annotations

import hashlib

from distil.teachers.model import ModelTeacher


class MemoTeacher(ModelTeacher):
    """A distil model teacher remembering its outputs per batch (keyed by the input ids' hash).

    When several students train on the same batches in the same order and validate on the same
    windows (the demos' CE / forward KL / reverse KL students and hybrids), each teacher forward
    is computed once and reused; the results are identical. Bounded by ``max_bytes``.
    """

    def __init__(self, model, *, max_bytes: int = 2 << 30, name: str = "demo teacher"):
        super().__init__(model, name=name)
        self._memo: dict = {}
        self._bytes, self.max_bytes = 0, max_bytes

    def _cached(self, kind: str, compute, input_ids, doc_ids, positions):
        if doc_ids is not None or positions is not None:
            return compute(input_ids, doc_ids, positions)
        key = (kind, tuple(input_ids.shape), hashlib.sha1(input_ids.cpu().numpy().tobytes()).hexdigest())
        if key not in self._memo:
            value = compute(input_ids, doc_ids, positions)
            if self._bytes + value.nbytes > self.max_bytes:
                return value
            self._memo[key] = value
            self._bytes += value.nbytes
        return self._memo[key]

    def head_inputs(self, input_ids, doc_ids=None, positions=None):
        hidden = self._cached("hidden", lambda *a: super(MemoTeacher, self).head_inputs(*a)[0], input_ids, doc_ids,
                              positions)
        return hidden, self.model.lm_head.weight, None

    def logits(self, input_ids, doc_ids=None, positions=None):
        return self._cached("logits", super().logits, input_ids, doc_ids, positions)
