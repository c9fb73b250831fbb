"""Generation with a KV cache for attention layers and recurrent state for SSM layers.

    text = generate_text(model, tokenizer, "def fibonacci(n):", max_new_tokens=50, temperature=0.8, top_k=50)
    ids = generate(model, prompt_ids, max_new_tokens=50)    # [batch, prompt + new]

The prompt runs once in parallel (prefill); each new token then costs one step, whose state is
O(1) in the context for SSM layers and O(context) for attention layers.
"""

from __future__ import annotations

import torch

from distil.models.state import preallocated_states


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, *, max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
             eos_token_id: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Greedy (temperature 0) or sampled continuation of ``input_ids`` [batch, prompt]."""
    model.eval()
    states = preallocated_states(model, input_ids.shape[0], input_ids.shape[1] + max_new_tokens)
    logits, states = model(input_ids, states=states, return_states=True)
    out = input_ids
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    for _ in range(max_new_tokens):
        next_logits = logits[:, -1].float()
        if temperature > 0:
            next_logits = next_logits / temperature
            if top_k:
                kth = next_logits.topk(min(top_k, next_logits.shape[-1]), dim=-1).values[:, -1:]
                next_logits = next_logits.masked_fill(next_logits < kth, -torch.inf)
            token = torch.multinomial(torch.softmax(next_logits, -1), 1, generator=generator)
        else:
            token = next_logits.argmax(-1, keepdim=True)
        if eos_token_id is not None:
            token = torch.where(finished[:, None], torch.full_like(token, eos_token_id), token)
            finished |= token[:, 0] == eos_token_id
        out = torch.cat([out, token], dim=1)
        if eos_token_id is not None and finished.all():
            break
        logits, states = model(token, states=states, return_states=True)
    return out


def generate_text(model, tokenizer, prompt: str, **kwargs) -> str:
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    device = next(model.parameters()).device
    out = generate(model, ids.to(device), eos_token_id=tokenizer.eos_token_id, **kwargs)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
