"""The gateway's end of the pipeline: one Forward stream to stage 0's leader. Planned steps are written in
order by one writer task; results are read back in order and handed to the scheduler."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import grpc
from stagemesh.errors import StagemeshError, Unavailable, error_for_code
from stagemesh.gateway.scheduler import PlannedStep
from stagemesh.models.requests import SampledToken
from stagemesh.proto import stage_pb2 as pb
from stagemesh.proto import stage_pb2_grpc as pb_grpc
from stagemesh.proto.rpc import aio_channel, error_from_rpc

log = logging.getLogger("stagemesh.gateway")


class PipelineLink:
    def __init__(
        self,
        address: str,
        epoch: int,
        on_result: Callable[[int, dict[int, SampledToken], list[tuple[int, float]]], None],
        on_failure: Callable[[StagemeshError], None],
        on_step_failure: Callable[[int, StagemeshError], None] | None = None,
    ) -> None:
        self.address, self.epoch = address, epoch
        self.on_result, self.on_failure = on_result, on_failure
        self.on_step_failure = on_step_failure  # one step failed on a stage that keeps serving
        self._queue: asyncio.Queue[pb.Step] = asyncio.Queue()
        self._channel = aio_channel(address)
        self._call = pb_grpc.StageStub(self._channel).Forward()
        self._tasks = [asyncio.ensure_future(self._write()), asyncio.ensure_future(self._read())]
        self._closed = False

    def send(self, step: PlannedStep) -> None:
        self._queue.put_nowait(step_message(step, self.epoch))

    async def _write(self) -> None:
        try:
            while True:
                await self._call.write(await self._queue.get())
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            pass  # the reader reports why the stream ended

    async def _read(self) -> None:
        try:
            async for result in self._call:
                if result.HasField("failure") and self.on_step_failure is not None:
                    self.on_step_failure(result.step_id, error_for_code(result.failure.code, result.failure.message))
                    continue
                tokens = {t.seq_id: sampled_token(t) for t in result.tokens}
                self.on_result(result.step_id, tokens, [(t.stage, t.busy_seconds) for t in result.timings])
            error = Unavailable(f"stage 0 at {self.address} closed the stream")
        except grpc.aio.AioRpcError as e:
            error = error_from_rpc(e, f"pipeline (stage 0 at {self.address})")
            if e.code() == grpc.StatusCode.INTERNAL:
                # A write that fails inside gRPC core (the stream just broke: a worker died) marks the call
                # INTERNAL here, hiding the status stage 0 sent; seen in the soak with a kill. A broken
                # stream, then: the service holds the requests and fails them if the topology stays the same.
                error = Unavailable(f"pipeline (stage 0 at {self.address}): the stream broke ({e.details()})")
        if not self._closed:
            log.warning("%s", error)
            self.on_failure(error)

    async def close(self) -> None:
        self._closed = True
        self._call.cancel()
        for t in self._tasks:
            t.cancel()
        await self._channel.close()


def step_message(step: PlannedStep, epoch: int) -> pb.Step:
    seqs, token_ids = [], []
    for c in step.chunks:
        s = c.sampling
        sampling = pb.SamplingParams(
            temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, seed=s.seed, logprobs=s.logprobs
        )
        seqs.append(
            pb.SeqStep(
                seq_id=c.seq_id,
                start_pos=c.start_pos,
                num_tokens=len(c.token_ids),
                block_table=c.block_table,
                wants_token=c.wants_token,
                sampling=sampling,
                draw_index=c.draw_index,
            )
        )
        token_ids.extend(c.token_ids)
    return pb.Step(step_id=step.step_id, epoch=epoch, seqs=seqs, token_ids=token_ids, release=step.release)


def sampled_token(t: pb.SeqToken) -> SampledToken:
    return SampledToken(t.token_id, t.logprob, tuple((x.token_id, x.logprob) for x in t.top))
