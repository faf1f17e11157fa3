"""One pipeline hop, measured at a real stage leader: decode steps carrying (sequences, hidden) activations
are written into its Forward stream the way the previous stage writes them (same codec, same channel
options), and each step's round trip minus the compute time the stage reports for it is what a hop adds:
encoding, the loopback gRPC stream both ways, decoding and the stage's checks, and the result's return."""

from __future__ import annotations

import asyncio
import math
import time

import torch
from stagemesh.proto import stage_pb2 as pb
from stagemesh.proto import stage_pb2_grpc as pb_grpc
from stagemesh.proto.rpc import aio_channel
from stagemesh.proto.tensor_codec import encode


def hop_overheads(address: str, epoch: int, hidden: torch.Tensor, steps: int, block_size: int) -> list[float]:
    """Seconds each of `steps` decode steps of hidden.shape[0] sequences spent outside the stage's compute."""
    return [overhead for overhead, _ in hop_timings(address, epoch, hidden, steps, block_size)]


def hop_timings(
    address: str, epoch: int, hidden: torch.Tensor, steps: int, block_size: int
) -> list[tuple[float, float]]:
    """(seconds outside the stage's compute, the stage's compute seconds) of each of `steps` decode steps."""
    return asyncio.run(_overheads(address, epoch, hidden, steps, block_size))


async def _overheads(
    address: str, epoch: int, hidden: torch.Tensor, steps: int, block_size: int
) -> list[tuple[float, float]]:
    seqs, per_seq = hidden.shape[0], math.ceil((steps + 1) / block_size)
    channel = aio_channel(address)
    call = pb_grpc.StageStub(channel).Forward()
    samples = []
    try:
        for k in range(steps + 1):  # step 0 registers the sequences (a first step carries the block tables)
            tables = [list(range(i * per_seq, (i + 1) * per_seq)) if k == 0 else [] for i in range(seqs)]
            start = time.perf_counter()
            await call.write(_step(k, epoch, tables, hidden))
            result = await call.read()
            busy = sum(t.busy_seconds for t in result.timings)
            if k:
                samples.append((time.perf_counter() - start - busy, busy))
        await call.done_writing()
    finally:
        call.cancel()
        await channel.close()
    return samples


def _step(k: int, epoch: int, tables: list[list[int]], hidden: torch.Tensor) -> pb.Step:
    seqs = [
        pb.SeqStep(seq_id=i, start_pos=k, num_tokens=1, block_table=table, wants_token=True, draw_index=k)
        for i, table in enumerate(tables)
    ]
    return pb.Step(step_id=k, epoch=epoch, seqs=seqs, hidden=encode(hidden))


def hop_profile(
    hidden: torch.Tensor, epoch: int, median_seconds: float, reps: int, busy_seconds: float = 0.0
) -> list[str]:
    """What one hop's time is made of: the bare gRPC round trip of the same bytes, the same when the echo
    computes as long as the stage did in between, the Step codec, the servicer's own Python, the rest."""
    from stagemesh.benchmarks.echo import codec_seconds, echo_round_trip

    build = lambda: _step(1, epoch, [[] for _ in range(hidden.shape[0])], hidden)  # noqa: E731
    nbytes = len(build().SerializeToString())
    send, receive = codec_seconds(build)
    handlers = servicer_seconds(build())
    echo = echo_round_trip(nbytes, max(reps, 20))
    lines = [
        f"bare grpc.aio stream echo of the same {nbytes} bytes to another process and back: {echo * 1e3:.3f} ms",
        f"Step codec: build + encode + serialise {send * 1e6:.0f} us, parse + decode {receive * 1e6:.0f} us",
        f"the stage servicer's per-step functions in-process (sequence table, step checks, step_work, result "
        f"message): {handlers * 1e6:.0f} us",
    ]
    if busy_seconds > 0:
        slept = echo_round_trip(nbytes, max(reps, 20), busy_seconds)
        lines.append(
            f"the same echo when it first computes {busy_seconds * 1e3:.1f} ms on its event loop's thread (the "
            f"stage's median step here), that time left out: {slept * 1e3:.3f} ms; the extra "
            f"{(slept - echo) * 1e3:.3f} ms is both ends waking up after sleeping through the compute (the "
            "sender's gRPC poller thread and event loop, the receiver's; on a VM an idle vCPU halts and its "
            "wake-up is an interrupt to the host), with no stage code involved"
        )
        echo = slept
    rest = median_seconds - echo - send - receive - handlers
    lines.append(
        f"left: {rest * 1e3:.3f} ms of the stage's hand-offs beyond that floor (the step loop to the compute "
        "thread and back is inside the compute time the stage reports, so not in this row)"
    )
    return lines


def servicer_seconds(step: pb.Step, reps: int = 100) -> float:
    """Median seconds of the Python the stage's Forward servicer runs per step besides the codec and compute:
    SequenceTable.apply, step_work, the result message (stage_worker.server's own functions)."""
    import statistics

    from stagemesh.models.requests import SampledToken
    from stagemesh.stage_worker.sequences import SequenceTable
    from stagemesh.stage_worker.server import seq_request, step_work, token_messages

    n = len(step.seqs)
    table = SequenceTable(num_blocks=n, block_size=1 << 20)
    table.apply([seq_request(pb.SeqStep(seq_id=i, num_tokens=1, block_table=[i])) for i in range(n)], [])
    samples = []
    for k in range(1, reps + 1):
        for s in step.seqs:
            s.start_pos = k
        start = time.perf_counter()
        seqs = [seq_request(s) for s in step.seqs]
        chunks = table.apply(seqs, list(step.release))
        step_work(step, chunks, False, seqs)
        tokens = token_messages(chunks, [SampledToken(3, -1.0)] * n)
        pb.StepResult(step_id=k, tokens=tokens, timings=[pb.StageTiming(stage=1, busy_seconds=0.0)]).SerializeToString()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)
