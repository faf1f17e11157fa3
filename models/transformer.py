"""A slice of the decoder stack: layers [first, end), the embedding on the first stage, the final norm
and LM head on the last. With one slice holding everything it is the whole model.

Layers live in a ModuleDict keyed by their checkpoint index, so a pipeline stage is the full model with
what it does not own left out (torchtitan's habit), and parameter names match the checkpoint's.
"""

from __future__ import annotations

import torch
from stagemesh.models.batch import StepBatch
from stagemesh.models.config import ModelConfig
from stagemesh.models.kv_cache import PagedKVCache
from stagemesh.models.layers import DecoderLayer, RMSNorm, RotaryEmbedding
from torch import nn


class Transformer(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        layers: range | None = None,
        has_embedding: bool = True,
        has_head: bool = True,
    ) -> None:
        super().__init__()
        self.config = config
        layers = range(config.num_hidden_layers) if layers is None else layers
        # Built on the meta device and then loaded, so the embedding skips its random init (normal_ on meta
        # imports dynamo: 1.2 s in every worker).
        shape = (config.vocab_size, config.hidden_size)
        self.embed_tokens = nn.Embedding(*shape, _weight=torch.empty(shape)) if has_embedding else None
        self.layers = nn.ModuleDict({str(i): DecoderLayer(config, i) for i in layers})
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps) if has_head else None
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False) if has_head else None
        if has_head and has_embedding and config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rotary = RotaryEmbedding(config)

    @property
    def has_embedding(self) -> bool:
        return self.embed_tokens is not None

    @property
    def has_head(self) -> bool:
        return self.lm_head is not None

    def allocate_kv(self, num_blocks: int, block_size: int, dtype: torch.dtype, device) -> None:
        """Creates each layer's paged KV cache (call after any TP sharding: it sizes by local KV heads)."""
        for layer in self.layers.values():
            attn = layer.self_attn
            attn.kv_cache = PagedKVCache(num_blocks, block_size, attn.n_kv_heads, attn.head_dim, dtype, device)

    def kv_bytes_per_block(self, block_size: int, dtype: torch.dtype) -> int:
        """Bytes one KV block takes across this slice's layers (at the local, TP-sharded head count)."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        per_layer = [
            2 * l.self_attn.n_kv_heads * l.self_attn.head_dim * block_size * itemsize for l in self.layers.values()
        ]
        return sum(per_layer)

    def forward(
        self, batch: StepBatch, input_ids: torch.Tensor | None = None, hidden: torch.Tensor | None = None
    ) -> torch.Tensor:
        """input_ids (N,) on the first stage, else hidden (N, D).

        Returns logits (S, V) for the rows batch.logits_indices names on the last stage, else hidden (N, D).
        """
        x = self.embed_tokens(input_ids) if self.has_embedding else hidden  # (N, D)
        cos, sin = self.rotary(batch.positions, x.dtype)
        for layer in self.layers.values():
            x = layer(x, cos, sin, batch)
        if not self.has_head:
            return x
        return self.lm_head(self.norm(x[batch.logits_indices]))  # (S, V)
