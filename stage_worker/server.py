"""The stage leader's `Forward` service: steps in, activations to the next stage, tokens back.

Each upstream stream gets a ForwardLink with its own SequenceTable and, unless this is the last stage,
its own stream to the next stage's leader; results flowing back are relayed upstream in order. Torch
work runs on the runtime's single compute thread, so TP broadcasts keep one global order.
"""

from __future__ import annotations

import asyncio
import logging
import time

import grpc
import torch
from stagemesh.errors import InvalidArgument, StagemeshError, Unavailable
from stagemesh.models.batch import SeqChunk
from stagemesh.models.requests import SampledToken, SamplingParams
from stagemesh.proto import stage_pb2 as pb
from stagemesh.proto import stage_pb2_grpc as pb_grpc
from stagemesh.proto.rpc import aio_channel, error_from_rpc, status_code
from stagemesh.proto.tensor_codec import decode, encode
from stagemesh.stage_worker.engine import StepWork
from stagemesh.stage_worker.sequences import SeqRequest, SequenceTable

log = logging.getLogger("stagemesh.stage")
SERVICE = pb.DESCRIPTOR.services_by_name["Stage"].full_name
TOPOLOGY_WAIT_SECONDS = 2.0  # a stream's epoch reaches the gateway and this stage's watch moments apart


class StageServicer(pb_grpc.StageServicer):
    def __init__(self, runtime) -> None:
        self.runtime = runtime  # stage_worker.worker.StageRuntime

    async def Forward(self, request_iterator, context) -> None:
        if not self.runtime.ready:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "stage worker is still loading")
        link = ForwardLink(self.runtime, context.write)
        try:
            error = await link.run(request_iterator)
        finally:
            await link.close()
        if error is not None:
            await context.abort(status_code(error), str(error))


class ForwardLink:
    """One upstream stream: its sequences, and its stream to the next stage. Results are written upstream
    as they come (the last stage's from the step loop, the others' from the relay of the next stage)."""

    def __init__(self, runtime, write) -> None:
        self.runtime = runtime
        self.write = write  # the upstream stream's context.write
        self.table = SequenceTable(runtime.num_blocks, runtime.block_size)
        self.downstream = None
        self._channel = None
        self._busy: dict[int, float] = {}  # step_id -> this stage's compute seconds, added to results going up
        self._writing = asyncio.Lock()  # results go up from the step loop and the relay
        runtime.links.add(self)

    async def run(self, requests) -> StagemeshError | None:
        """Serves the stream until it ends; returns the error that ended it, if any."""
        tasks = []
        try:
            requests = aiter(requests)
            first = await anext(requests, None)  # its epoch says which topology the next stage is from
            if first is None:
                return None
            if not self.runtime.engine.is_last:
                await self._open_downstream(first.epoch)
                tasks.append(asyncio.ensure_future(self._relay()))
            tasks.append(asyncio.ensure_future(self._steps(first, requests)))
            pending = set(tasks)
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_EXCEPTION)
                for task in done:
                    task.result()
            return None
        except StagemeshError as e:
            return e
        except grpc.aio.AioRpcError as e:
            return error_from_rpc(e, f"stage {self.runtime.stage + 1}")
        except Exception as e:  # a bug: report it on this stream, keep serving others
            log.exception("step failed")
            return StagemeshError(f"stage {self.runtime.stage} failed: {e}")
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)  # no write may be pending when the stream ends

    async def _steps(self, first: pb.Step, requests) -> None:
        await self._handle(first)
        async for step in requests:
            await self._handle(step)
        if self.downstream is not None:
            await self.downstream.done_writing()

    async def _handle(self, step: pb.Step) -> None:
        runtime = self.runtime
        if step.epoch < runtime.epoch:
            raise Unavailable(f"topology changed: step from epoch {step.epoch}, the mesh is at epoch {runtime.epoch}")
        seqs = [seq_request(s) for s in step.seqs]
        chunks = self.table.apply(seqs, list(step.release))
        start = time.perf_counter()
        if chunks:
            work = step_work(step, chunks, runtime.engine.is_first, seqs)
            runtime.engine.check(work)
            payload = resolved_step(step, chunks).SerializeToString() if runtime.group else None
            try:
                out = await asyncio.get_running_loop().run_in_executor(runtime.executor, runtime.compute, payload, work)
            except StagemeshError as e:
                if runtime.broken and e.code == "UNAVAILABLE":  # the TP group is re-formed: the stream ends
                    raise
                await self._fail(step, chunks, e)
                return
        else:  # only releases: nothing to compute, but the next stages must forget them too
            out = [] if runtime.engine.is_last else torch.empty(0, runtime.hidden_size, dtype=runtime.dtype)
        busy = time.perf_counter() - start
        if runtime.engine.is_last:
            timing = pb.StageTiming(stage=runtime.stage, busy_seconds=busy)
            await self._send_up(
                pb.StepResult(step_id=step.step_id, tokens=token_messages(chunks, out), timings=[timing])
            )
            return
        self._busy[step.step_id] = busy
        down = pb.Step(step_id=step.step_id, epoch=step.epoch, seqs=step.seqs, hidden=encode(out), release=step.release)
        await self.downstream.write(down)

    async def _fail(self, step: pb.Step, chunks: list[SeqChunk], error: StagemeshError) -> None:
        """The step failed here alone: forget its sequences (the gateway fails their requests and frees their
        KV blocks; the other stages forget them with its next release) and say so upstream; the stream goes on."""
        self.table.release([c.seq_id for c in chunks])
        log.warning("step %d failed: %s", step.step_id, error)
        failure = pb.StepFailure(code=error.code, message=str(error))
        await self._send_up(pb.StepResult(step_id=step.step_id, failure=failure))

    async def _send_up(self, result: pb.StepResult) -> None:
        """One write at a time, and never cut short: a write cancelled half-way leaves gRPC unable to send
        the stream's status (GRPC_CALL_ERROR_TOO_MANY_OPERATIONS) and the caller waits for nothing."""
        async with self._writing:
            write = asyncio.ensure_future(self.write(result))
            try:
                await asyncio.shield(write)
            except asyncio.CancelledError:
                await asyncio.gather(write, return_exceptions=True)
                raise

    async def _open_downstream(self, epoch: int) -> None:
        """The gateway may open its stream as soon as the mesh is ready (again, after a takeover), a moment
        before this worker's own topology watch says so: wait a little for the next stage's address as of
        the stream's pipeline epoch, not the one before (it may be a dead worker's)."""
        stage = self.runtime.stage
        try:
            address = await self.runtime.stage_address(stage + 1, epoch, TOPOLOGY_WAIT_SECONDS)
        except asyncio.TimeoutError:
            raise Unavailable(
                f"topology changed: stage {stage + 1} of pipeline epoch {epoch} is not known here yet"
            ) from None
        self._channel = aio_channel(address)
        self.downstream = pb_grpc.StageStub(self._channel).Forward()

    async def _relay(self) -> None:
        async for result in self.downstream:
            busy = self._busy.pop(result.step_id, 0.0)
            result.timings.append(pb.StageTiming(stage=self.runtime.stage, busy_seconds=busy))
            await self._send_up(result)

    async def close(self) -> None:
        self.runtime.links.discard(self)
        if self.downstream is not None:
            self.downstream.cancel()
        if self._channel is not None:
            await self._channel.close()


