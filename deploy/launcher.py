"""`stagemesh up`: the whole mesh as real subprocesses on this host — coordinator, tp*pp stage workers,
expert workers, gateway — started in order, watched, and stopped together (no orphans, ports released).

The command builders here are the only copy of the services' flag lists: `deploy/cluster.py` builds the
compose services (and `stagemesh up --config`) from them too.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from stagemesh.errors import Unavailable


@dataclass(frozen=True)
class MeshLayout:
    model_dir: str
    tp: int = 1
    pp: int = 1
    ep: int = 0
    layers: str | None = None
    expert_placement: str = "contiguous"
    expert_replicas: str | None = None
    dtype: str = "float32"
    device: str = "cpu"
    threads: int | None = None  # torch threads per worker; default: cores / workers
    kv_memory: str | None = None
    host: str = "127.0.0.1"
    port: int = 0  # gateway port
    coordinator_port: int = 0
    max_step_tokens: int = 512
    max_queue: int = 256
    max_running: int = 256
    metrics_port: int | None = None  # the gateway's Prometheus port (0 = a free one, logged)
    compile: bool = False  # stage workers decode through compiled graphs (--compile)

    @property
    def workers(self) -> int:
        return self.tp * self.pp + self.ep


@dataclass
class Child:
    name: str
    argv: list[str]
    proc: subprocess.Popen | None = None
    address: str = ""
    lines: list[str] = field(default_factory=list)


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
    layout: MeshLayout, coordinator: str, stage: int, rank: int, site: WorkerSite, threads: int | None
) -> list[str]:
    argv = ["stage-worker", "--coordinator", coordinator, *_site_flags(site)]
    argv += ["--threads", str(threads)] if threads else []
    argv += ["--kv-memory", layout.kv_memory] if layout.kv_memory else []
    argv += ["--device", site.device, "--stage", str(stage), "--tp-rank", str(rank)]
    argv += ["--compile"] if layout.compile else []
    return argv + (["--dist-port", str(site.dist_port)] if site.dist_port is not None else [])


def expert_worker_command(
    layout: MeshLayout, coordinator: str, index: int, site: WorkerSite, threads: int | None
) -> list[str]:
    argv = ["expert-worker", "--coordinator", coordinator, *_site_flags(site)]
    argv += ["--threads", str(threads)] if threads else []
    return argv + ["--device", site.device, "--expert-worker-index", str(index)]


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
    ]
    if advertise:
        argv += ["--advertise", advertise]
    if layout.metrics_port is not None:
        argv += ["--metrics-port", str(layout.metrics_port)]
    return argv


def _die_with_parent() -> None:
    """Children get SIGTERM if the launcher dies, even by SIGKILL (Linux prctl PR_SET_PDEATHSIG)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)
    except OSError:
        pass


