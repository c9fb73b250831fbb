"""How close a student stays to its teacher on text the student writes itself (exposure bias).

    metrics = kl_on_own_samples(student, teacher_model, prompts, max_new_tokens=64, seed=0)
    # {"reverse_kl": 0.41, "forward_kl": 0.52, "tokens": 2048}

Each prompt is continued by the student (temperature 1, its KV cache / SSM state); the teacher
then scores the same text, and the per-token KL between the two next-token distributions is
averaged over the student's sampled positions (prompt positions excluded). Off-policy training
never shows the student these prefixes: the gap between this and the KL on held-out text is the
exposure bias that on-policy distillation targets.
"""

from __future__ import annotations

import torch

from distil.data.prompts import Prompt
from distil.models.generate import sample


@torch.no_grad()
def kl_on_own_samples(student, teacher, prompts: list[Prompt], *, max_new_tokens: int = 64, seed: int = 0,
                      eos_token_id: int | None = None) -> dict:
    """Mean per-token KL(student || teacher) and KL(teacher || student) on the student's samples."""
    was_training = student.training
    student.eval()
    generator = torch.Generator().manual_seed(seed)
    total_rkl = total_fkl = 0.0
    count = 0
    for prompt in prompts:
        ids = torch.tensor([prompt.ids], dtype=torch.long)
        tokens, _, lengths = sample(student, ids, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
                                    generator=generator)
        n = int(lengths[0])
        full = torch.cat([ids, tokens[:, :n]], 1)
        start = ids.shape[1] - 1  # the position predicting the first sampled token
        q = torch.log_softmax(student(full)[:, start : start + n].float(), -1)
        p = torch.log_softmax(teacher(full)[:, start : start + n].float(), -1)
        vocab = min(q.shape[-1], p.shape[-1])
        q, p = q[..., :vocab], p[..., :vocab]
        total_rkl += float((q.exp() * (q - p)).sum())
        total_fkl += float((p.exp() * (p - q)).sum())
        count += n
    student.train(was_training)
    return {"reverse_kl": total_rkl / max(count, 1), "forward_kl": total_fkl / max(count, 1), "tokens": count}
