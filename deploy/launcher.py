"""`stagemesh up`: the whole mesh as real subprocesses on this host — coordinator, tp*pp stage workers,
expert workers, gateway — started in order, watched, and stopped together (no orphans, ports released).

The command lines come from deploy.commands, like the compose services' (deploy.cluster).
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from stagemesh.deploy.cluster import load_cluster, localize, resolve_paths, services
from stagemesh.deploy.commands import (
    MeshLayout,
    coordinator_command,
    gateway_command,
    spare_commands,
    worker_commands,
)
from stagemesh.errors import Unavailable


@dataclass
class Child:
    name: str
    argv: list[str]
    proc: subprocess.Popen | None = None
    address: str = ""
    http: str = ""  # the gateway's HTTP API, when it serves one
    lines: list[str] = field(default_factory=list)


LAUNCHER_PID = "STAGEMESH_LAUNCHER_PID"  # set in the environment of the children a launcher starts


def follow_launcher() -> None:
    """In a child a launcher started (LAUNCHER_PID set): SIGTERM when the launcher dies, even by SIGKILL
    (Linux prctl PR_SET_PDEATHSIG). The child sets it on itself, not the launcher in a preexec_fn: forking a
    launcher that runs gRPC threads and running Python before exec can abort the child in gRPC's fork
    handlers (seen: SIGABRT of workers a bench started), while without preexec_fn Python spawns with vfork."""
    launcher = os.environ.pop(LAUNCHER_PID, None)  # not inherited by this process's own children
    if launcher is None:
        return
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)
    except OSError:
        return
    if os.getppid() != int(launcher):  # the launcher died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


class LocalMesh:
    def __init__(self, layout: MeshLayout, log=sys.stderr) -> None:
        self.layout = layout
        self.children: list[Child] = []
        self.log = log
        self.coordinator = self.gateway = ""
        self.http = ""  # HOST:PORT of the gateway's HTTP API, when it serves one
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
        self.http = self.children[-1].http
        self._wait_serving(deadline)
        for name, argv in spare_commands(layout, self.coordinator):  # after the roles are taken
            self._spawn(name, argv, deadline=None)
        threading.Thread(target=self._watch, daemon=True).start()

    def add_spare(self, kind: str = "stage") -> Child:
        """One more spare worker ("stage" or "expert") with the options of the layout's own spares, e.g. to
        stand in for a lost one; it is stopped with the rest."""
        layout = replace(self.layout, spares=int(kind == "stage"), expert_spares=int(kind == "expert"))
        ((name, argv),) = spare_commands(layout, self.coordinator)
        unique = f"{name.split('=')[0]}={len(self.children)}"
        self._spawn(unique, argv, deadline=None)
        return self.children[-1]

    def _check_plan(self) -> None:
        """Refuses a bad plan before any process starts."""
        from stagemesh.models.config import ModelConfig

        self.layout.parallel_plan(ModelConfig.from_dir(self.layout.model_dir))

    def _spawn(
        self,
        name: str,
        argv: list[str],
        deadline: float | None,
        env: dict[str, str] | None = None,
    ) -> str:
        child = Child(name, [sys.executable, "-m", "stagemesh.cli", *argv])
        child.proc = subprocess.Popen(
            child.argv,
            stdout=subprocess.PIPE,
            stderr=None,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {}), LAUNCHER_PID: str(os.getpid())},
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
            if line.startswith("http ") and "address=" in line:
                child.http = line.split("address=", 1)[1].split()[0]
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
    their order (coordinator, gateway, workers) with their own argv and environment; the spares once the
    mesh serves, so that each waits for a lost role rather than taking one of the plan's."""

    def __init__(self, layout: MeshLayout, services, log=sys.stderr) -> None:
        super().__init__(layout, log)
        self.services = list(services)

    def start(self, timeout: float = 300.0) -> None:
        self._check_plan()
        deadline = time.monotonic() + timeout
        for service in [s for s in self.services if not s.spare]:
            waits = service.role in ("coordinator", "gateway")  # workers announce themselves to the coordinator
            address = self._spawn(service.name, list(service.argv), deadline if waits else None, dict(service.env))
            if service.role == "coordinator":
                self.coordinator = address
            elif service.role == "gateway":
                self.gateway, self.http = address, self.children[-1].http
        self._wait_serving(deadline)
        for service in [s for s in self.services if s.spare]:
            self._spawn(service.name, list(service.argv), None, dict(service.env))
        threading.Thread(target=self._watch, daemon=True).start()


def run_mesh(mesh: LocalMesh) -> None:
    """Starts the mesh, prints `ready gateway=... coordinator=...[ http=...]`, serves until SIGINT/SIGTERM."""

    def interrupt(*_) -> None:  # only a plain assignment: a handler taking a lock can deadlock the main thread
        mesh.interrupted = True

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, interrupt)
    try:
        mesh.start()
        http = f" http={mesh.http}" if mesh.http else ""
        print(f"ready gateway={mesh.gateway} coordinator={mesh.coordinator}{http}", flush=True)
        while not mesh.interrupted:
            time.sleep(0.2)
    finally:
        mesh.stop()


def run_up(layout: MeshLayout) -> None:
    run_mesh(LocalMesh(layout))


def run_cluster_up(config: str) -> None:
    """`stagemesh up --config FILE`: every host of the description on this machine (see cluster.localize)."""
    cluster = resolve_paths(localize(load_cluster(config)), Path(config).parent)
    run_mesh(ServiceMesh(cluster.layout(), services(cluster)))
