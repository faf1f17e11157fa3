"""Continuous batching for the mesh. Pure asyncio bookkeeping, no gRPC, no torch.

Every event (a request arrives, a step's tokens come back, a client goes away) updates the sequences and
then schedules at once: while fewer micro-batches than `micro_batches(...)` (pp, so every stage has work)
are in flight, the next one is formed from the sequences not already in flight. Each micro-batch takes at
most its fair share of the active sequences, decodes first, then prompt chunks under a token budget
(chunked prefill: a long prompt never stalls running decodes for more than one step). Micro-batches are
sized by what a step amortises: each one streams every stage's weights once, whatever its size, so the
running sequences are never cut into micro-batches smaller than `min_micro_batch`; with fewer than
pp x min_micro_batch of them, fewer (larger) micro-batches go in flight. KV blocks are
allocated when a sequence is admitted (prompt + max_tokens) and freed the moment it ends; the stages
forget it with the next step's release list.

Failover: `suspend` keeps every request when the pipeline is lost but a new one is coming; the next
`attach` replays each running sequence's history (prompt + tokens already streamed) as a chunked prefill
on the new pipeline, and generation continues from the next token with the same draw index, so greedy and
seeded output equal a run without the failure and the client's stream has no gap and no repeat.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from stagemesh.errors import ResourceExhausted, StagemeshError, Unavailable
from stagemesh.models.blocks import BlockAllocator
from stagemesh.models.requests import GenerationRequest, SampledToken, SamplingParams, finish_reason


@dataclass(frozen=True)
class Chunk:
    """What a step computes for one sequence: positions [start_pos, start_pos + len(token_ids))."""

    seq_id: int
    start_pos: int
    token_ids: tuple[int, ...]
    block_table: tuple[int, ...]  # sent with the first chunk (start_pos == 0)
    wants_token: bool
    sampling: SamplingParams
    draw_index: int


@dataclass(frozen=True)
class PlannedStep:
    step_id: int
    chunks: tuple[Chunk, ...]
    release: tuple[int, ...]


@dataclass(frozen=True)
class TokenEvent:
    token: SampledToken


@dataclass(frozen=True)
class FinishEvent:
    reason: str  # length, stop, eos, cancelled, error
    error: StagemeshError | None = None


class StepSink(Protocol):
    """Where planned steps go (the stream to stage 0); must not block."""

    def send(self, step: PlannedStep) -> None: ...


class Observer:
    """Told about tokens and finished requests (gateway.metrics implements it); does nothing by default."""

    def token(self, seq: Sequence, now: float) -> None:
        pass

    def finished(self, seq: Sequence, reason: str, now: float) -> None:
        pass


class Sequence:
    def __init__(self, seq_id: int, request: GenerationRequest, submitted_at: float) -> None:
        self.seq_id = seq_id
        self.request = request
        self.tokens = list(request.prompt_ids)  # prompt + generated: the full history (replayable)
        self.generated: list[SampledToken] = []
        self.num_computed = 0  # positions whose KV is written or being written
        self.block_table: tuple[int, ...] = ()
        self.inflight = False
        self.finish: str | None = None
        self.events: asyncio.Queue = asyncio.Queue()
        self.submitted_at = submitted_at
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None

    @property
    def prompt_len(self) -> int:
        return len(self.request.prompt_ids)

    @property
    def done(self) -> bool:
        return self.finish is not None

    @property
    def prefilling(self) -> bool:
        return self.num_computed < self.prompt_len


@dataclass(frozen=True)
class SchedulerLimits:
    max_step_tokens: int = 512  # chunked-prefill budget per step
    max_queue: int = 256  # requests waiting for KV space
    max_running: int = 256  # sequences holding KV space
    min_micro_batch: int = 1  # sequences a micro-batch needs to amortise the stage's weight stream (see below)


def micro_batches(running: int, pp: int, min_micro_batch: int) -> int:
    """How many micro-batches to keep in flight for `running` sequences on `pp` stages: pp, so that every
    stage has work, unless that cuts them into micro-batches of fewer than `min_micro_batch` sequences.

    A decode step streams the stage's weights once whatever its batch, and computes per sequence: below the
    batch where the per-sequence work overtakes the weight stream (the device's FLOP/s over its bytes/s,
    times the bytes per parameter over 2 FLOPs), splitting multiplies the weight traffic while the stages
    that would run the pieces in parallel share the same memory (one CPU socket, one GPU): there fewer,
    larger micro-batches do the same work with less traffic. Stages on devices of their own gain from
    every split (min_micro_batch 1, the default)."""
    return max(1, min(pp, running // max(1, min_micro_batch)))


class Scheduler:
    def __init__(self, limits: SchedulerLimits = SchedulerLimits(), clock: Callable[[], float] = time.monotonic):
        self.limits = limits
        self.clock = clock
        self.observer = Observer()
        self.sink: StepSink | None = None
        self.kv: BlockAllocator | None = None
        self.max_inflight = 1
        self.vocab_size = 0
        self.max_context = 0
        self.eos_ids: tuple[int, ...] = ()
        self.not_ready = "no topology from the coordinator yet"
        self.waiting: deque[Sequence] = deque()
        self.running: dict[int, Sequence] = {}
        self.inflight: dict[int, list[int]] = {}
        self.pending_release: list[int] = []
        self._seq_ids = itertools.count(1)
        self._step_ids = itertools.count(1)
        self.suspended = False  # the pipeline is lost, a new one is coming: requests wait, then replay
        self.tokens_out = 0
        self.requests_total = 0
        self.replayed_tokens = 0  # tokens prefilled again after failovers (the cost of replay)

    # ---- mesh lifecycle ----

    def attach(
        self,
        sink: StepSink,
        kv: BlockAllocator,
        max_inflight: int,
        vocab_size: int,
        max_context: int,
        eos_ids: tuple[int, ...],
    ) -> None:
        self.sink, self.kv, self.max_inflight = sink, kv, max_inflight
        self.vocab_size, self.max_context, self.eos_ids = vocab_size, max_context, eos_ids
        if self.suspended:
            self._replay()
        self._schedule()

    def suspend(self, reason: str) -> None:
        """The stream to the stages is gone (and with it their KV), but a new pipeline is coming: keep every
        request; what the stages had computed is forgotten and replayed by the next `attach`."""
        self.sink, self.suspended, self.not_ready = None, True, reason
        for seq in list(self.running.values()):
            seq.inflight = False
            seq.num_computed = 0
            if seq.done:
                self.running.pop(seq.seq_id)
        self.inflight.clear()
        self.pending_release.clear()

    def _replay(self) -> None:
        """Re-admits the running sequences, in arrival order, into the new pipeline's KV space; from
        position 0 they are prefilled again (prompt + generated). Those that no longer fit wait in front."""
        self.suspended = False
        old, self.running = sorted(self.running.values(), key=lambda s: s.seq_id), {}
        self.pending_release.clear()  # the new stages never saw the sequences that ended meanwhile
        for i, seq in enumerate(old):
            tokens = seq.prompt_len + seq.request.max_tokens
            if not self.kv.can_allocate(tokens):
                self.waiting.extendleft(reversed(old[i:]))  # first come, first served, as in _admit
                break
            seq.block_table = tuple(self.kv.allocate(seq.seq_id, tokens))
            self.running[seq.seq_id] = seq
            self.replayed_tokens += len(seq.tokens)

    def detach(self, error: StagemeshError) -> None:
        """The stream to the stages is gone (and with it their KV): every request fails with `error`."""
        self.sink, self.suspended = None, False
        self.not_ready = str(error)
        for seq in [*self.waiting, *self.running.values()]:
            seq.inflight = False
            self._finish(seq, "error", error)
        self.waiting.clear()
        self.inflight.clear()
        self.pending_release.clear()

    # ---- events ----

    def check_ready(self) -> None:
        if self.sink is None and not self.suspended:
            raise Unavailable(f"not ready: {self.not_ready}")

    def submit(self, request: GenerationRequest) -> Sequence:
        self.check_ready()
        request.validate(self.vocab_size, self.max_context)
        need = self.kv.blocks_for(len(request.prompt_ids) + request.max_tokens)
        if need > self.kv.num_blocks:
            raise ResourceExhausted(
                f"prompt + max_tokens need {need} KV blocks; the whole mesh holds {self.kv.num_blocks}"
            )
        if len(self.waiting) >= self.limits.max_queue:
            raise ResourceExhausted(f"the queue is full ({self.limits.max_queue} requests waiting); retry later")
        seq = Sequence(next(self._seq_ids), request, self.clock())
        self.waiting.append(seq)
        self.requests_total += 1
        self._schedule()
        return seq

    def cancel(self, seq: Sequence, reason: str = "cancelled") -> None:
        """Client went away, deadline passed, or a stop string matched: end it and free its KV now."""
        if seq.done:
            return
        if seq in self.waiting:
            self.waiting.remove(seq)
        self._finish(seq, reason)
        self._schedule()

    def on_result(self, step_id: int, tokens: dict[int, SampledToken]) -> None:
        for seq_id in self.inflight.pop(step_id, []):
            seq = self.running.get(seq_id)
            if seq is None:
                continue
            seq.inflight = False
            token = tokens.get(seq_id)
            if token is not None and not seq.done:
                self._append(seq, token)
            if seq.done:
                self._retire(seq)
        self._schedule()

    def on_step_failure(self, step_id: int, error: StagemeshError) -> None:
        """A step failed on a stage that keeps serving (e.g. out of memory): its sequences end with `error`
        and free their KV; every other sequence goes on."""
        for seq_id in self.inflight.pop(step_id, []):
            seq = self.running.get(seq_id)
            if seq is None:
                continue
            seq.inflight = False
            if seq.done:
                self._retire(seq)
            else:
                self._finish(seq, "error", error)
        self._schedule()

    def _append(self, seq: Sequence, token: SampledToken) -> None:
        now = self.clock()
        seq.tokens.append(token.token_id)
        seq.generated.append(token)
        seq.first_token_at = seq.first_token_at or now
        self.observer.token(seq, now)
        seq.last_token_at = now
        self.tokens_out += 1
        seq.events.put_nowait(TokenEvent(token))
        room = self.max_context - len(seq.tokens)
        reason = finish_reason(token.token_id, len(seq.generated), seq.request, self.eos_ids, room)
        if reason:
            self._finish(seq, reason)

    def _finish(self, seq: Sequence, reason: str, error: StagemeshError | None = None) -> None:
        seq.finish = reason
        seq.events.put_nowait(FinishEvent(reason, error))
        self.observer.finished(seq, reason, self.clock())
        if not seq.inflight:
            self._retire(seq)

    def _retire(self, seq: Sequence) -> None:
        if self.running.pop(seq.seq_id, None) is not None:
            self.kv.free(seq.seq_id)
            self.pending_release.append(seq.seq_id)

    # ---- forming steps ----

    def _schedule(self) -> None:
        while self.sink is not None:
            self._admit()
            if len(self.inflight) >= self._micro_batches():
                break
            step = self._next_step()
            if step is None:
                break
            self.sink.send(step)
        if self.sink is not None and not self.inflight and self.pending_release:
            self.sink.send(PlannedStep(next(self._step_ids), (), self._take_release()))

    def _micro_batches(self) -> int:
        return micro_batches(len(self.running), self.max_inflight, self.limits.min_micro_batch)

    def _next_step(self) -> PlannedStep | None:
        ready = [s for s in self.running.values() if not s.inflight and not s.done]
        if not ready:
            return None
        share = math.ceil(len(self.running) / self._micro_batches())
        ready.sort(key=lambda s: (s.prefilling, s.seq_id))  # decodes first, then prompts in arrival order
        budget, chunks = self.limits.max_step_tokens, []
        for seq in ready[:share]:
            if budget <= 0:
                break
            chunk = self._chunk(seq, budget)
            budget -= len(chunk.token_ids)
            chunks.append(chunk)
        step = PlannedStep(next(self._step_ids), tuple(chunks), self._take_release())
        self.inflight[step.step_id] = [c.seq_id for c in chunks]
        return step

    def _admit(self) -> None:
        while self.waiting and len(self.running) < self.limits.max_running:
            seq = self.waiting[0]
            tokens = seq.prompt_len + seq.request.max_tokens
            if not self.kv.can_allocate(tokens):
                break  # first come, first served: later requests wait behind it
            self.waiting.popleft()
            seq.block_table = tuple(self.kv.allocate(seq.seq_id, tokens))
            self.running[seq.seq_id] = seq

    def _chunk(self, seq: Sequence, budget: int) -> Chunk:
        start = seq.num_computed
        count = min(len(seq.tokens) - start, budget)
        seq.num_computed += count
        seq.inflight = True
        return Chunk(
            seq.seq_id,
            start,
            tuple(seq.tokens[start : start + count]),
            seq.block_table if start == 0 else (),
            seq.num_computed == len(seq.tokens),
            seq.request.sampling,
            len(seq.generated),
        )

    def _take_release(self) -> tuple[int, ...]:
        release, self.pending_release = tuple(self.pending_release), []
        return release

    # ---- numbers for status and metrics ----

    @property
    def kv_blocks_used(self) -> int:
        return self.kv.used_blocks if self.kv else 0
