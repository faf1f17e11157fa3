"""What one TP rank of a stage computes for a step: its layers over its KV cache, then (last stage)
the LM head and sampling. Runs on the compute thread; knows nothing of gRPC."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from stagemesh.errors import InvalidArgument, ResourceExhausted
from stagemesh.models.batch import SeqChunk
from stagemesh.models.requests import SampledToken, SamplingParams
from stagemesh.models.runner import ModelRunner
from stagemesh.models.sampling import sample
from stagemesh.models.tp import TPRank
from stagemesh.stage_worker.faults import OomFault


@dataclass(frozen=True)
class StepWork:
    step_id: int
    chunks: tuple[SeqChunk, ...]
    token_ids: torch.Tensor | None = None  # (N,) on the first stage
    hidden: torch.Tensor | None = None  # (N, D) on later stages
    sampling: tuple[tuple[SamplingParams, int], ...] = ()  # (params, draw index) per chunk that wants a token


class StageEngine:
    def __init__(self, runner: ModelRunner, tp: TPRank = TPRank(), fault: OomFault | None = None) -> None:
        self.runner = runner
        self.tp = tp
        self.fault = fault
        self.steps = 0
        self.busy_seconds = 0.0
        if fault is not None and fault.at == "forward":
            last = list(runner.model.layers.values())[-1]
            last.register_forward_hook(lambda _m, inputs, _out: fault.check(inputs[0].shape[0], "forward"))

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
        self._reserve(work)
        out = self.runner.run(list(work.chunks), input_ids=work.token_ids, hidden=work.hidden)
        if self.is_last:
            params = [p for p, _ in work.sampling]
            out = sample(out, params, [i for _, i in work.sampling]) if params else []
        self.steps += 1
        self.busy_seconds += time.perf_counter() - start
        return out

    def _reserve(self, work: StepWork) -> None:
        """Claims a prompt step's workspace before computing it, and every TP rank learns whether all could
        (one small all-reduce): an out-of-memory here fails the step on every rank alike, none is left
        waiting inside a collective. Decode-only steps are small and skip it (all ranks decide alike)."""
        if all(c.num_tokens == 1 for c in work.chunks):
            return
        n = sum(c.num_tokens for c in work.chunks)
        failure = ""
        try:
            if self.fault is not None:
                self.fault.check(n, "reserve")
            if self.runner.device.type == "cuda":  # freed at once; the caching allocator keeps it for the step
                torch.empty(self.workspace_bytes(work), dtype=torch.uint8, device=self.runner.device)
        except torch.OutOfMemoryError as e:
            failure = str(e)
        if self.tp.size > 1:
            flag = torch.tensor([1.0 if failure else 0.0])
            flag = self.tp.all_reduce(flag)
            failure = failure or ("another TP rank of this stage is out of memory" if flag.item() else "")
        if failure:
            raise ResourceExhausted(
                f"a step of {n} tokens does not fit in this stage's memory ({failure}); "
                "retry with a shorter prompt, or serve with a smaller --max-step-tokens"
            )

    def workspace_bytes(self, work: StepWork) -> int:
        """An estimate of a step's peak activations on this rank: every token through the widest layers,
        the largest prompt chunk's attention scores (float32), the logits (float32, all-gathered)."""
        c, tp = self.runner.config, self.tp.size
        itemsize = torch.empty((), dtype=self.runner.dtype).element_size()
        n = sum(ch.num_tokens for ch in work.chunks)
        width = 4 * c.hidden_size + (c.q_size + 2 * c.kv_size + 2 * c.intermediate_size) // tp
        scores = max(ch.num_tokens * ch.end_pos for ch in work.chunks) * (c.num_attention_heads // tp) * 4
        logits = sum(ch.wants_logits for ch in work.chunks) * c.vocab_size * 4 * 2
        return n * width * itemsize + scores + logits
