"""Runs forward steps of a (slice of a) model over its paged KV cache.

The one place a step's chunks become a StepBatch and tensors go through the model; the reference
engine and the stage worker both drive a ModelRunner, so the mesh computes exactly what the engine does.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from stagemesh.errors import InvalidArgument
from stagemesh.models.batch import SeqChunk, StepBatch
from stagemesh.models.compiled import CompiledDecode, CompileOptions
from stagemesh.models.transformer import Transformer


class ModelRunner:
    def __init__(
        self, model: Transformer, num_blocks: int, block_size: int, device="cpu", compile: CompileOptions | None = None
    ) -> None:
        self.model = model
        self.device = torch.device(device)
        self.dtype = next(model.parameters()).dtype
        self.block_size = block_size
        self.num_blocks = num_blocks
        # The compiled path pads decode batches into one extra block past the pool (never handed out).
        model.allocate_kv(num_blocks + (compile is not None), block_size, self.dtype, self.device)
        self.compiled = CompiledDecode(model, num_blocks, block_size, compile) if compile else None

    @property
    def config(self):
        return self.model.config

    @torch.inference_mode()
    def run(
        self,
        chunks: list[SeqChunk],
        input_ids: torch.Tensor | None = None,
        hidden: torch.Tensor | None = None,
        all_logits: bool = False,
    ) -> torch.Tensor:
        """input_ids (N,) or hidden (N, D) for the chunks' tokens, in chunk order.

        Returns hidden (N, D), or on the last stage logits (S, V) for chunks that want them
        (every row when all_logits, for tests that compare whole prompts). Inputs from outside are checked
        once, at the edge (`check`, called by the stage before its TP peers see the step).
        """
        batch = StepBatch.build(chunks, self.block_size, self.device)
        if all_logits:
            batch = _with_all_rows(batch)
        if input_ids is not None:
            input_ids = input_ids.to(self.device)
        if hidden is not None:
            hidden = hidden.to(self.device)
        if self.compiled is not None:
            if not all_logits and self.compiled.takes(batch):
                return self.compiled(batch, input_ids, hidden)
            self.compiled.stats.eager_steps += 1
        return self.model(batch, input_ids=input_ids, hidden=hidden)

    def check(self, chunks: list[SeqChunk], input_ids, hidden) -> None:
        """Raises InvalidArgument when the inputs do not fit the chunks or this model slice (the chunks' block
        tables were checked by the stage's SequenceTable, the reference engine's come from its allocator)."""
        n = sum(c.num_tokens for c in chunks)
        context = self.config.max_position_embeddings
        end = max((c.start_pos + c.num_tokens for c in chunks), default=0)
        if end > context:
            raise InvalidArgument(f"positions run to {end}, past the model's context of {context}")
        if self.model.has_embedding:
            if input_ids is None or input_ids.shape != (n,):
                raise InvalidArgument(f"the first stage needs {n} token ids for the step's {n} positions")
            vocab = self.config.vocab_size
            if n and (int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab):
                raise InvalidArgument(f"token ids must be in [0, {vocab})")
        else:
            expected = (n, self.config.hidden_size)
            if hidden is None or tuple(hidden.shape) != expected:
                got = None if hidden is None else list(hidden.shape)
                raise InvalidArgument(f"hidden states must have shape {list(expected)}, got {got}")
            if hidden.dtype != self.dtype:
                raise InvalidArgument(f"hidden states must be {_name(self.dtype)}, got {_name(hidden.dtype)}")
            if not torch.isfinite(hidden).all():
                raise InvalidArgument("hidden states contain NaN or infinity")


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _with_all_rows(batch: StepBatch) -> StepBatch:
    return replace(batch, logits_indices=torch.arange(batch.num_tokens, device=batch.positions.device))
