"""The floor under one stage hop: a bare grpc.aio bidirectional stream that echoes raw bytes, served by
another process with the project's server and channel options (proto.rpc), and the Step codec's own cost.
With COMPUTE_MS, the echo first keeps one thread busy with float32 GEMVs that long, as a stage computes a
step between receiving it and answering, and its reply carries the seconds it computed (first 8 bytes).

    python -m stagemesh.benchmarks.echo [COMPUTE_MS]   (serves; prints `ready echo address=HOST:PORT`; stops
                                                        on SIGTERM)
"""

from __future__ import annotations

import asyncio
import statistics
import struct
import subprocess
import sys
import time

import grpc

METHOD = "/stagemesh.bench.Echo/Stream"


def _compute(seconds: float) -> float:
    """GEMVs over a 4 MiB matrix on this thread for `seconds`; returns the seconds it took."""
    import torch

    start = time.perf_counter()
    if seconds > 0:
        torch.set_num_threads(1)
        weight, x = torch.randn(1024, 1024), torch.randn(8, 1024)
        while time.perf_counter() - start < seconds:
            torch.nn.functional.linear(x, weight)
    return time.perf_counter() - start


async def serve(compute_seconds: float = 0.0) -> None:
    from stagemesh.proto.rpc import bind, create_server, run_service

    async def echo(requests, context):
        async for data in requests:
            if compute_seconds:  # on the event loop's thread: what the stage's compute thread adds is counted apart
                data = struct.pack("d", _compute(compute_seconds)) + data[8:]
            yield data

    server, _ = create_server()
    handler = grpc.stream_stream_rpc_method_handler(echo)  # no (de)serializers: bytes in, bytes out
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("stagemesh.bench.Echo", {"Stream": handler})])
    port = bind(server, "127.0.0.1", 0)
    await server.start()
    await run_service("echo", f"127.0.0.1:{port}", server)


def echo_round_trip(nbytes: int, reps: int, compute_seconds: float = 0.0) -> float:
    """Median seconds for a message of `nbytes` to go to the echo process and back on one stream, less the
    `compute_seconds` the echo spends computing before it answers (when given)."""
    argv = [sys.executable, "-m", "stagemesh.benchmarks.echo", str(compute_seconds * 1e3)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        if "address=" not in line:
            raise RuntimeError(f"echo server did not start: {line!r}")
        address = line.split("address=", 1)[1].strip()
        return asyncio.run(_round_trips(address, max(nbytes, 8), reps, compute_seconds > 0))
    finally:
        proc.terminate()
        proc.wait(10)


async def _round_trips(address: str, nbytes: int, reps: int, computes: bool) -> float:
    from stagemesh.proto.rpc import aio_channel

    payload, samples = b"\x01" * nbytes, []
    async with aio_channel(address) as channel:
        call = channel.stream_stream(METHOD)()
        for i in range(reps + 5):
            start = time.perf_counter()
            await call.write(payload)
            reply = await call.read()
            busy = struct.unpack("d", reply[:8])[0] if computes else 0.0
            if i >= 5:
                samples.append(time.perf_counter() - start - busy)
        await call.done_writing()
    return statistics.median(samples)


def codec_seconds(build, reps: int = 200) -> tuple[float, float]:
    """Median seconds to build (encode the tensor into) a pb.Step and serialise it, and to parse it back
    and decode its hidden tensor; `build()` returns the message."""
    from stagemesh.proto.tensor_codec import decode

    message = build()
    data, kind = message.SerializeToString(), type(message)
    send = _median_time(lambda: build().SerializeToString(), reps)
    return send, _median_time(lambda: decode(kind.FromString(data).hidden), reps)


def _median_time(fn, reps: int) -> float:
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


if __name__ == "__main__":
    asyncio.run(serve(float(sys.argv[1]) / 1e3 if len(sys.argv) > 1 else 0.0))
