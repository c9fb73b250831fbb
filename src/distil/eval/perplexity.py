"""Held-out loss, perplexity, and agreement with the teacher, on packed windows.

    metrics = evaluate_lm(student, windows, batch_size=8, teacher=teacher)
    # {"loss": 2.91, "ppl": 18.4, "kl_to_teacher": 0.35, "top1_agreement": 0.71, "tokens": 16384}

The same function serves validation during training and ``distil eval``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from distil.losses.divergences import kd_loss
from distil.runtime import adapt_threads
from distil.spec import shared_vocab


@torch.no_grad()
def evaluate_lm(
    model,
    windows: np.ndarray,
    *,
    batch_size: int = 8,
    max_batches: int | None = None,
    teacher=None,
    device="cpu",
    progress: bool = False,
    logits_fn=None,
) -> dict:
    """Mean next-token loss over all tokens of ``windows`` [n, seq + 1]; KL(teacher || model) too.

    ``logits_fn(input_ids)`` overrides how logits are computed (e.g. for a transformers model).
    """
    was_training = model.training
    model.eval()
    logits_fn = logits_fn or (lambda ids: model(ids))
    total_loss = total_kl = 0.0
    total_agree = total_tokens = 0
    num_batches = math.ceil(len(windows) / batch_size)
    if max_batches:
        num_batches = min(num_batches, max_batches)
    for b in tqdm(range(num_batches), desc="eval", disable=not progress, leave=False):
        adapt_threads()
        chunk = torch.from_numpy(windows[b * batch_size : (b + 1) * batch_size].astype(np.int64)).to(device)
        inputs, labels = chunk[:, :-1], chunk[:, 1:]
        logits = logits_fn(inputs).float()
        total_loss += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="sum").item()
        total_tokens += labels.numel()
        if teacher is not None:
            teacher_logits = teacher.logits(inputs).float()
            vocab = shared_vocab(logits.shape[-1], teacher_logits.shape[-1])
            total_kl += kd_loss(logits, teacher_logits, "forward_kl", reduction="sum").item()
            agree = logits[..., :vocab].argmax(-1) == teacher_logits[..., :vocab].argmax(-1)
            total_agree += agree.sum().item()
    model.train(was_training)
    loss = total_loss / max(total_tokens, 1)
    out = {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": total_tokens}
    if teacher is not None:
        out["kl_to_teacher"] = total_kl / max(total_tokens, 1)
        out["top1_agreement"] = total_agree / max(total_tokens, 1)
    return out
