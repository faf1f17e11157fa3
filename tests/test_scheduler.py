"""Scheduler bookkeeping, driven directly (no network): micro-batches, chunked prefill, KV, releases.

The end-to-end behaviour through real processes is in test_serving.py; these pin the batching rules.
"""

from __future__ import annotations

import asyncio

import pytest
from stagemesh.errors import InvalidArgument, ResourceExhausted, Unavailable
from stagemesh.gateway.scheduler import (
    FinishEvent,
    PlannedStep,
    Scheduler,
    SchedulerLimits,
    TokenEvent,
    micro_batches,
)
from stagemesh.models.blocks import BlockAllocator
from stagemesh.models.requests import GenerationRequest, SampledToken


class RecordingSink:
    def __init__(self) -> None:
        self.steps: list[PlannedStep] = []

    def send(self, step: PlannedStep) -> None:
        self.steps.append(step)


def make(pp=2, blocks=64, block_size=4, limits=SchedulerLimits(), eos=(2,)):
    scheduler, sink = Scheduler(limits), RecordingSink()
    scheduler.attach(sink, BlockAllocator(blocks, block_size), pp, vocab_size=100, max_context=64, eos_ids=eos)
    return scheduler, sink


def request(prompt_len=3, max_tokens=4, **kwargs) -> GenerationRequest:
    return GenerationRequest(tuple(range(10, 10 + prompt_len)), max_tokens, **kwargs)


def answer(scheduler: Scheduler, step: PlannedStep, token: int = 50) -> None:
    scheduler.on_result(step.step_id, {c.seq_id: SampledToken(token, -1.0) for c in step.chunks if c.wants_token})


def run(coro):
    return asyncio.run(coro)


def test_pp_micro_batches_in_flight_each_with_a_fair_share():
    async def go():
        scheduler, sink = make(pp=2)
        for _ in range(4):
            scheduler.submit(request())
        # Two micro-batches in flight at once; requests arriving while both are out join the next step.
        assert len(scheduler.inflight) == 2
        assert [len(s.chunks) for s in sink.steps] == [1, 1]
        answer(scheduler, sink.steps[0])
        assert len(scheduler.inflight) == 2  # the freed slot is filled at once ...
        third = sink.steps[2]
        assert len(third.chunks) == 2  # ... with its fair share: 4 sequences over 2 micro-batches
        assert third.chunks[0].seq_id == 1 and len(third.chunks[0].token_ids) == 1  # the decode goes first
        answer(scheduler, sink.steps[1])
        assert len(sink.steps[3].chunks) == 2
        in_flight = [c.seq_id for s in sink.steps[2:] for c in s.chunks]
        assert sorted(in_flight) == [1, 2, 3, 4]  # no sequence is in two micro-batches

    run(go())


def test_micro_batches_are_never_cut_below_what_amortises_the_weight_stream():
    # pp pieces while each keeps at least min_micro_batch sequences; fewer, larger ones below that
    assert [micro_batches(n, 2, 1) for n in (0, 1, 2, 3, 64)] == [1, 1, 2, 2, 2]
    assert [micro_batches(n, 2, 16) for n in (1, 16, 31, 32, 64)] == [1, 1, 1, 2, 2]
    assert [micro_batches(n, 4, 8) for n in (8, 16, 24, 31, 32, 200)] == [1, 2, 3, 3, 4, 4]
    assert micro_batches(64, 1, 16) == 1

    async def go():
        scheduler, sink = make(pp=2, blocks=256, limits=SchedulerLimits(min_micro_batch=4))
        for _ in range(6):
            scheduler.submit(request(prompt_len=1))
        # 6 sequences cannot make two micro-batches of 4: the first step took the one request there was, the
        # rest wait for it rather than go out in a second, smaller micro-batch
        assert [len(s.chunks) for s in sink.steps] == [1]
        answer(scheduler, sink.steps[0])
        assert [len(s.chunks) for s in sink.steps[1:]] == [6]  # one micro-batch of all six
        for _ in range(2):
            scheduler.submit(request(prompt_len=1))
        # 8 sequences make pp micro-batches of 4: the two newcomers go out at once as the second one ...
        assert [len(s.chunks) for s in sink.steps[2:]] == [2] and len(scheduler.inflight) == 2
        answer(scheduler, sink.steps[1])
        assert [len(s.chunks) for s in sink.steps[3:]] == [4]  # ... and the six returning take their share

    run(go())


def test_decode_steps_carry_one_token_and_finish_frees_kv_and_releases():
    async def go():
        scheduler, sink = make(pp=1)
        seq = scheduler.submit(request(prompt_len=5, max_tokens=2))
        first = sink.steps[0].chunks[0]
        assert (first.start_pos, len(first.token_ids), first.wants_token, first.block_table) == (0, 5, True, (0, 1))
        answer(scheduler, sink.steps[0], 7)
        second = sink.steps[1].chunks[0]
        assert (second.start_pos, second.token_ids, second.block_table, second.draw_index) == (5, (7,), (), 1)
        answer(scheduler, sink.steps[1], 8)
        assert [type(e) for e in _drain(seq)] == [TokenEvent, TokenEvent, FinishEvent]
        assert scheduler.kv.used_blocks == 0 and not scheduler.running
        assert sink.steps[-1].release == (seq.seq_id,) and not sink.steps[-1].chunks

    run(go())


