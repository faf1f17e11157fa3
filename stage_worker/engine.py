"""What one TP rank of a stage computes for a step: its layers over its KV cache, then (last stage)
the LM head and sampling. Runs on the compute thread; knows nothing of gRPC."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from stagemesh.errors import InvalidArgument
from stagemesh.models.batch import SeqChunk
from stagemesh.models.requests import SampledToken, SamplingParams
from stagemesh.models.runner import ModelRunner
from stagemesh.models.sampling import sample


@dataclass(frozen=True)
class StepWork:
    step_id: int
    chunks: tuple[SeqChunk, ...]
    token_ids: torch.Tensor | None = None  # (N,) on the first stage
    hidden: torch.Tensor | None = None  # (N, D) on later stages
    sampling: tuple[tuple[SamplingParams, int], ...] = ()  # (params, draw index) per chunk that wants a token


class StageEngine:
    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner
        self.steps = 0
        self.busy_seconds = 0.0

    @property
    def is_first(self) -> bool:
        return self.runner.model.has_embedding

    @property
    def is_last(self) -> bool:
        return self.runner.model.has_head

    def check(self, work: StepWork) -> None:
        """Everything that can be wrong with a step's inputs, found before any TP peer is involved."""
        self.runner.check(list(work.chunks), work.token_ids, work.hidden)
        wanted = sum(c.wants_logits for c in work.chunks)
        if self.is_last and len(work.sampling) != wanted:
            raise InvalidArgument(f"{wanted} sequences want a token but {len(work.sampling)} sampling settings came")

    def run(self, work: StepWork) -> torch.Tensor | list[SampledToken]:
        """Hidden states (N, D) for the next stage, or on the last stage the sampled tokens."""
        start = time.perf_counter()
        out = self.runner.run(list(work.chunks), input_ids=work.token_ids, hidden=work.hidden)
        if self.is_last:
            params = [p for p, _ in work.sampling]
            out = sample(out, params, [i for _, i in work.sampling]) if params else []
        self.steps += 1
        self.busy_seconds += time.perf_counter() - start
        return out
