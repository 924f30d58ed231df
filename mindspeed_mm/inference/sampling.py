"""The next token from the last position's logits, by Hugging Face's rules.

Greedy: argmax after the repetition penalty (HF applies the penalty in
greedy mode too).  Sampling: penalty, then temperature, top-k, top-p (HF's
order), then one draw from a seeded generator so a run repeats exactly.
"""
from typing import Optional

import torch

from mindspeed_mm.inference.arguments import GenerationSettings


def repetition_penalty(logits: torch.Tensor, history: torch.Tensor, penalty: float) -> torch.Tensor:
    """logits [b, V], history [b, t] (every id seen so far, prompt included): seen ids are made
    less likely: positive logits divided by the penalty, negative ones multiplied."""
    if penalty == 1.0:
        return logits
    seen = logits.gather(1, history)
    seen = torch.where(seen < 0, seen * penalty, seen / penalty)
    return logits.scatter(1, history, seen)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = logits.topk(k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the most likely tokens whose probabilities add up to p (at least one token)."""
    if p >= 1.0:
        return logits
    ascending, order = logits.sort(dim=-1)
    cumulative = ascending.softmax(-1).cumsum(-1)
    drop = cumulative <= 1 - p
    drop[..., -1] = False  # the most likely token always stays
    return logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))


def next_tokens(logits: torch.Tensor, history: torch.Tensor, settings: GenerationSettings,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """logits [b, V] (float32, real vocabulary only), history [b, t] -> token ids [b].

    ``generator`` is a CPU generator (sampling only)."""
    logits = repetition_penalty(logits, history, settings.repetition_penalty)
    if not settings.do_sample:
        return logits.argmax(-1)
    logits = top_p_filter(top_k_filter(logits / settings.temperature, settings.top_k), settings.top_p)
    # The draw on the CPU: a CPU generator exists on every platform and repeats across devices.
    probs = logits.softmax(-1).cpu()
    return torch.multinomial(probs, 1, generator=generator)[:, 0].to(logits.device)
