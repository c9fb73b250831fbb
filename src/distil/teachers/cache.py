"""A teacher read from a top-k cache on disk (``distil cache-teacher`` / ``import-logprobs``).

    teacher = CacheTeacher.open(cfg, tokenizer, data)   # checked against the data and the loss
    batches = CacheBatchSource(teacher.cache, ...)      # puts each batch's top-k in batch["teacher_topk"]
    ids, logprobs, tail = teacher.signal(batch, Request("topk", k=teacher.k))

The top-k comes with the batch: DataLoader workers decode the cache beside training, so the
teacher itself only hands on what the batch source read.
"""

from __future__ import annotations

from distil.data.teacher_cache import TeacherCache, tokens_sha256
from distil.data.tokenize import tokenizer_hash
from distil.errors import DistilError
from distil.teachers.base import Request


class CacheTeacher:
    gives = ("topk",)
    carries_state = False

    def __init__(self, cache: TeacherCache):
        self.cache = cache
        self.name = str(cache.path)
        self.k = cache.settings.k

    @property
    def vocab_size(self) -> int:
        return self.cache.settings.vocab_size

    @classmethod
    def open(cls, cfg, tokenizer, data) -> CacheTeacher:
        """The configured cache, checked against the data and loss (errors name both sides)."""
        cache = TeacherCache(cfg.teacher.cache)
        cross = cache.settings.teacher_tokenizer_hash is not None
        if cross and cfg.loss.cross_tokenizer.mode == "off":
            raise DistilError(f"the cache {cache.path} is in the teacher's own tokenizer (a cross-tokenizer cache): set "
                              "loss.cross_tokenizer.mode to hybrid or uld to train from it")
        if cross and not (cache.path / "teacher_tokenizer").is_dir():
            raise DistilError(f"the cross-tokenizer cache {cache.path} lacks its teacher_tokenizer/ folder")
        if not cross and cfg.loss.topk and cfg.loss.topk != cache.settings.k:
            raise DistilError(f"loss.topk = {cfg.loss.topk} but the cache {cache.path} holds k = {cache.settings.k}; "
                              "unset loss.topk or write a cache with that k")
        cache.check_against(tokenizer_hash=tokenizer_hash(tokenizer), temperature=cfg.loss.temperature,
                            seq_len=cfg.data.seq_len, num_sequences=len(data.train_windows),
                            document_attention=cfg.data.document_attention,
                            windows_sha256=lambda: tokens_sha256(data.train_windows))
        return cls(cache)

    def to(self, device) -> CacheTeacher:
        return self

    def close(self) -> None:
        pass

    def signal(self, batch: dict, request: Request, stream: dict | None = None):
        assert request.kind == "topk" and request.k == self.k, request
        return batch["teacher_topk"]
