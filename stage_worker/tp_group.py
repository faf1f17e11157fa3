"""A stage's tensor-parallel group: its tp ranks, joined by torch.distributed process groups and, on one
host, shared memory. The group is formed under an epoch the coordinator assigns and re-formed in place
under a new one when a rank is replaced (`form`): the object the model's layers hold (through
`TPRank.comm`) stays the same, only its transport changes, so survivors keep their weights.

Rank 0 of an epoch hosts the rendezvous store (the process keeps it for as long as it is rank 0; a spare
that takes rank 0 hosts its own), and each epoch's keys live under their own prefix. Collectives of the
model use the device's process group (gloo on CPU, NCCL on CUDA); the leader broadcasts each step to its
peers as bytes over gloo. CPU ranks on one host use shared memory (stage_worker.shm_collectives) for
everything that fits a slot.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path

import torch
import torch.distributed as dist
from stagemesh.errors import CollectiveError
from stagemesh.models.tp import TPRank, collective
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
    def __init__(self, rank: int, size: int, device: torch.device, timeout: float) -> None:
        self.rank, self.size, self.device, self.timeout = rank, size, device, timeout
        self.epoch = -1  # not formed yet
        self.hosted: dist.TCPStore | None = None  # the store this process hosts while it is rank 0
        self.local: ShmCollectives | None = None
        self._cpu: dist.ProcessGroup | None = None  # gloo: broadcasts, and the model's collectives on CPU
        self._cuda: dist.ProcessGroup | None = None  # NCCL: the model's collectives on CUDA
        self._retired: list = []  # earlier epochs' groups: kept, not torn down (a dead peer can block that)

    def host_store(self, host: str, port: int) -> int:
        """Rank 0: the store every epoch this process leads rendezvouses at; returns its port."""
        if self.hosted is None:
            self.hosted = create_store(host, port, self.size, self.timeout)
        return self.hosted.port

    def form(self, epoch: int, rendezvous: str = "") -> None:
        """Joins the group of `epoch`: rank 0 at its own store, the others at `rendezvous` (host:port).
        Blocks until every rank has joined (or raises after the timeout)."""
        if self._cpu is not None:
            self._retired.append((self._cpu, self._cuda, self.local))
        self._cpu = self._cuda = self.local = None
        timeout = datetime.timedelta(seconds=self.timeout)
        if self.rank == 0:
            base = self.hosted
        else:
            host, _, port = rendezvous.rpartition(":")
            base = dist.TCPStore(host, int(port), is_master=False, timeout=timeout)
        store = dist.PrefixStore(f"epoch{epoch}/", base)
        with collective("forming the group"):
            self._cpu = dist.ProcessGroupGloo(dist.PrefixStore("gloo/", store), self.rank, self.size, timeout)
            if self.device.type == "cuda":
                options = dist.ProcessGroupNCCL.Options()
                options._timeout = timeout
                self._cuda = dist.ProcessGroupNCCL(dist.PrefixStore("nccl/", store), self.rank, self.size, options)
            self.local = self._shared_memory(store) if self.device.type == "cpu" else None
        self.epoch = epoch

    def abort(self) -> None:
        """From another thread: a rank waiting in a shared-memory collective raises CollectiveError at once
        (a gloo collective ends at its timeout)."""
        if self.local is not None:
            self.local.aborted = True

    @property
    def tp_rank(self) -> TPRank:
        return TPRank(self.rank, self.size, self)

    # ---- collectives (models.tp.Collectives) ----

    def all_reduce(self, t: torch.Tensor) -> None:
        if self.local is not None and self.local.fits(t):
            return self.local.all_reduce(t)
        with collective("all-reduce"):
            self._group(t).allreduce([t]).wait()

    def all_gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        if self.local is not None and self.local.fits(t):
            return self.local.all_gather(t)
        parts = [torch.empty_like(t) for _ in range(self.size)]
        with collective("all-gather"):
            self._group(t).allgather([parts], [t]).wait()
        return parts

    def broadcast(self, payload: bytes | None = None) -> bytes:
        """The leader sends `payload`; every rank returns it (peers block until the leader sends)."""
        if self.local is not None:
            return self.local.broadcast(payload, self._broadcast_bytes)
        size = torch.tensor([len(payload) if payload is not None else 0], dtype=torch.int64)
        with collective("broadcast"):
            self._cpu.broadcast(size, 0).wait()
        return self._broadcast_bytes(payload, int(size.item()))

    def _group(self, t: torch.Tensor) -> dist.ProcessGroup:
        if self._cpu is None:
            raise CollectiveError("the tensor-parallel group is being re-formed")
        return self._cuda if t.device.type == "cuda" else self._cpu

    def _broadcast_bytes(self, payload: bytes | None, size: int) -> bytes:
        if size == 0:
            return SHUTDOWN
        data = torch.frombuffer(bytearray(payload), dtype=torch.uint8) if payload is not None else None
        if data is None:
            data = torch.empty(size, dtype=torch.uint8)
        with collective("broadcast"):
            self._cpu.broadcast(data, 0).wait()
        return data.numpy().tobytes()

    def _shared_memory(self, store: dist.Store) -> ShmCollectives | None:
        """Shared-memory collectives when every rank of the group can open rank 0's segment (one host, x86);
        every rank learns whether all could, so they all take the same path. The file is removed once all
        ranks have mapped it, so nothing is left behind whatever happens to the processes."""
        rank, size = self.rank, self.size
        path = ShmCollectives.create_path() if rank == 0 else None
        local = None
        if SUPPORTED and size <= MAX_RANKS and os.environ.get("STAGEMESH_TP_SHM", "1") != "0":  # else gloo
            try:
                if rank == 0:
                    local = ShmCollectives(path, rank, size, SHM_SLOT_BYTES, create=True, timeout=self.timeout)
                    store.set("shm_path", path)
                else:
                    shm_path = store.get("shm_path").decode()
                    local = ShmCollectives(shm_path, rank, size, SHM_SLOT_BYTES, create=False, timeout=self.timeout)
            except (OSError, RuntimeError):
                local = None
        store.set(f"shm_ok_{rank}", "1" if local else "0")
        everyone = all(store.get(f"shm_ok_{r}") == b"1" for r in range(size))
        self._cpu.allreduce([torch.zeros(1)]).wait()  # a barrier: every rank has mapped the file
        if rank == 0 and path is not None:
            Path(path).unlink(missing_ok=True)
        return local if everyone else None


def exit_process(code: int = 0) -> None:
    """Leaves without interpreter teardown, which gloo's threads can abort (pytorch/pytorch#190489)."""
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
