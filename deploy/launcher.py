"""`stagemesh up`: the whole mesh as real subprocesses on this host — coordinator, tp*pp stage workers,
expert workers, gateway — started in order, watched, and stopped together (no orphans, ports released).

The commands are the same `stagemesh ...` commands the compose files run (see `service_commands`).
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


def worker_commands(layout: MeshLayout, coordinator: str) -> list[tuple[str, list[str]]]:
    threads = layout.threads or max(1, (os.cpu_count() or 1) // max(1, layout.workers))
    common = ["--coordinator", coordinator, "--host", layout.host, "--port", "0", "--threads", str(threads)]
    if layout.kv_memory:
        common += ["--kv-memory", layout.kv_memory]
    commands = []
    for s in range(layout.pp):
        for r in range(layout.tp):
            device = _device(layout, s * layout.tp + r)
            argv = ["stage-worker", *common, "--device", device, "--stage", str(s), "--tp-rank", str(r)]
            commands.append((f"stage-worker stage={s} rank={r}", argv))
    for e in range(layout.ep):
        device = _device(layout, layout.tp * layout.pp + e)
        argv = ["expert-worker", "--coordinator", coordinator, "--host", layout.host, "--port", "0",
                "--threads", str(threads), "--device", device, "--expert-worker-index", str(e)]  # fmt: skip
        commands.append((f"expert-worker index={e}", argv))
    return commands


def coordinator_command(layout: MeshLayout) -> list[str]:
    argv = ["coordinator", "--model", layout.model_dir, "--tp", str(layout.tp), "--pp", str(layout.pp),
            "--dtype", layout.dtype, "--host", layout.host, "--port", str(layout.coordinator_port)]  # fmt: skip
    if layout.layers:
        argv += ["--layers", layout.layers]
    if layout.ep:
        argv += ["--ep", str(layout.ep), "--expert-placement", layout.expert_placement]
        if layout.expert_replicas:
            argv += ["--expert-replicas", layout.expert_replicas]
    return argv


def gateway_command(layout: MeshLayout, coordinator: str) -> list[str]:
    argv = ["gateway", "--coordinator", coordinator, "--host", layout.host, "--port", str(layout.port),
            "--max-step-tokens", str(layout.max_step_tokens), "--max-queue", str(layout.max_queue),
            "--max-running", str(layout.max_running)]  # fmt: skip
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

    def start(self, timeout: float = 300.0) -> None:
        """Starts everything and returns when the gateway serves; raises with the reason otherwise."""
        from stagemesh.coordinator.server import CoordinatorOptions, build_roster

        layout = self.layout
        build_roster(CoordinatorOptions(layout.model_dir, layout.tp, layout.pp, layout.ep, layout.layers,
                                        layout.expert_placement, layout.expert_replicas))  # refuses a bad plan now
        deadline = time.monotonic() + timeout
        self.coordinator = self._spawn("coordinator", coordinator_command(layout), deadline)
        for name, argv in worker_commands(layout, self.coordinator):
            self._spawn(name, argv, deadline=None)
        self.gateway = self._spawn("gateway", gateway_command(layout, self.coordinator), deadline)
        self._wait_serving(deadline)
        threading.Thread(target=self._watch, daemon=True).start()

    def _spawn(self, name: str, argv: list[str], deadline: float | None) -> str:
        child = Child(name, [sys.executable, "-m", "stagemesh.cli", *argv])
        child.proc = subprocess.Popen(
            child.argv, stdout=subprocess.PIPE, stderr=None, text=True, preexec_fn=_die_with_parent,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )  # fmt: skip
        self.children.append(child)
        ready = threading.Event()
        threading.Thread(target=self._drain, args=(child, ready), daemon=True).start()
        if deadline is None:
            return ""
        while not ready.wait(0.1):
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
            dead = [c for c in self.children if c.proc.poll() is not None]
            if dead:
                raise Unavailable(f"{dead[0].name} exited with code {dead[0].proc.returncode} during startup")
            if time.monotonic() > deadline:
                raise Unavailable("the mesh did not become ready in time (see the workers' logs above)")
            time.sleep(0.2)

    def _watch(self) -> None:
        reported = set()
        while not self._stopping:
            for child in self.children:
                code = child.proc.poll()
                if code is not None and child.name not in reported and not self._stopping:
                    reported.add(child.name)
                    print(f"stagemesh up: {child.name} (pid {child.proc.pid}) exited with code {code}",
                          file=self.log, flush=True)  # fmt: skip
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


def run_up(layout: MeshLayout) -> None:
    """Starts the mesh, prints `ready gateway=... coordinator=...`, serves until SIGINT/SIGTERM."""
    mesh = LocalMesh(layout)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        mesh.start()
        print(f"ready gateway={mesh.gateway} coordinator={mesh.coordinator}", flush=True)
        while not stop.wait(0.5):
            pass
    finally:
        mesh.stop()
