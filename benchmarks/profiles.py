"""Where the time went, summarised in a few lines for a missed target: torch.profiler's top operators of
an in-process run, and the CPU seconds each mesh process burnt against the wall time of a mesh run."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil


def torch_top_ops(
    run: Callable[[], object], per: int, label: str, top: int = 6, minus: Callable[[], object] | None = None
) -> list[str]:
    """Runs `run` under torch.profiler and returns the `top` operators by self CPU time, per unit of work
    (`per` = the decode steps or requests `run` did), as lines of text. `minus`, profiled the same way, is
    taken off: a generate of N + 1 tokens minus one of 1 token leaves the N decode steps, without the
    prefill (which an eager-prefill, compiled-decode engine runs through other kernels)."""
    import torch

    ops, wall = _profiled_ops(run)
    if minus is not None:
        base, base_wall = _profiled_ops(minus)
        ops = {k: (t - base.get(k, (0.0, 0))[0], n - base.get(k, (0.0, 0))[1]) for k, (t, n) in ops.items()}
        wall -= base_wall
    total = sum(max(t, 0.0) for t, _ in ops.values()) or 1.0
    lines = [
        f"{label}: {wall / per * 1e3:.1f} ms per step wall, {torch.get_num_threads()} threads; top ops by self time:"
    ]
    for key, (t, n) in sorted(ops.items(), key=lambda kv: kv[1][0], reverse=True)[:top]:
        lines.append(f"  {key}: {t / 1e3 / per:.2f} ms/step ({t / total:.0%}), {n / per:.0f} calls/step")
    return lines


def _profiled_ops(run: Callable[[], object]) -> tuple[dict[str, tuple[float, int]], float]:
    """{operator: (self CPU microseconds, calls)} of one run under torch.profiler, and its wall seconds."""
    from stagemesh.benchmarks.meshes import children_log
    from torch.profiler import ProfilerActivity, profile

    with children_log(Path(os.devnull)), profile(activities=[ProfilerActivity.CPU]) as prof:  # kineto's stderr chatter
        start = time.perf_counter()
        run()
        wall = time.perf_counter() - start
    return {e.key: (e.self_cpu_time_total, e.count) for e in prof.key_averages()}, wall


@dataclass
class CpuMeter:
    """CPU seconds used by each named process (the mesh's children and this benchmark) over a run."""

    pids: dict[str, int]
    _start: dict[str, float] = field(default_factory=dict)
    _wall: float = 0.0

    @classmethod
    def for_mesh(cls, mesh) -> CpuMeter:
        pids = {c.name: c.proc.pid for c in mesh.children if c.proc is not None}
        return cls({**pids, "benchmark client": os.getpid()})

    def __enter__(self) -> CpuMeter:
        self._start = {name: _cpu(pid) for name, pid in self.pids.items()}
        self._wall = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self._wall = time.perf_counter() - self._wall
        self.used = {name: _cpu(pid) - self._start[name] for name, pid in self.pids.items()}

    def summary(self, cores: int | None = None) -> list[str]:
        cores = cores or len(os.sched_getaffinity(0))
        total = sum(self.used.values())
        busiest = sorted(self.used.items(), key=lambda kv: kv[1], reverse=True)
        parts = ", ".join(f"{name} {sec:.2f} s ({sec / self._wall:.0%})" for name, sec in busiest if sec > 0.005)
        return [f"CPU over {self._wall:.2f} s wall: {total / self._wall:.2f} of {cores} cores busy; {parts}"]


def _cpu(pid: int) -> float:
    try:
        times = psutil.Process(pid).cpu_times()
    except psutil.NoSuchProcess:
        return 0.0
    return times.user + times.system


def busy_summary(delta: dict[str, tuple[int, float]], wall: float) -> list[str]:
    """Each worker's compute time (reported by the worker) against the run's wall time."""
    parts = [
        f"{role}: {busy:.2f} s busy ({busy / wall:.0%}) over {steps} steps"
        + (f", {busy / steps * 1e3:.1f} ms/step" if steps else "")
        for role, (steps, busy) in sorted(delta.items())
    ]
    return [f"worker compute over {wall:.2f} s wall: " + "; ".join(parts)]


def mesh_run_profile(mesh, requests: list[tuple[list[int], int]]) -> tuple[list[str], dict]:
    """One more burst of `requests`: each worker's compute time (as it reports it) and the CPU each process
    used, against the wall time; also returns the workers' {role: (steps, busy seconds)}."""
    from stagemesh.benchmarks.meshes import measured_burst

    cpu = CpuMeter.for_mesh(mesh)
    result, delta = measured_burst(mesh, requests, meter=cpu)
    return busy_summary(delta, result.wall) + cpu.summary(), delta


def decode_breakdown(mesh, prompts: list[list[int]], n: int) -> tuple[list[str], float]:
    """Decode alone, as the difference of an n-token and a 1-token burst: the client's time per token against
    the first stage's compute per decode step (as the stage reports it); returns the lines and that compute (ms)."""
    from stagemesh.benchmarks.meshes import measured_burst

    one, d1 = measured_burst(mesh, [(p, 1) for p in prompts])
    cpu = CpuMeter.for_mesh(mesh)
    many, dn = measured_burst(mesh, [(p, n) for p in prompts], meter=cpu)
    per_step = {role: (dn[role][1] - d1[role][1]) / max(1, dn[role][0] - d1[role][0]) * 1e3 for role in dn}
    client = (many.wall - one.wall) / (n - 1) * 1e3
    stage = per_step.get("stage 0 rank 0", 0.0)
    workers = ", ".join(f"{role} {ms:.1f} ms" for role, ms in sorted(per_step.items()))
    head = (
        f"decode only (t({n}) - t(1)): {client:.1f} ms per token at the client; compute per decode step: "
        f"{workers}; {client - stage:.1f} ms per token outside stage 0's compute (gateway scheduling and "
        "streaming, gRPC both ways, hand-offs between stages and to the compute thread)"
    )
    return [head, *busy_summary(dn, many.wall), *cpu.summary()], stage