class LocalMesh:
    def __init__(self, layout: MeshLayout, log=sys.stderr) -> None:
        self.layout = layout
        self.children: list[Child] = []
        self.log = log
        self.coordinator = self.gateway = ""
        self._stopping = False
        self.interrupted = False  # set by run_mesh's SIGINT/SIGTERM handler; startup gives up when it is

    def start(self, timeout: float = 300.0) -> None:
        """Starts everything and returns when the gateway serves; raises with the reason otherwise."""
        layout = self.layout
        self._check_plan()
        deadline = time.monotonic() + timeout
        self.coordinator = self._spawn("coordinator", coordinator_command(layout), deadline)
        for name, argv in worker_commands(layout, self.coordinator):
            self._spawn(name, argv, deadline=None)
        self.gateway = self._spawn("gateway", gateway_command(layout, self.coordinator), deadline)
        self._wait_serving(deadline)
        threading.Thread(target=self._watch, daemon=True).start()

    def _check_plan(self) -> None:
        """Refuses a bad plan before any process starts."""
        from stagemesh.coordinator.server import CoordinatorOptions, build_roster

        layout = self.layout
        build_roster(
            CoordinatorOptions(
                layout.model_dir,
                layout.tp,
                layout.pp,
                layout.ep,
                layout.layers,
                layout.expert_placement,
                layout.expert_replicas,
            )
        )

    def _spawn(self, name: str, argv: list[str], deadline: float | None, env: dict[str, str] | None = None) -> str:
        child = Child(name, [sys.executable, "-m", "stagemesh.cli", *argv])
        child.proc = subprocess.Popen(
            child.argv,
            stdout=subprocess.PIPE,
            stderr=None,
            text=True,
            preexec_fn=_die_with_parent,
            env=dict(os.environ, PYTHONUNBUFFERED="1", **(env or {})),
        )
        self.children.append(child)
        ready = threading.Event()
        threading.Thread(target=self._drain, args=(child, ready), daemon=True).start()
        if deadline is None:
            return ""
        while not ready.wait(0.1):
            self._check_interrupted()
            if child.proc.poll() is not None:
                raise Unavailable(f"{name} exited with code {child.proc.returncode} before it was ready")
            if time.monotonic() > deadline:
                raise Unavailable(f"{name} did not start in time")
        return child.address

    def _drain(self, child: Child, ready: threading.Event) -> None:
        for line in child.proc.stdout:
            child.lines.append(line)
            if line.startswith("ready ") and "address=" in line:
                child.address = line.split("address=", 1)[1].split()[0]
                ready.set()

    def _wait_serving(self, deadline: float) -> None:
        from stagemesh.proto.rpc import check_health

        while not check_health(self.gateway, timeout=2.0):
            self._check_interrupted()
            dead = [c for c in self.children if c.proc.poll() is not None]
            if dead:
                raise Unavailable(f"{dead[0].name} exited with code {dead[0].proc.returncode} during startup")
            if time.monotonic() > deadline:
                raise Unavailable("the mesh did not become ready in time (see the workers' logs above)")
            time.sleep(0.2)

    def _check_interrupted(self) -> None:
        if self.interrupted:
            raise Unavailable("interrupted while starting: stopping every child")

    def _watch(self) -> None:
        reported = set()
        while not self._stopping:
            for child in self.children:
                code = child.proc.poll()
                if code is not None and child.name not in reported and not self._stopping:
                    reported.add(child.name)
                    print(
                        f"stagemesh up: {child.name} (pid {child.proc.pid}) exited with code {code}",
                        file=self.log,
                        flush=True,
                    )
            time.sleep(0.2)

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM to every child (gateway first), then SIGKILL to any still alive after `grace`."""
        self._stopping = True
        for child in reversed(self.children):
            if child.proc.poll() is None:
                child.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for child in self.children:
            try:
                child.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.proc.kill()
                child.proc.wait()


class ServiceMesh(LocalMesh):
    """`stagemesh up --config`: the services of a cluster description (deploy.cluster.Service), run here in
    their order (coordinator, gateway, workers) with their own argv and environment."""

    def __init__(self, layout: MeshLayout, services, log=sys.stderr) -> None:
        super().__init__(layout, log)
        self.services = list(services)

    def start(self, timeout: float = 300.0) -> None:
        self._check_plan()
        deadline = time.monotonic() + timeout
        for service in self.services:
            waits = service.role in ("coordinator", "gateway")  # workers announce themselves to the coordinator
            address = self._spawn(service.name, list(service.argv), deadline if waits else None, dict(service.env))
            if service.role == "coordinator":
                self.coordinator = address
            elif service.role == "gateway":
                self.gateway = address
        self._wait_serving(deadline)
        threading.Thread(target=self._watch, daemon=True).start()


def run_mesh(mesh: LocalMesh) -> None:
    """Starts the mesh, prints `ready gateway=... coordinator=...`, serves until SIGINT/SIGTERM."""

    def interrupt(*_) -> None:  # only a plain assignment: a handler taking a lock can deadlock the main thread
        mesh.interrupted = True

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, interrupt)
    try:
        mesh.start()
        print(f"ready gateway={mesh.gateway} coordinator={mesh.coordinator}", flush=True)
        while not mesh.interrupted:
            time.sleep(0.2)
    finally:
        mesh.stop()


def run_up(layout: MeshLayout) -> None:
    run_mesh(LocalMesh(layout))


def run_cluster_up(config: str) -> None:
    """`stagemesh up --config FILE`: every host of the description on this machine (see cluster.localize)."""
    from stagemesh.deploy.cluster import load_cluster, localize, resolve_paths, services

    cluster = resolve_paths(localize(load_cluster(config)), Path(config).parent)
    run_mesh(ServiceMesh(cluster.layout(), services(cluster)))