# ---- protobuf <-> domain ----


def seq_request(s: pb.SeqStep) -> SeqRequest:
    p = s.sampling
    try:
        sampling = SamplingParams(p.temperature, p.top_p or 1.0, p.top_k, p.seed, p.logprobs)
    except StagemeshError as e:
        raise InvalidArgument(f"sequence {s.seq_id}: {e}") from None
    return SeqRequest(s.seq_id, s.start_pos, s.num_tokens, tuple(s.block_table), s.wants_token, sampling, s.draw_index)


def step_work(step: pb.Step, chunks: list[SeqChunk], is_first: bool, seqs: list[SeqRequest]) -> StepWork:
    """`seqs`: the step's sequences as seq_request read them (once per step)."""
    token_ids = hidden = None
    if is_first:
        token_ids = torch.tensor(list(step.token_ids), dtype=torch.long)
    elif step.HasField("hidden"):
        hidden = decode(step.hidden)
    sampling = tuple((s.sampling, s.draw_index) for s in seqs if s.wants_token)
    return StepWork(step.step_id, tuple(chunks), token_ids, hidden, sampling)


def resolved_step(step: pb.Step, chunks: list[SeqChunk]) -> pb.Step:
    """The step with every sequence's block table filled in: all a TP peer needs (it keeps no table)."""
    seqs = [
        pb.SeqStep(
            seq_id=c.seq_id,
            start_pos=c.start_pos,
            num_tokens=c.num_tokens,
            block_table=c.block_table,
            wants_token=c.wants_logits,
        )
        for c in chunks
    ]
    resolved = pb.Step(step_id=step.step_id, epoch=step.epoch, seqs=seqs, token_ids=step.token_ids)
    if step.HasField("hidden"):
        resolved.hidden.CopyFrom(step.hidden)
    return resolved


def peer_work(payload: bytes) -> StepWork:
    step = pb.Step.FromString(payload)
    chunks = [SeqChunk(s.seq_id, s.start_pos, s.num_tokens, tuple(s.block_table), s.wants_token) for s in step.seqs]
    token_ids = torch.tensor(list(step.token_ids), dtype=torch.long) if step.token_ids else None
    hidden = decode(step.hidden) if step.HasField("hidden") else None
    return StepWork(step.step_id, tuple(chunks), token_ids, hidden)


def token_messages(chunks: list[SeqChunk], tokens: list[SampledToken]) -> list[pb.SeqToken]:
    wanting = [c for c in chunks if c.wants_logits]
    return [
        pb.SeqToken(
            seq_id=c.seq_id,
            token_id=t.token_id,
            logprob=t.logprob,
            top=[pb.TokenLogprob(token_id=i, logprob=lp) for i, lp in t.top_logprobs],
        )
        for c, t in zip(wanting, tokens)
    ]
