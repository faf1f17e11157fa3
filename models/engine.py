"""The single-process reference engine: prefill, then decode with a KV cache, for a batch of requests.

It is the baseline every mesh layout is compared with, and `stagemesh generate --model DIR` runs it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from stagemesh.errors import ResourceExhausted
from stagemesh.models.batch import SeqChunk
from stagemesh.models.blocks import BlockAllocator
from stagemesh.models.compiled import CompileOptions
from stagemesh.models.loader import build_model
from stagemesh.models.requests import GenerationRequest, SampledToken, finish_reason
from stagemesh.models.runner import ModelRunner
from stagemesh.models.sampling import sample


@dataclass
class Generation:
    token_ids: list[int] = field(default_factory=list)
    tokens: list[SampledToken] = field(default_factory=list)
    finish_reason: str | None = None  # "length" | "eos" | "stop"


class ReferenceEngine:
    def __init__(
        self,
        model_dir: str | Path,
        dtype: torch.dtype = torch.float32,
        device="cpu",
        block_size: int = 16,
        compile: CompileOptions | None = None,
        kv_blocks: int = 256,  # the fixed KV pool of a compiled engine (its graphs are captured over it)
    ):
        self.model, _ = build_model(model_dir, dtype=dtype, device=device)
        self.config = self.model.config
        self.device = device
        self.block_size = block_size
        self._runner: ModelRunner | None = None
        if compile is not None:
            self._runner = ModelRunner(self.model, kv_blocks, block_size, device, compile=compile)
            self._runner.compiled.warm_up()

    def _runner_for(self, tokens: list[int]) -> tuple[ModelRunner, BlockAllocator]:
        blocks = sum(-(-t // self.block_size) for t in tokens)
        runner = self._runner
        if runner is not None and runner.compiled is not None and runner.num_blocks < blocks:
            raise ResourceExhausted(f"{blocks} KV blocks needed; this compiled engine has {runner.num_blocks}")
        if runner is None or runner.num_blocks < blocks:
            self._runner = ModelRunner(self.model, blocks, self.block_size, self.device)
        return self._runner, BlockAllocator(self._runner.num_blocks, self.block_size)

    def generate(self, requests: list[GenerationRequest]) -> list[Generation]:
        for req in requests:
            req.validate(self.config.vocab_size, self.config.max_position_embeddings)
        runner, blocks = self._runner_for([len(r.prompt_ids) + r.max_tokens for r in requests])
        tables = [tuple(blocks.allocate(i, len(r.prompt_ids) + r.max_tokens)) for i, r in enumerate(requests)]
        results = [Generation() for _ in requests]
        lengths = [len(r.prompt_ids) for r in requests]
        next_ids = [list(r.prompt_ids) for r in requests]
        starts = [0] * len(requests)
        live = list(range(len(requests)))
        while live:
            chunks = [SeqChunk(i, starts[i], len(next_ids[i]), tables[i]) for i in live]
            ids = torch.tensor([t for i in live for t in next_ids[i]], dtype=torch.long)
            logits = runner.run(chunks, input_ids=ids)  # (len(live), V)
            picks = sample(logits, [requests[i].sampling for i in live], [len(results[i].token_ids) for i in live])
            for i, tok in zip(live, picks):
                results[i].token_ids.append(tok.token_id)
                results[i].tokens.append(tok)
                starts[i], next_ids[i] = lengths[i], [tok.token_id]
                lengths[i] += 1
                room = self.config.max_position_embeddings - lengths[i]
                results[i].finish_reason = finish_reason(
                    tok.token_id, len(results[i].token_ids), requests[i], self.config.eos_token_ids, room
                )
            live = [i for i in live if results[i].finish_reason is None]
        return results

    def prompt_logits(self, prompts: list[list[int]]) -> list[torch.Tensor]:
        """Logits (T, V) at every position of each prompt, computed in one batched prefill."""
        runner, blocks = self._runner_for([len(p) for p in prompts])
        chunks = [SeqChunk(i, 0, len(p), tuple(blocks.allocate(i, len(p)))) for i, p in enumerate(prompts)]
        ids = torch.tensor([t for p in prompts for t in p], dtype=torch.long)
        logits = runner.run(chunks, input_ids=ids, all_logits=True)
        return list(logits.split([len(p) for p in prompts]))
