"""Paged KV cache of one attention layer: a pool of fixed-size blocks, addressed by flat slot numbers.

Which blocks a sequence owns is decided elsewhere (models.blocks.BlockAllocator, in the gateway for the
mesh); this module only writes and gathers. Slot s is position s % block_size of block s // block_size.
"""

from __future__ import annotations

import torch
from torch import nn


class PagedKVCache(nn.Module):
    def __init__(
        self, num_blocks: int, block_size: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype, device
    ) -> None:
        super().__init__()
        self.block_size = block_size
        shape = (num_blocks * block_size, n_kv_heads, head_dim)  # (slots, KVl, D)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    @property
    def num_blocks(self) -> int:
        return self.k.shape[0] // self.block_size

    def update(self, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """Writes k, v (N, KVl, D) at slot_mapping (N,)."""
        self.k.index_copy_(0, slot_mapping, k)
        self.v.index_copy_(0, slot_mapping, v)

    def gather(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """slots (B, T) -> k, v (B, KVl, T, D), the layout scaled_dot_product_attention takes."""
        flat = slots.reshape(-1)
        k = self.k.index_select(0, flat).view(*slots.shape, *self.k.shape[1:]).transpose(1, 2)  # (B, KVl, T, D)
        v = self.v.index_select(0, flat).view(*slots.shape, *self.v.shape[1:]).transpose(1, 2)
        return k, v
