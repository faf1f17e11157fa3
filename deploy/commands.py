"""The services' command lines: the only copy of each service's flag list. `stagemesh up` (deploy.launcher)
runs them as local subprocesses; the cluster description (deploy.cluster) puts them in compose files."""

from __future__ import annotations

import os
from dataclasses import dataclass

from stagemesh.gateway.scheduler import SchedulerLimits
from stagemesh.models.plan import LayoutOptions


@dataclass(frozen=True)
class MeshLayout(LayoutOptions):
    """What `stagemesh up` runs: the layout, and how this host's processes are started."""

    device: str = "cpu"
    threads: int | None = None  # torch threads per worker; default: cores / workers
    kv_memory: str | None = None
    host: str = "127.0.0.1"
    port: int = 0  # gateway port
    coordinator_port: int = 0
    max_step_tokens: int = SchedulerLimits.max_step_tokens
    max_queue: int = SchedulerLimits.max_queue
    max_running: int = SchedulerLimits.max_running
    min_micro_batch: int = SchedulerLimits.min_micro_batch
    metrics_port: int | None = None  # the gateway's Prometheus port (0 = a free one, logged)
    http_port: int | None = None  # the gateway's OpenAI-compatible HTTP port (0 = a free one); None = off
    spares: int = 0  # stage workers beyond the plan: each waits to take a lost stage role
    expert_spares: int = 0  # the same for expert workers
    compile: bool = False  # stage workers decode through compiled graphs (--compile)

    @property
    def workers(self) -> int:
        return self.tp * self.pp + self.ep


def _device(layout: MeshLayout, index: int) -> str:
    if layout.device != "cuda":
        return layout.device
    import torch

    return f"cuda:{index % max(1, torch.cuda.device_count())}"


@dataclass(frozen=True)
class WorkerSite:
    """Where one worker runs: its device, the address it listens on, and the address others dial."""

    device: str = "cpu"
    host: str = "127.0.0.1"
    port: int = 0
    advertise: str | None = None  # default: --host
    dist_port: int | None = None  # TP rank 0's rendezvous store port; None = the worker's default (a free one)


def _site_flags(site: WorkerSite) -> list[str]:
    flags = ["--host", site.host, "--port", str(site.port)]
    return flags + (["--advertise", site.advertise] if site.advertise else [])


def stage_worker_command(
    layout: MeshLayout, coordinator: str, stage: int | None, rank: int | None, site: WorkerSite, threads: int | None
) -> list[str]:
    """stage None: a worker that takes the next free role, or waits as a spare."""
    argv = ["stage-worker", "--coordinator", coordinator, *_site_flags(site)]
    argv += ["--threads", str(threads)] if threads else []
    argv += ["--kv-memory", layout.kv_memory] if layout.kv_memory else []
    argv += ["--device", site.device]
    argv += ["--stage", str(stage), "--tp-rank", str(rank)] if stage is not None else []
    argv += ["--compile"] if layout.compile else []
    return argv + (["--dist-port", str(site.dist_port)] if site.dist_port is not None else [])


def expert_worker_command(
    layout: MeshLayout, coordinator: str, index: int | None, site: WorkerSite, threads: int | None
) -> list[str]:
    """index None: a worker that takes the next free role, or waits as a spare."""
    argv = ["expert-worker", "--coordinator", coordinator, *_site_flags(site)]
    argv += ["--threads", str(threads)] if threads else []
    return argv + ["--device", site.device] + (["--expert-worker-index", str(index)] if index is not None else [])


def worker_commands(layout: MeshLayout, coordinator: str) -> list[tuple[str, list[str]]]:
    threads = layout.threads or max(1, (os.cpu_count() or 1) // max(1, layout.workers))
    commands = []
    for s in range(layout.pp):
        for r in range(layout.tp):
            site = WorkerSite(_device(layout, s * layout.tp + r), layout.host)
            argv = stage_worker_command(layout, coordinator, s, r, site, threads)
            commands.append((f"stage-worker stage={s} rank={r}", argv))
    for e in range(layout.ep):
        site = WorkerSite(_device(layout, layout.tp * layout.pp + e), layout.host)
        commands.append((f"expert-worker index={e}", expert_worker_command(layout, coordinator, e, site, threads)))
    return commands


def spare_commands(layout: MeshLayout, coordinator: str) -> list[tuple[str, list[str]]]:
    """Workers beyond the plan: no role asked for, so each waits as a spare for a lost one."""
    threads = layout.threads or max(1, (os.cpu_count() or 1) // max(1, layout.workers))
    site = WorkerSite(_device(layout, 0), layout.host)
    stage = [stage_worker_command(layout, coordinator, None, None, site, threads) for _ in range(layout.spares)]
    expert = [expert_worker_command(layout, coordinator, None, site, threads) for _ in range(layout.expert_spares)]
    named = [(f"stage-worker spare={i}", argv) for i, argv in enumerate(stage)]
    return named + [(f"expert-worker spare={i}", argv) for i, argv in enumerate(expert)]


def coordinator_command(layout: MeshLayout) -> list[str]:
    argv = [
        "coordinator",
        "--model",
        layout.model_dir,
        "--tp",
        str(layout.tp),
        "--pp",
        str(layout.pp),
        "--dtype",
        layout.dtype,
        "--host",
        layout.host,
        "--port",
        str(layout.coordinator_port),
    ]
    if layout.layers:
        argv += ["--layers", layout.layers]
    if layout.ep:
        argv += ["--ep", str(layout.ep), "--expert-placement", layout.expert_placement]
        if layout.expert_replicas:
            argv += ["--expert-replicas", layout.expert_replicas]
    return argv


def gateway_command(layout: MeshLayout, coordinator: str, advertise: str | None = None) -> list[str]:
    argv = [
        "gateway",
        "--coordinator",
        coordinator,
        "--host",
        layout.host,
        "--port",
        str(layout.port),
        "--max-step-tokens",
        str(layout.max_step_tokens),
        "--max-queue",
        str(layout.max_queue),
        "--max-running",
        str(layout.max_running),
        "--min-micro-batch",
        str(layout.min_micro_batch),
    ]
    if advertise:
        argv += ["--advertise", advertise]
    if layout.metrics_port is not None:
        argv += ["--metrics-port", str(layout.metrics_port)]
    if layout.http_port is not None:
        argv += ["--http-port", str(layout.http_port)]
    return argv
