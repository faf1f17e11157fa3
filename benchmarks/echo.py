"""The floor under one stage hop: a bare grpc.aio bidirectional stream that echoes raw bytes, served by
another process with the project's server and channel options (proto.rpc), and the Step codec's own cost.

    python -m stagemesh.benchmarks.echo   (serves; prints `ready echo address=HOST:PORT`; stops on SIGTERM)
"""

from __future__ import annotations

import asyncio
import statistics
import subprocess
import sys
import time

import grpc

METHOD = "/stagemesh.bench.Echo/Stream"


async def _echo(requests, context):
    async for data in requests:
        yield data


async def serve() -> None:
    from stagemesh.proto.rpc import bind, create_server, run_service

    server, _ = create_server()
    handler = grpc.stream_stream_rpc_method_handler(_echo)  # no (de)serializers: bytes in, bytes out
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("stagemesh.bench.Echo", {"Stream": handler})])
    port = bind(server, "127.0.0.1", 0)
    await server.start()
    await run_service("echo", f"127.0.0.1:{port}", server)


def echo_round_trip(nbytes: int, reps: int) -> float:
    """Median seconds for a message of `nbytes` to go to the echo process and back on one stream."""
    proc = subprocess.Popen([sys.executable, "-m", "stagemesh.benchmarks.echo"], stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        if "address=" not in line:
            raise RuntimeError(f"echo server did not start: {line!r}")
        return asyncio.run(_round_trips(line.split("address=", 1)[1].strip(), nbytes, reps))
    finally:
        proc.terminate()
        proc.wait(10)


async def _round_trips(address: str, nbytes: int, reps: int) -> float:
    from stagemesh.proto.rpc import aio_channel

    payload, samples = b"\x01" * nbytes, []
    async with aio_channel(address) as channel:
        call = channel.stream_stream(METHOD)()
        for i in range(reps + 5):
            start = time.perf_counter()
            await call.write(payload)
            await call.read()
            if i >= 5:
                samples.append(time.perf_counter() - start)
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
    asyncio.run(serve())
