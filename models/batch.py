"""One forward step's layout: which tokens of which sequences, at which positions and KV slots.

A step flattens the new tokens of every sequence into one (N, hidden) batch, so linear layers never see
padding. Attention then runs the decoding sequences (one new token each) as one padded batch and each
prefill chunk on its own. Everything here is built once per step and shared by all layers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class SeqChunk:
    """The part of one sequence a step computes: tokens [start_pos, start_pos + num_tokens)."""

    seq_id: int
    start_pos: int
    num_tokens: int
    block_table: tuple[int, ...]
    wants_logits: bool = True  # False for a prefill chunk that is not the prompt's last

    @property
    def end_pos(self) -> int:
        return self.start_pos + self.num_tokens


@dataclass(frozen=True)
class PrefillSlice:
    """A multi-token chunk: rows [token_start, token_start + num_tokens) of the step's batch."""

    token_start: int
    num_tokens: int
    start_pos: int
    kv_slots: torch.Tensor  # (start_pos + num_tokens,) slots of every position so far


@dataclass(frozen=True)
class StepBatch:
    chunks: tuple[SeqChunk, ...]
    positions: torch.Tensor  # (N,) absolute position of each token
    slot_mapping: torch.Tensor  # (N,) KV slot each token writes
    logits_indices: torch.Tensor  # (S,) rows whose logits are wanted, in chunk order
    decode_rows: torch.Tensor  # (Bd,) rows of single-token chunks
    decode_slots: torch.Tensor  # (Bd, T) KV slots each decode reads (whole blocks; the mask cuts them)
    decode_positions: torch.Tensor  # (Bd,) position of each decode token
    prefills: tuple[PrefillSlice, ...]
    _masks: dict = field(default_factory=dict, compare=False, repr=False)  # per sliding window, built once

    @property
    def num_tokens(self) -> int:
        return int(self.positions.shape[0])

    @property
    def decode_only(self) -> bool:
        """Every row is a decode, in order: attention needs no gather/scatter of rows."""
        return not self.prefills

    def decode_mask(self, window: int | None, dtype: torch.dtype) -> torch.Tensor:
        """(Bd, 1, 1, T) additive mask: 0 where key slot j is visible to decode b (j <= its position, and
        within the window), -inf elsewhere. Built once per step (SDPA would convert a boolean one per call)."""
        key = (window, dtype)
        if key not in self._masks:
            key_pos = torch.arange(self.decode_slots.shape[1], device=self.decode_slots.device)
            pos = self.decode_positions[:, None]
            visible = key_pos[None, :] <= pos
            if window is not None:
                visible &= key_pos[None, :] > pos - window
            mask = torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill_(~visible, float("-inf"))
            self._masks[key] = mask[:, None, None, :]
        return self._masks[key]

    @classmethod
    def build(cls, chunks: list[SeqChunk] | tuple[SeqChunk, ...], block_size: int, device="cpu") -> StepBatch:
        def t(values) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.long, device=device)

        offsets = torch.arange(block_size, device=device)
        positions, slots, logits_rows = [], [], []
        decode_rows, decode_tables, decode_pos, prefills = [], [], [], []
        row = 0
        for c in chunks:
            blocks_needed = -(-c.end_pos // block_size)  # fits its table: checked by the SequenceTable
            positions.extend(range(c.start_pos, c.end_pos))
            if c.num_tokens == 1:
                decode_rows.append(row)
                decode_tables.append(c.block_table[:blocks_needed])
                decode_pos.append(c.start_pos)
                slots.append(c.block_table[c.start_pos // block_size] * block_size + c.start_pos % block_size)
            else:
                table = t(c.block_table[:blocks_needed])
                seq_slots = (table[:, None] * block_size + offsets).reshape(-1)[: c.end_pos]  # (end_pos,)
                prefills.append(PrefillSlice(row, c.num_tokens, c.start_pos, seq_slots))
                slots.extend(seq_slots[c.start_pos :].tolist())
            row += c.num_tokens
            if c.wants_logits:
                logits_rows.append(row - 1)
        width = max((len(b) for b in decode_tables), default=0)
        tables = t([list(b) + [0] * (width - len(b)) for b in decode_tables]).reshape(len(decode_tables), width)
        decode_slots = (tables[:, :, None] * block_size + offsets).reshape(len(decode_tables), width * block_size)
        return cls(
            chunks=tuple(chunks),
            positions=t(positions),
            slot_mapping=t(slots),
            logits_indices=t(logits_rows),
            decode_rows=t(decode_rows),
            decode_slots=decode_slots,
            decode_positions=t(decode_pos),
            prefills=tuple(prefills),
        )
