"""Distillation losses.

* :func:`kd_loss` - divergences on full logits (the reference).
* :func:`topk_kd_loss` - the teacher known by its top-k log-probs (caches, APIs).
* :func:`fused_linear_kd_loss` - LM head + loss chunked over tokens, never materialising logits.
* :mod:`distil.losses.parallel` - vocabulary- and sequence-parallel forms.
"""

from distil.losses.divergences import KINDS, cross_entropy, kd_loss
from distil.losses.fused import fused_linear_kd_loss
from distil.losses.topk import TOPK_KINDS, topk_kd_loss

__all__ = ["KINDS", "TOPK_KINDS", "cross_entropy", "kd_loss", "topk_kd_loss", "fused_linear_kd_loss"]
