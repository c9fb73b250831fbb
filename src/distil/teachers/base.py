"""The teacher protocol: what every teacher says it gives, and how the loss asks for it.

A teacher gives some of three signals, richest first:

* ``"head"``: (hidden [batch, seq, H], LM-head weight [V, H], bias or None). The fused loss takes
  the teacher's head product chunk by chunk, so its logits are never held whole.
* ``"logits"``: [batch, seq, V].
* ``"topk"``: (ids [batch, seq, k] with -1 absent, log-probs [batch, seq, k], tail log-mass
  [batch, seq]), the log-probs at the request's temperature.

The loss decides at setup which one it needs (a ``Request``) and every step calls
``teacher.signal(batch, request, stream)``. ``stream`` is the carried-state dict of stream packing
(``batch["stream"]``): a teacher that ``carries_state`` reads and writes ``stream["teacher"]``.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from distil.spec import SIGNALS, Request

__all__ = ["SIGNALS", "Request", "Teacher"]


@runtime_checkable
class Teacher(Protocol):
    name: str
    gives: tuple[str, ...]  # a subset of SIGNALS, richest first
    carries_state: bool  # stream packing: the teacher's recurrent / KV state flows across chunks

    @property
    def vocab_size(self) -> int | None: ...  # None: the tokenizer's (an API teacher)

    def to(self, device) -> Teacher: ...

    def signal(self, batch: dict, request: Request, stream: dict | None = None): ...

    def close(self) -> None: ...
