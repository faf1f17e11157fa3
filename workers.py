"""What a worker process (stage or expert) is started with, and what it says about its device when it
registers. Imports no torch at module level, so the command line can take its flag defaults from here."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class WorkerOptions:
    """What every worker process needs to join a mesh: its coordinator, where it listens and is reached,
    its device and threads, and where this host sees the checkpoint."""

    coordinator: str
    device: str = "cpu"
    host: str = "127.0.0.1"
    port: int = 0  # 0 = a free one
    advertise: str | None = None  # the host others dial; default: --host
    threads: int | None = None  # torch threads; None = torch's default
    model_dir: str | None = None  # where this host sees the checkpoint, if not where the coordinator does
    connect_timeout: float = 30.0
    metrics_port: int | None = None  # Prometheus /metrics (0 = a free one); None = off


@dataclass(frozen=True)
class StageWorkerOptions(WorkerOptions):
    stage: int | None = None  # ask for this role; None = the next free one
    tp_rank: int | None = None
    dist_port: int = 0  # the stage's TCPStore port when this worker is TP rank 0 (0 = a free one)
    kv_memory: str | None = None  # default: 256MiB on cpu, 90% of free GPU memory after loading on cuda
    group_timeout: float = 120.0
    compile: bool = False  # decode through torch.compile graphs (models.compiled); STAGEMESH_COMPILE_BUCKETS


@dataclass(frozen=True)
class ExpertWorkerOptions(WorkerOptions):
    expert_worker_index: int | None = None  # ask for this role; None = the next free one


def device_memory(device) -> int:
    """Bytes of memory of a torch device: the GPU's, or the host's for cpu."""
    if device.type == "cuda":
        import torch

        return torch.cuda.get_device_properties(device).total_memory
    import psutil

    return psutil.virtual_memory().total
