"""Choosing the next token from logits: greedy, temperature, top-k, top-p, per-request seeds.

A sampled draw uses a generator seeded from (request seed, index of the token being drawn), never from
shared state, so a request gets the same tokens alone or batched with others, on any stage or replay.
Logprobs are those of the model's own distribution (log-softmax of the raw logits), as vLLM reports.
"""

from __future__ import annotations

import torch
from stagemesh.errors import FailedPrecondition
from stagemesh.models.requests import SampledToken, SamplingParams


def sample(logits: torch.Tensor, params: list[SamplingParams], draw_index: list[int]) -> list[SampledToken]:
    """logits (S, V), one row per sequence; draw_index[i] = how many tokens sequence i has generated."""
    logits = logits.float() if logits.dtype in (torch.bfloat16, torch.float16) else logits
    if not torch.isfinite(logits).all():
        raise FailedPrecondition(
            "the logits are not finite (NaN or infinity): the activations overflowed, no token can be chosen"
        )
    chosen = logits.argmax(dim=-1)  # (S,) greedy choice for every row; sampled rows overwrite theirs
    for i, p in enumerate(params):
        if not p.greedy:
            chosen[i] = _draw(logits[i], p, draw_index[i])
    logprobs = torch.log_softmax(logits, dim=-1)  # (S, V)
    picked = logprobs.gather(1, chosen[:, None])[:, 0].tolist()
    most = max((p.logprobs for p in params), default=0)
    top_values, top_ids = logprobs.topk(most, dim=-1) if most else (None, None)
    out = []
    for i, p in enumerate(params):
        top = ()
        if p.logprobs:
            top = tuple(zip(top_ids[i, : p.logprobs].tolist(), top_values[i, : p.logprobs].tolist()))
        out.append(SampledToken(int(chosen[i]), picked[i], top))
    return out


def _draw(row: torch.Tensor, p: SamplingParams, index: int) -> int:
    """One sampled token from a (V,) row of logits."""
    row = row / p.temperature
    if p.top_k and p.top_k < row.shape[0]:
        kth = torch.topk(row, p.top_k).values[-1]
        row = row.masked_fill(row < kth, float("-inf"))
    probs = torch.softmax(row, dim=-1)
    if p.top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        outside = sorted_probs.cumsum(0) - sorted_probs >= p.top_p  # keep the smallest prefix reaching top_p
        probs = probs.scatter(0, order, sorted_probs.masked_fill(outside, 0))
    generator = torch.Generator(device=row.device).manual_seed(_mix(p.seed, index))
    return int(torch.multinomial(probs, 1, generator=generator))


def _mix(seed: int, index: int) -> int:
    """A 63-bit seed for draw `index` of a request seeded `seed` (splitmix64)."""
    z = (seed * 0x9E3779B97F4A7C15 + index + 1) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) & 0x7FFFFFFFFFFFFFFF
