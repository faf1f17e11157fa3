"""Driving real meshes from the benchmark: start one with its logs in a file, send a burst of concurrent
streaming requests and time each on the client side, read each worker's compute time from the coordinator."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from stagemesh.deploy.commands import MeshLayout
from stagemesh.deploy.launcher import LocalMesh


@dataclass(frozen=True)
class RequestTiming:
    tokens: int
    ttft: float  # seconds from sending the request to its first token, on the client
    e2e: float  # seconds to its last token
    gaps: tuple[float, ...]  # seconds between consecutive token-carrying chunks


@dataclass(frozen=True)
class Burst:
    wall: float  # from the first request sent to the last token received
    requests: tuple[RequestTiming, ...]

    @property
    def tokens(self) -> int:
        return sum(r.tokens for r in self.requests)

    @property
    def throughput(self) -> float:
        return self.tokens / self.wall


@contextlib.contextmanager
def children_log(path: Path) -> Iterator[None]:
    """Processes started inside inherit `path` as their stderr (mesh services log every request there)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(path, "a") as log:
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


@contextlib.contextmanager
def running_mesh(layout: MeshLayout, log_path: Path) -> Iterator[LocalMesh]:
    with open(log_path, "a") as log:
        mesh = LocalMesh(layout, log=log)
        try:
            with children_log(log_path):
                mesh.start()
            yield mesh
        finally:
            mesh.stop()


def burst(address: str, requests: list[tuple[list[int], int]], timeout: float = 900.0) -> Burst:
    """Sends every (prompt ids, max_tokens) request at once and waits for all of them."""
    return asyncio.run(_burst(address, requests, timeout))


async def _burst(address: str, requests: list[tuple[list[int], int]], timeout: float) -> Burst:
    from stagemesh.gateway.client import AsyncClient

    async with AsyncClient(address, timeout=timeout) as client:
        start = time.perf_counter()
        timings = await asyncio.gather(*(_one(client, prompt, n) for prompt, n in requests))
        return Burst(time.perf_counter() - start, tuple(timings))


async def _one(client, prompt: list[int], max_tokens: int) -> RequestTiming:
    from stagemesh.gateway.client import GenerationParams

    start = time.perf_counter()
    arrivals = []
    async for chunk in client.stream(GenerationParams(prompt, max_tokens=max_tokens, ignore_eos=True)):
        arrivals += [time.perf_counter()] * len(chunk.token_ids)
    if len(arrivals) != max_tokens:
        raise RuntimeError(f"asked for {max_tokens} tokens, got {len(arrivals)}")
    gaps = tuple(b - a for a, b in zip(arrivals, arrivals[1:]))
    return RequestTiming(len(arrivals), arrivals[0] - start, arrivals[-1] - start, gaps)


def worker_stats(mesh: LocalMesh, since: float | None = None) -> dict[str, tuple[int, float]]:
    """{role: (steps, busy seconds)} of every worker, as heartbeated to the coordinator; with `since` (a
    time.monotonic()), waits until every worker has heartbeated after it (workers report once a second)."""
    from stagemesh.coordinator.client import cluster_status

    deadline = time.monotonic() + HEARTBEAT_TIMEOUT
    while True:
        status = cluster_status(mesh.coordinator)
        fresh = since is None or all(time.monotonic() - w.last_heartbeat_age > since for w in status.workers)
        if fresh or time.monotonic() > deadline:
            return {_role(w): (w.steps, w.busy_seconds) for w in status.workers}
        time.sleep(0.05)


def _role(w) -> str:
    return f"stage {w.stage} rank {w.tp_rank}" if w.kind == "stage" else f"experts {w.expert_index}"


def stats_delta(before: dict, after: dict) -> dict[str, tuple[int, float]]:
    return {k: (after[k][0] - before[k][0], after[k][1] - before[k][1]) for k in after if k in before}


HEARTBEAT_TIMEOUT = 3.0  # workers heartbeat once a second; give up waiting for a fresh report after this


def measured_burst(mesh: LocalMesh, requests: list[tuple[list[int], int]], meter=None) -> tuple[Burst, dict]:
    """A burst plus what each worker computed during it ({role: (steps, busy seconds)}); `meter`, a
    context manager, is entered around the burst alone."""
    before = worker_stats(mesh, since=time.monotonic())
    with meter or contextlib.nullcontext():
        result = burst(mesh.gateway, requests)
    return result, stats_delta(before, worker_stats(mesh, since=time.monotonic()))
