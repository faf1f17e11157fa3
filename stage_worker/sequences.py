"""The sequences one Forward stream has registered on this stage: their KV blocks and how many positions
their cache holds. A step is checked against it before anything runs, and applied all or nothing."""

from __future__ import annotations

from dataclasses import dataclass

from stagemesh.errors import InvalidArgument
from stagemesh.models.batch import SeqChunk
from stagemesh.models.requests import SamplingParams


@dataclass(frozen=True)
class SeqRequest:
    """One sequence's part of a step, as the gateway sent it."""

    seq_id: int
    start_pos: int
    num_tokens: int
    block_table: tuple[int, ...] = ()
    wants_token: bool = False
    sampling: SamplingParams = SamplingParams()
    draw_index: int = 0


@dataclass
class _Entry:
    block_table: tuple[int, ...]
    kv_len: int


class SequenceTable:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._seqs: dict[int, _Entry] = {}

    @property
    def blocks_used(self) -> int:
        return sum(len(e.block_table) for e in self._seqs.values())

    def __len__(self) -> int:
        return len(self._seqs)

    def apply(self, seqs: list[SeqRequest], release: list[int]) -> list[SeqChunk]:
        """Forgets `release`, then checks and records `seqs`; returns the chunks to compute."""
        self.release(release)
        chunks, updates = [], {}
        for s in seqs:
            if s.seq_id in updates:
                raise InvalidArgument(f"sequence {s.seq_id} appears twice in one step")
            table = self._check(s)
            chunks.append(SeqChunk(s.seq_id, s.start_pos, s.num_tokens, table, s.wants_token))
            updates[s.seq_id] = _Entry(table, s.start_pos + s.num_tokens)
        self._seqs.update(updates)
        return chunks

    def release(self, seq_ids: list[int]) -> None:
        for seq_id in seq_ids:
            self._seqs.pop(seq_id, None)

    def _check(self, s: SeqRequest) -> tuple[int, ...]:
        if s.num_tokens < 1:
            raise InvalidArgument(f"sequence {s.seq_id}: a step needs at least one token")
        entry = self._seqs.get(s.seq_id)
        if s.start_pos > 0:
            if entry is None:
                raise InvalidArgument(f"unknown sequence {s.seq_id}: its first step must start at position 0")
            if s.start_pos != entry.kv_len:
                raise InvalidArgument(
                    f"sequence {s.seq_id} holds {entry.kv_len} positions; a step cannot start at {s.start_pos}"
                )
        table = s.block_table or (entry.block_table if entry else ())
        if not table:
            raise InvalidArgument(f"sequence {s.seq_id}: a step at position 0 needs its KV block table")
        if s.block_table and any(not 0 <= b < self.num_blocks for b in table):  # a stored table was checked
            raise InvalidArgument(f"sequence {s.seq_id}: KV block ids must be in [0, {self.num_blocks})")
        if s.start_pos + s.num_tokens > len(table) * self.block_size:
            raise InvalidArgument(
                f"sequence {s.seq_id}: {s.start_pos + s.num_tokens} positions do not fit its {len(table)} KV blocks"
            )
        return table
