"""Shared by the compiled-path tests and their TP helper: decode logits step by step over a ModelRunner."""

from __future__ import annotations

import torch
from stagemesh.models.batch import SeqChunk


@torch.inference_mode()
def decode_logits(runner, prompts: list[list[int]], steps: int, compiled: bool = True):
    """Prefill every prompt eagerly in one step, then `steps` greedy decode steps of the whole batch (through
    the graphs when `compiled`, else eagerly). Returns logits (steps, B, V) and the tokens fed (steps, B)."""
    saved = runner.compiled
    runner.compiled = saved if compiled else None
    try:
        tables, start = [], 0
        for p in prompts:
            blocks = -(-(len(p) + steps) // runner.block_size)
            tables.append(tuple(range(start, start + blocks)))
            start += blocks
        chunks = [SeqChunk(i, 0, len(p), tables[i]) for i, p in enumerate(prompts)]
        logits = runner.run(chunks, input_ids=torch.tensor([t for p in prompts for t in p]))
        lengths, out, fed = [len(p) for p in prompts], [], []
        for _ in range(steps):
            ids = logits.argmax(-1)  # (B,)
            fed.append(ids)
            chunks = [SeqChunk(i, lengths[i], 1, tables[i]) for i in range(len(prompts))]
            logits = runner.run(chunks, input_ids=ids)
            out.append(logits.float())
            lengths = [n + 1 for n in lengths]
        return torch.stack(out), torch.stack(fed)
    finally:
        runner.compiled = saved
