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
from distil.losses.fused import Workspace, default_chunk_size, forward_kl_sum_in_place
from distil.models.transformer import TransformerLM
from distil.runtime import adapt_threads
from distil.spec import shared_vocab


def _token_rows(model, inputs: torch.Tensor, logits_fn):
    """(rows [tokens, H or V], head or None): a distil model gives its hidden states, and the
    head turns any slice of them into logits, so no [batch x seq x vocab] block is ever built."""
    if logits_fn is None and isinstance(model, TransformerLM):
        hidden = model(inputs, return_hidden=True)
        return hidden.reshape(-1, hidden.shape[-1]), model.head
    logits = (logits_fn or model)(inputs)
    return logits.reshape(-1, logits.shape[-1]), None


def _teacher_rows(teacher, inputs: torch.Tensor):
    model = getattr(teacher, "model", None)
    if "head" in teacher.gives and isinstance(model, TransformerLM):
        hidden = teacher.head_inputs(inputs)[0]
        return hidden.reshape(-1, hidden.shape[-1]), model.head
    logits = teacher.logits(inputs)
    return logits.reshape(-1, logits.shape[-1]), None


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
    chunk_size: int | None = None,
) -> dict:
    """Mean next-token loss over all tokens of ``windows`` [n, seq + 1]; KL(teacher || model) too.

    ``logits_fn(input_ids)`` overrides how logits are computed (e.g. for a transformers model).
    A distil model (and a teacher that gives its hidden states) is scored ``chunk_size`` tokens at
    a time through its LM head (default: as the fused loss, ``default_chunk_size``), so memory
    holds a few [chunk x vocab] blocks rather than the batch's whole logits.
    """
    was_training = model.training
    model.eval()
    total_loss = total_kl = 0.0
    total_agree = total_tokens = 0
    num_batches = math.ceil(len(windows) / batch_size)
    if max_batches:
        num_batches = min(num_batches, max_batches)
    for b in tqdm(range(num_batches), desc="eval", disable=not progress, leave=False):
        adapt_threads()
        batch = torch.from_numpy(windows[b * batch_size : (b + 1) * batch_size].astype(np.int64)).to(device)
        inputs, labels = batch[:, :-1], batch[:, 1:].reshape(-1)
        rows, head = _token_rows(model, inputs, logits_fn)
        teacher_rows, teacher_head = _teacher_rows(teacher, inputs) if teacher is not None else (None, None)
        vocab = model.lm_head.weight.shape[0] if head is not None else rows.shape[-1]
        chunk = chunk_size or default_chunk_size(vocab, device)
        workspace = Workspace(rows.device, torch.float32)
        for start in range(0, len(labels), chunk):
            end = min(start + chunk, len(labels))
            logits = (head(rows[start:end]) if head is not None else rows[start:end]).float()
            total_loss += F.cross_entropy(logits, labels[start:end], reduction="sum").item()
            if teacher is not None:
                t_rows = teacher_rows[start:end]
                teacher_logits = (teacher_head(t_rows) if teacher_head is not None else t_rows).float()
                shared = shared_vocab(logits.shape[-1], teacher_logits.shape[-1])
                agree = logits[..., :shared].argmax(-1) == teacher_logits[..., :shared].argmax(-1)
                total_agree += agree.sum().item()
                if head is not None and teacher_head is not None and logits.shape == teacher_logits.shape:
                    # both blocks are this chunk's own: the KL overwrites them instead of making ~6 more
                    total_kl += forward_kl_sum_in_place(logits, teacher_logits, workspace).item()
                else:
                    total_kl += kd_loss(logits, teacher_logits, "forward_kl", reduction="sum").item()
        total_tokens += labels.numel()
    model.train(was_training)
    loss = total_loss / max(total_tokens, 1)
    out = {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": total_tokens}
    if teacher is not None:
        out["kl_to_teacher"] = total_kl / max(total_tokens, 1)
        out["top1_agreement"] = total_agree / max(total_tokens, 1)
    return out
