"""A stage's tensor-parallel group: a real torch.distributed process group of its tp ranks.

Rank 0 (the leader) hosts the group's TCPStore; the coordinator hands its address to the other ranks.
Collectives of the model use the device backend (gloo on CPU, NCCL on CUDA); the leader broadcasts each
step to its peers as bytes over gloo, which is why a CUDA group is "cpu:gloo,cuda:nccl". CPU ranks on
one host use shared memory instead (stage_worker.shm_collectives) for everything that fits a slot.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path

import torch
import torch.distributed as dist
from stagemesh.models.tp import TPRank
from stagemesh.stage_worker.shm_collectives import MAX_RANKS, SUPPORTED, ShmCollectives

SHM_SLOT_BYTES = 8 << 20  # larger collectives (long prefill chunks) go through gloo
SHUTDOWN = b""  # broadcast to peers when the leader stops


def create_store(host: str, port: int, world: int, timeout: float) -> dist.TCPStore:
    """The leader's rendezvous store; port 0 picks a free port (store.port tells which)."""
    return dist.TCPStore(
        host,
        port,
        world_size=world,
        is_master=True,
        wait_for_workers=False,
        timeout=datetime.timedelta(seconds=timeout),
    )


class TPGroup:
    def __init__(self, rank: int, size: int, device: torch.device, store: dist.TCPStore, timeout: float) -> None:
        self.rank, self.size = rank, size
        backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend,
            store=store,
            rank=rank,
            world_size=size,
            timeout=datetime.timedelta(seconds=timeout),
            device_id=device if device.type == "cuda" else None,
        )
        self.store = store
        self.local = _shared_memory(rank, size, store) if device.type == "cpu" else None

    @classmethod
    def join(cls, rank: int, size: int, rendezvous: str, device: torch.device, timeout: float) -> TPGroup:
        """A peer rank joins the group whose store lives at `rendezvous` (host:port)."""
        host, _, port = rendezvous.rpartition(":")
        store = dist.TCPStore(host, int(port), is_master=False, timeout=datetime.timedelta(seconds=timeout))
        return cls(rank, size, device, store, timeout)

    @property
    def tp_rank(self) -> TPRank:
        return TPRank(self.rank, self.size, dist.group.WORLD, self.local)

    def broadcast(self, payload: bytes | None = None) -> bytes:
        """The leader sends `payload`; every rank returns it (peers block until the leader sends)."""
        if self.local is not None:
            return self.local.broadcast(payload, self._broadcast_bytes)
        size = torch.tensor([len(payload) if payload is not None else 0], dtype=torch.int64)
        dist.broadcast(size, src=0)
        return self._broadcast_bytes(payload, int(size.item()))

    def _broadcast_bytes(self, payload: bytes | None, size: int) -> bytes:
        if size == 0:
            return SHUTDOWN
        data = torch.frombuffer(bytearray(payload), dtype=torch.uint8) if payload is not None else None
        if data is None:
            data = torch.empty(size, dtype=torch.uint8)
        dist.broadcast(data, src=0)
        return data.numpy().tobytes()


def _shared_memory(rank: int, size: int, store: dist.TCPStore) -> ShmCollectives | None:
    """Shared-memory collectives when every rank of the group can open rank 0's segment (one host, x86);
    every rank learns whether all could, so they all take the same path. The file is removed once all
    ranks have mapped it, so nothing is left behind whatever happens to the processes."""
    path = ShmCollectives.create_path() if rank == 0 else None
    local = None
    if SUPPORTED and size <= MAX_RANKS and os.environ.get("STAGEMESH_TP_SHM", "1") != "0":  # else gloo
        try:
            if rank == 0:
                local = ShmCollectives(path, rank, size, SHM_SLOT_BYTES, create=True)
                store.set("shm_path", path)
            else:
                local = ShmCollectives(store.get("shm_path").decode(), rank, size, SHM_SLOT_BYTES, create=False)
        except (OSError, RuntimeError):
            local = None
    store.set(f"shm_ok_{rank}", "1" if local else "0")
    everyone = all(store.get(f"shm_ok_{r}") == b"1" for r in range(size))
    dist.barrier()
    if rank == 0 and path is not None:
        Path(path).unlink(missing_ok=True)
    return local if everyone else None


def exit_process(code: int = 0) -> None:
    """Leaves without interpreter teardown, which gloo's threads can abort (pytorch/pytorch#190489)."""
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
