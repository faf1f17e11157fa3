"""A stage's tensor-parallel group: a real torch.distributed process group of its tp ranks.

Rank 0 (the leader) hosts the group's TCPStore; the coordinator hands its address to the other ranks.
Collectives of the model use the device backend (gloo on CPU, NCCL on CUDA); the leader broadcasts each
step to its peers as bytes over gloo, which is why a CUDA group is "cpu:gloo,cuda:nccl".
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

from stagemesh.models.tp import TPRank

SHUTDOWN = b""  # broadcast to peers when the leader stops


def create_store(host: str, port: int, world: int, timeout: float) -> dist.TCPStore:
    """The leader's rendezvous store; port 0 picks a free port (store.port tells which)."""
    return dist.TCPStore(
        host, port, world_size=world, is_master=True, wait_for_workers=False,
        timeout=datetime.timedelta(seconds=timeout),
    )  # fmt: skip


class TPGroup:
    def __init__(self, rank: int, size: int, device: torch.device, store: dist.TCPStore, timeout: float) -> None:
        self.rank, self.size = rank, size
        backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend, store=store, rank=rank, world_size=size, timeout=datetime.timedelta(seconds=timeout),
            device_id=device if device.type == "cuda" else None,
        )  # fmt: skip
        self.store = store

    @classmethod
    def join(cls, rank: int, size: int, rendezvous: str, device: torch.device, timeout: float) -> "TPGroup":
        """A peer rank joins the group whose store lives at `rendezvous` (host:port)."""
        host, _, port = rendezvous.rpartition(":")
        store = dist.TCPStore(host, int(port), is_master=False, timeout=datetime.timedelta(seconds=timeout))
        return cls(rank, size, device, store, timeout)

    @property
    def tp_rank(self) -> TPRank:
        return TPRank(self.rank, self.size, dist.group.WORLD)

    def broadcast(self, payload: bytes | None = None) -> bytes:
        """The leader sends `payload`; every rank returns it (peers block until the leader sends)."""
        size = torch.tensor([len(payload) if payload is not None else 0], dtype=torch.int64)
        dist.broadcast(size, src=0)
        if size.item() == 0:
            return SHUTDOWN
        data = torch.frombuffer(bytearray(payload), dtype=torch.uint8) if payload is not None else None
        if data is None:
            data = torch.empty(int(size.item()), dtype=torch.uint8)
        dist.broadcast(data, src=0)
        return data.numpy().tobytes()


def exit_process(code: int = 0) -> None:
    """Leaves without interpreter teardown, which gloo's threads can abort (pytorch/pytorch#190489)."""
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