def test_chunked_prefill_keeps_decodes_going():
    async def go():
        scheduler, sink = make(pp=1, limits=SchedulerLimits(max_step_tokens=8))
        short = scheduler.submit(request(prompt_len=2, max_tokens=10))
        answer(scheduler, sink.steps[-1])
        scheduler.submit(request(prompt_len=30, max_tokens=2))
        for _ in range(3):
            step = sink.steps[-1]
            assert sum(len(c.token_ids) for c in step.chunks) <= 8
            assert step.chunks[0].seq_id == short.seq_id and len(step.chunks[0].token_ids) == 1  # decode first
            answer(scheduler, step)
        long_chunks = [c for s in sink.steps for c in s.chunks if c.seq_id != short.seq_id]
        assert [c.start_pos for c in long_chunks] == [0, 7, 14]
        assert not any(c.wants_token for c in long_chunks)

    run(go())


def test_eos_stop_tokens_and_length():
    async def go():
        scheduler, sink = make(pp=1)
        for req, token, reason in [
            (request(), 2, "eos"),
            (request(stop_token_ids=(33,)), 33, "stop"),
            (request(ignore_eos=True), 2, None),
        ]:
            seq = scheduler.submit(req)
            answer(scheduler, sink.steps[-1], token)
            assert seq.finish == reason
        for _ in range(3):
            answer(scheduler, sink.steps[-1], 2)
        assert seq.finish == "length" and len(seq.generated) == 4

    run(go())


def test_cancel_frees_kv_at_once_or_when_its_step_returns():
    async def go():
        scheduler, sink = make(pp=1)
        seq = scheduler.submit(request(max_tokens=20))
        assert scheduler.kv.used_blocks > 0
        scheduler.cancel(seq)  # in flight: freed when the step comes back
        assert scheduler.kv.used_blocks > 0
        answer(scheduler, sink.steps[-1])
        assert scheduler.kv.used_blocks == 0 and seq.finish == "cancelled"
        assert [type(e) for e in _drain(seq)] == [FinishEvent]  # no token after the cancel
        assert sink.steps[-1].release == (seq.seq_id,)

    run(go())


def test_waiting_requests_queue_behind_kv_and_a_full_queue_is_resource_exhausted():
    async def go():
        scheduler, _ = make(pp=1, blocks=4, block_size=4, limits=SchedulerLimits(max_queue=1))
        scheduler.submit(request(prompt_len=8, max_tokens=8))  # all 4 blocks
        assert scheduler.submit(request()) in scheduler.waiting
        with pytest.raises(ResourceExhausted, match="queue is full"):
            scheduler.submit(request())

    run(go())


def test_a_request_larger_than_the_whole_cache_is_resource_exhausted():
    async def go():
        scheduler, _ = make(pp=1, blocks=4, block_size=4)
        with pytest.raises(ResourceExhausted, match="need 5 KV blocks; the whole mesh holds 4"):
            scheduler.submit(request(prompt_len=10, max_tokens=10))

    run(go())


def test_admission_follows_arrival_order_when_kv_frees():
    async def go():
        scheduler, sink = make(pp=1, blocks=4, block_size=4)
        first = scheduler.submit(request(prompt_len=8, max_tokens=8))
        second = scheduler.submit(request())
        assert second in scheduler.waiting
        scheduler.cancel(first)
        answer(scheduler, sink.steps[0])
        assert second.seq_id in scheduler.running

    run(go())


def test_not_attached_is_unavailable_and_bad_requests_are_invalid():
    async def go():
        scheduler = Scheduler()
        with pytest.raises(Unavailable, match="not ready"):
            scheduler.submit(request())
        scheduler, _ = make()
        with pytest.raises(InvalidArgument, match="token ids must be in"):
            scheduler.submit(GenerationRequest((5, 500), 3))
        with pytest.raises(InvalidArgument, match="exceeds the context of 64"):
            scheduler.submit(request(prompt_len=40, max_tokens=30))

    run(go())


def test_detach_fails_everything_with_the_reason():
    async def go():
        scheduler, sink = make(pp=2)
        seqs = [scheduler.submit(request()) for _ in range(3)]
        scheduler.detach(Unavailable("stage 1 is down"))
        for seq in seqs:
            event = _drain(seq)[-1]
            assert event.reason == "error" and "stage 1 is down" in str(event.error)
        assert scheduler.kv.used_blocks == 0 and not scheduler.inflight

    run(go())


def _drain(seq) -> list:
    events = []
    while not seq.events.empty():
        events.append(seq.events.get_nowait())
    return events
