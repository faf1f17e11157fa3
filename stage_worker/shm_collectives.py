"""All-reduce and all-gather for the TP ranks of one stage on one host, through a shared-memory segment.

gloo over loopback TCP costs about 250 us per collective between two local processes; a decode step of a
16-layer model needs ~36 of them. Here a collective is: write your tensor into your slot, publish the
op's sequence number, wait until every rank has published it, read all slots in rank order. Every rank
sums in the same order, so all ranks get bit-identical results. Two slot sets alternate by op parity:
a rank can only write op k+2 after every rank finished op k+1, hence finished reading op k.

Ordering: the sequence number is stored after the data by the same thread, and x86-64 keeps stores in
order (TSO), so a rank that sees the number sees the data; on other CPUs the stage keeps using gloo.
Waiting spins on the counters, yielding the CPU between checks; a peer that died is noticed by its pid
(CollectiveError).
"""

from __future__ import annotations

import os
import platform
import time
import uuid
from pathlib import Path

import torch
from stagemesh.errors import CollectiveError

MAX_RANKS = 32
HEADER = 2 * MAX_RANKS  # int64 slots: sequence numbers of up to MAX_RANKS ranks, then their pids
SPINS_BEFORE_YIELD = 64
SPINS_BEFORE_SLEEP = 1 << 16  # a peer waiting for the leader's next step stops spinning after this many checks
IDLE_SLEEP = 0.0005  # ... and checks every half millisecond at first: idle peers must not burn a core each;
MAX_IDLE_SLEEP = 0.004  # the interval doubles every ~0.5 s idle up to this (an idle peer: 4.9% -> 2.2% of a core)
SUPPORTED = platform.machine() in ("x86_64", "AMD64")


class ShmCollectives:
    def __init__(self, path: str, rank: int, size: int, slot_bytes: int, create: bool, timeout: float = 30.0):
        if not 0 <= rank < size <= MAX_RANKS:
            raise ValueError(f"shared-memory collectives hold 1..{MAX_RANKS} ranks; got rank {rank} of {size}")
        self.rank, self.size, self.slot_bytes, self.timeout = rank, size, slot_bytes, timeout
        total = HEADER * 8 + 2 * size * slot_bytes
        if create:
            with open(path, "wb") as f:
                f.truncate(total)
        buffer = torch.from_file(path, shared=True, size=total, dtype=torch.uint8)
        self._header = buffer[: HEADER * 8].view(torch.int64).numpy()  # seq[:MAX_RANKS], pid[MAX_RANKS:]
        self._slots = buffer[HEADER * 8 :].view(2, size, slot_bytes)  # (parity, rank, bytes)
        self._op = 0
        self._header[MAX_RANKS + rank] = os.getpid()
        self.aborted = False  # set from another thread when the group is re-formed: waiting ranks give up

    @classmethod
    def create_path(cls) -> str:
        return str(Path("/dev/shm") / f"stagemesh-tp-{uuid.uuid4().hex}")

    def fits(self, t: torch.Tensor) -> bool:
        return t.device.type == "cpu" and t.numel() * t.element_size() <= self.slot_bytes

    def all_reduce(self, t: torch.Tensor) -> None:
        """In place: t becomes the sum over ranks, added in rank order on every rank."""
        slots = self._exchange(t)
        total = slots[0].clone()
        for other in slots[1:]:
            total += other
        t.copy_(total.view(t.shape))

    def all_gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        return [s.view(t.shape).clone() for s in self._exchange(t)]

    def broadcast(self, payload: bytes | None, fallback) -> bytes:
        """Rank 0 sends `payload` (others pass None); every rank returns it. A payload larger than a slot
        goes through fallback(payload or None, size) after its size went through here."""
        self._op += 1
        parity, op = self._op % 2, self._op
        slot = self._slots[parity, 0]
        if self.rank == 0:
            size = len(payload)
            fits = size + 8 <= self.slot_bytes
            slot[:8].view(torch.int64)[0] = size if fits else -size
            if fits and size:
                slot[8 : 8 + size].copy_(torch.frombuffer(bytearray(payload), dtype=torch.uint8))
            self._header[0] = op
            self._wait(op)  # peers publish after reading: the slot is free for op + 2
            return payload if fits else fallback(payload, size)
        self._wait_for_leader(op)
        size = int(slot[:8].view(torch.int64)[0])
        data = slot[8 : 8 + size].numpy().tobytes() if size >= 0 else None
        self._header[self.rank] = op
        return data if data is not None else fallback(None, -size)

    def _exchange(self, t: torch.Tensor) -> list[torch.Tensor]:
        """Publishes t, waits for every rank's tensor of this op; returns views of them (1-D, t's dtype)."""
        self._op += 1
        parity, nbytes = self._op % 2, t.numel() * t.element_size()
        mine = self._slots[parity, self.rank, :nbytes]
        mine.copy_(t.contiguous().view(-1).view(torch.uint8))
        self._header[self.rank] = self._op  # after the data: see the module docstring on ordering
        self._wait(self._op)
        return [self._slots[parity, r, :nbytes].view(t.dtype) for r in range(self.size)]

    def _wait(self, op: int) -> None:
        self._spin(lambda: self._header[: self.size].min() >= op, op)

    def _wait_for(self, rank: int, op: int) -> None:
        self._spin(lambda: self._header[rank] >= op, op)

    def _wait_for_leader(self, op: int) -> None:
        """A peer waits for the next step as long as the leader lives (an idle mesh is not a failure),
        spinning first (steps come back to back while serving), then sleeping between checks."""
        spins, pause = 0, IDLE_SLEEP
        while self._header[0] < op:
            spins += 1
            if spins < SPINS_BEFORE_SLEEP:
                if spins % SPINS_BEFORE_YIELD == 0:
                    os.sched_yield()
                continue
            time.sleep(pause)
            if spins % 1024 == 0:
                pause = min(2 * pause, MAX_IDLE_SLEEP)
            if self.aborted:
                raise CollectiveError("the tensor-parallel group is being re-formed")
            if spins % 256 == 0 and not _alive(int(self._header[MAX_RANKS])):
                raise CollectiveError(f"tensor-parallel rank 0 (pid {self._header[MAX_RANKS]}) is gone")

    def _spin(self, done, op: int) -> None:
        spins, deadline = 0, None
        while not done():
            spins += 1
            if spins % SPINS_BEFORE_YIELD == 0:
                os.sched_yield()
            if spins % 4096 == 0:
                deadline = deadline or time.monotonic() + self.timeout
                self._check_peers(op, deadline)

    def _check_peers(self, op: int, deadline: float) -> None:
        if self.aborted:
            raise CollectiveError("the tensor-parallel group is being re-formed")
        for r in range(self.size):
            if self._header[r] < op and not _alive(int(self._header[MAX_RANKS + r])):
                raise CollectiveError(f"tensor-parallel rank {r} (pid {self._header[MAX_RANKS + r]}) is gone")
        if time.monotonic() > deadline:
            raise CollectiveError(f"tensor-parallel ranks did not all reach collective {op} in {self.timeout:.0f}s")


def _alive(pid: int) -> bool:
    if pid <= 0:  # not registered yet
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a peer that exited stays a zombie until its parent reaps it (a launcher stopping its children)
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True
