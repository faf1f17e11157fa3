"""The mesh side of the soak: what its processes hold (RSS, KV blocks) sampled over time, and the chaos
itself: kill -9 a stage worker found by the address the coordinator lists for its role, wait for the mesh
to be whole again, and start a spare in its place with the launcher's own spare command."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from stagemesh.benchmarks.meshes import children_log
from stagemesh.coordinator.client import cluster_events, cluster_status
from stagemesh.deploy.launcher import Child, LocalMesh
from stagemesh.errors import StagemeshError, Unavailable


@dataclass(frozen=True)
class Usage:
    """One look at the mesh: resident memory of every live process it started, and KV blocks in use."""

    rss: int  # bytes, summed over the launcher's live children (and their children)
    gateway_rss: int
    kv_workers: int  # blocks in use, summed over live stage workers (their heartbeats, ≤ 0.5 s old)
    kv_gateway: int  # blocks the gateway's allocator has handed out
    running: int  # requests the gateway is running or queueing

    @property
    def kv(self) -> int:
        return self.kv_workers + self.kv_gateway


def usage(mesh: LocalMesh) -> Usage:
    import psutil

    rss, gateway_rss = 0, 0
    for child in mesh.children:
        try:
            proc = psutil.Process(child.proc.pid)
            mine = sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)])
        except psutil.NoSuchProcess:  # killed, or exited between the look and the read
            continue
        rss += mine
        gateway_rss += mine if child.name == "gateway" else 0
    status = cluster_status(mesh.coordinator)
    kv = sum(w.kv_blocks_used for w in status.workers if w.kind == "stage" and w.state != "down")
    g = status.gateway
    return Usage(rss, gateway_rss, kv, g.kv_blocks_used, g.running + g.queued)


class UsageSampler:
    """Samples `usage` every `period` seconds in a thread; `peak` is the largest of each field seen."""

    def __init__(self, mesh: LocalMesh, period: float = 0.5) -> None:
        self.mesh, self.period = mesh, period
        self.samples: list[Usage] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> UsageSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            try:
                self.samples.append(usage(self.mesh))
            except StagemeshError:  # the coordinator slow under load: skip this sample
                pass

    def peak(self) -> Usage:
        fields = Usage.__dataclass_fields__
        return Usage(**{f: max((getattr(s, f) for s in self.samples), default=0) for f in fields})


def settled_usage(mesh: LocalMesh, timeout: float = 30.0, quiet: float = 1.5) -> Usage:
    """Usage once the gateway runs nothing and every KV block is back (held for `quiet` seconds, so the
    workers' heartbeats have caught up); after `timeout`, whatever it is then (a leak shows as blocks > 0)."""
    deadline, since = time.monotonic() + timeout, None
    while True:
        now = usage(mesh)
        idle = now.running == 0 and now.kv == 0
        since = (since or time.monotonic()) if idle else None
        if (since and time.monotonic() - since >= quiet) or time.monotonic() > deadline:
            return now
        time.sleep(0.25)


def wait_whole(mesh: LocalMesh, spares: int, after_epoch: int = -1, timeout: float = 150.0) -> int:
    """Until the topology is ready at a pipeline epoch past `after_epoch` (a kill's recovery is over) with
    `spares` spares waiting (a kill before then would have none to take over); returns that epoch."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = cluster_status(mesh.coordinator)
        t = status.topology
        if t.ready and t.pipeline_epoch > after_epoch and len(status.spares) >= spares:
            return t.pipeline_epoch
        time.sleep(0.1)
    raise Unavailable(f"the mesh was not ready again with {spares} spare(s) within {timeout:.0f} s")


def stage_roles(mesh: LocalMesh) -> dict[str, str]:
    """{"stage 0 rank 0": address} of the live stage workers holding a role."""
    status = cluster_status(mesh.coordinator)
    return {
        f"stage {w.stage} rank {w.tp_rank}": w.address
        for w in status.workers
        if w.kind == "stage" and w.state != "down"
    }


def process_at(mesh: LocalMesh, address: str) -> Child:
    """The launcher's child serving `address` (its `ready ... address=` line, or the port it listens on)."""
    import psutil

    port = int(address.rsplit(":", 1)[1])
    for child in mesh.children:
        if child.proc.poll() is not None:
            continue
        if child.address == address:
            return child
        conns = psutil.Process(child.proc.pid).net_connections("tcp")
        if any(c.laddr.port == port and c.status == psutil.CONN_LISTEN for c in conns):
            return child
    raise LookupError(f"no process of this mesh serves {address}")


def kill(child: Child) -> float:
    """SIGKILL, no goodbye; returns the wall-clock time (time.time) of the kill, for the coordinator's events."""
    child.proc.kill()
    return time.time()


def replace_spare(mesh: LocalMesh, log_path: Path) -> Child:
    with children_log(log_path):
        return mesh.add_spare("stage")


def event_delays(mesh: LocalMesh, role: str, killed_at: float) -> dict[str, float | None]:
    """Seconds from the kill to the coordinator's first `dead` event for `role`, and to the `ready` of the
    worker that took the role over (its shard loaded)."""
    events = [(datetime.fromisoformat(e["time"]).timestamp(), e) for e in cluster_events(mesh.coordinator)]
    after = [(t, e) for t, e in events if t >= killed_at - 0.05]  # the coordinator's clock is ours (loopback)
    dead = next((t for t, e in after if e["kind"] == "dead" and e["detail"].startswith(role)), None)
    ready = next(
        (t for t, e in after if e["kind"] == "ready" and e["detail"].startswith(role) and t >= (dead or 0)), None
    )
    return {
        "dead_after": None if dead is None else dead - killed_at,
        "ready_after": None if ready is None else ready - killed_at,
    }


def pipeline_epoch(mesh: LocalMesh) -> int:
    return cluster_status(mesh.coordinator).topology.pipeline_epoch
