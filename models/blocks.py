"""KV block allocation: which cache blocks each sequence owns. Pure Python, no torch.

The gateway owns one for the whole mesh (every stage indexes its own pool with the same block ids);
the reference engine owns one for its single process.
"""

from __future__ import annotations

import math

from stagemesh.errors import ResourceExhausted


class BlockAllocator:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free = list(range(num_blocks - 1, -1, -1))  # pop() hands out low ids first
        self._owned: dict[int, list[int]] = {}

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_for(self, tokens: int) -> int:
        return math.ceil(tokens / self.block_size)

    def can_allocate(self, tokens: int) -> bool:
        return self.blocks_for(tokens) <= len(self._free)

    def allocate(self, seq_id: int, tokens: int) -> list[int]:
        """Reserves room for `tokens` positions of a new sequence and returns its block table."""
        need = self.blocks_for(tokens)
        if need > len(self._free):
            raise ResourceExhausted(
                f"KV cache full: {tokens} tokens need {need} blocks, {len(self._free)} of {self.num_blocks} free"
            )
        table = [self._free.pop() for _ in range(need)]
        self._owned[seq_id] = table
        return table

    def free(self, seq_id: int) -> None:
        self._free.extend(reversed(self._owned.pop(seq_id, [])))
