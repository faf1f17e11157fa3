"""Failover with exact replay: a worker is killed mid-stream, a spare takes its role, and every stream
continues token-for-token as on a run without the failure (real processes, float64, loopback).

Each test that kills owns its mesh. The failure-free reference is the same requests on the same mesh before
the kill: same processes, same numerics."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
from stagemesh.coordinator.client import cluster_status
from stagemesh.gateway.client import Client, GatewayError, GenerationParams
from support import MeshProcess

MAX_TOKENS = 120
ARGS = ("--dtype", "float64", "--max-step-tokens", "32", "--kv-memory", "32MiB")


def _prompts(n: int) -> list[list[int]]:
    return [[(11 * i + 7 * j) % 400 + 3 for j in range(5 + i % 7)] for i in range(n)]


class Streams:
    """n concurrent streams, each collecting its deltas; `started` once every stream has a token."""

    def __init__(self, gateway: str, requests: list[GenerationParams], deadlines: list[float] | None = None) -> None:
        self.requests = requests
        self.deadlines = deadlines or [120.0] * len(requests)  # seconds, each stream's gRPC deadline
        self.deltas: list[list[list[int]]] = [[] for _ in requests]
        self.finished = [False] * len(requests)
        self.errors: list[GatewayError | None] = [None] * len(requests)
        self.ended_at: list[float] = [0.0] * len(requests)
        self.threads = [
            threading.Thread(target=self._run, args=(gateway, i), daemon=True) for i in range(len(requests))
        ]
        for t in self.threads:
            t.start()

    def _run(self, gateway: str, i: int) -> None:
        with Client(gateway) as client:
            try:
                for part in client.stream(self.requests[i], timeout=self.deadlines[i]):
                    if part.token_ids:
                        self.deltas[i].append(list(part.token_ids))
                self.finished[i] = True
            except GatewayError as e:
                self.errors[i] = e
            self.ended_at[i] = time.monotonic()

    def wait_all_started(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not all(self.deltas) and time.monotonic() < deadline:
            time.sleep(0.005)
        assert all(self.deltas), "not every stream got a token"

    def tokens(self, i: int) -> list[int]:
        return [t for d in self.deltas[i] for t in d]

    def join(self, timeout: float = 120) -> None:
        for t in self.threads:
            t.join(timeout)


def _reference(gateway: str, requests: list[GenerationParams]) -> list[list[int]]:
    with Client(gateway, timeout=120) as client:
        return [list(client.generate(r).token_ids) for r in requests]


def _wait_spares(mesh: MeshProcess, count: int, timeout: float = 60) -> None:
    """Until `coordctl status` lists `count` spares."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = _coordctl("status", "--coordinator", mesh.coordinator, "--json")
        if len(status["spares"]) >= count and status["ready"]:
            return
        time.sleep(0.2)
    raise AssertionError(f"{count} spares did not register")


def _worker_process(mesh: MeshProcess, role: str):
    """The process serving `role` ("stage 1 rank 0", "expert worker 0"), found by its address's port."""
    import psutil

    status = cluster_status(mesh.coordinator)
    (worker,) = [w for w in status.workers if w.role.startswith(role)]
    port = int(worker.address.rsplit(":", 1)[1])
    for child in psutil.Process(mesh.proc.pid).children(recursive=True):
        if any(c.laddr.port == port and c.status == psutil.CONN_LISTEN for c in child.net_connections("tcp")):
            return child
    raise LookupError(role)


def _kill_mid_stream(mesh: MeshProcess, role: str, requests: list[GenerationParams], deadlines=None) -> Streams:
    victim = _worker_process(mesh, role)
    streams = Streams(mesh.gateway, requests, deadlines)
    streams.wait_all_started()
    victim.kill()
    assert not any(streams.finished) and not any(streams.errors), "a stream ended before the kill"
    streams.join()
    return streams


def _assert_exact(streams: Streams, expected: list[list[int]]) -> None:
    for i, want in enumerate(expected):
        assert streams.errors[i] is None, f"stream {i}: {streams.errors[i]}"
        assert streams.finished[i]
        assert streams.tokens(i) == want, f"stream {i} differs from the failure-free run"


def _greedy(n: int) -> list[GenerationParams]:
    return [GenerationParams(p, max_tokens=MAX_TOKENS, ignore_eos=True) for p in _prompts(n)]


def test_tp2_pp2_killed_ranks_are_replaced_in_place_and_every_stream_continues_exactly(checkpoint):
    """Two failures one after the other on a tp=2 pp=2 mesh with two spares: stage 1's rank 1, then stage 0's
    leader. Each time one spare takes the lost role and the stage's surviving rank re-forms the group with it
    under a new group epoch, keeping its weights; the 16 greedy streams of each round finish equal to the
    failure-free run, deltas concatenated."""
    mesh = MeshProcess(checkpoint("llama"), "--tp", "2", "--pp", "2", "--spares", "2", *ARGS)
    try:
        _wait_spares(mesh, 2)
        requests = _greedy(16)
        expected = _reference(mesh.gateway, requests)
        survivor = _worker_process(mesh, "stage 1 rank 0")
        _assert_exact(_kill_mid_stream(mesh, "stage 1 rank 1", requests), expected)
        status = cluster_status(mesh.coordinator)
        assert len(status.spares) == 1, "one spare took the one lost role"
        assert survivor.is_running() and _worker_process(mesh, "stage 1 rank 0").pid == survivor.pid
        _assert_exact(_kill_mid_stream(mesh, "stage 0 rank 0", requests), expected)
        status = cluster_status(mesh.coordinator)
        assert status.topology.ready and not status.spares
        assert _reference(mesh.gateway, requests[:2]) == expected[:2]
        events = _coordctl("events", "--coordinator", mesh.coordinator, "--json")
        dead = [e for e in events if e["kind"] == "dead"]
        assert [e["detail"].split(" at ")[0] for e in dead] == ["stage 1 rank 1", "stage 0 rank 0"]
        assert "no heartbeat" in dead[0]["detail"]
        assert len([e for e in events if e["kind"] == "takeover"]) == 2
        regroups = [e["detail"] for e in events if e["kind"] == "regroup"]
        assert any(d.startswith("stage 1 forms") for d in regroups)
        assert any(d.startswith("stage 0 forms") for d in regroups)
    finally:
        mesh.stop()


def _coordctl(*args: str):
    import json

    from click.testing import CliRunner
    from stagemesh.coordinator.cli import main

    result = CliRunner().invoke(main, list(args))
    assert result.exit_code in (0, 1), result.output  # status: 1 = not fully serving
    return json.loads(result.output)


def test_seeded_sampling_across_a_failure_equals_the_failure_free_run(checkpoint):
    """Also: a stream whose deadline passes during the recovery (the heartbeat timeout alone is 3 s) ends
    with DEADLINE_EXCEEDED, and the gateway frees its KV blocks."""
    mesh = MeshProcess(checkpoint("llama"), "--pp", "2", "--spares", "1", *ARGS)
    try:
        _wait_spares(mesh, 1)
        requests = [
            GenerationParams(p, max_tokens=MAX_TOKENS, ignore_eos=True, temperature=0.8, seed=7) for p in _prompts(4)
        ]
        expected = _reference(mesh.gateway, requests)
        assert len({tuple(e) for e in expected}) > 1
        late = GenerationParams(_prompts(5)[-1], max_tokens=4 * MAX_TOKENS, ignore_eos=True)
        streams = _kill_mid_stream(mesh, "stage 1 rank 0", [*requests, late], deadlines=[120.0] * 4 + [3.0])
        assert streams.errors[4] is not None and streams.errors[4].code == grpc.StatusCode.DEADLINE_EXCEEDED
        _assert_exact(streams, expected)  # the first four
        deadline = time.monotonic() + 10
        while cluster_status(mesh.coordinator).gateway.kv_blocks_used and time.monotonic() < deadline:
            time.sleep(0.2)
        assert cluster_status(mesh.coordinator).gateway.kv_blocks_used == 0
    finally:
        mesh.stop()


def test_without_a_spare_requests_fail_fast_and_a_new_worker_restores_service(checkpoint):
    mesh = MeshProcess(checkpoint("llama"), "--pp", "2", *ARGS)
    try:
        requests = _greedy(4)
        expected = _reference(mesh.gateway, requests)
        victim = _worker_process(mesh, "stage 1 rank 0")
        streams = Streams(mesh.gateway, requests)
        streams.wait_all_started()
        victim.kill()
        killed_at = time.monotonic()
        streams.join()
        for i, error in enumerate(streams.errors):
            assert error is not None and error.code == grpc.StatusCode.UNAVAILABLE, f"stream {i}: {error}"
            assert streams.ended_at[i] - killed_at < 5.0
        with Client(mesh.gateway, timeout=30) as client, pytest.raises(GatewayError) as e:
            client.generate(GenerationParams([1, 2], max_tokens=2), timeout=20)
        assert e.value.code == grpc.StatusCode.UNAVAILABLE
        assert "stage 1 rank 0 is down, no spare" in str(e.value)
        survivors = [c for c in mesh.children if c.pid != victim.pid]
        assert all(c.is_running() for c in survivors)
        worker = _start_worker(mesh)
        deadline = time.monotonic() + 60
        while not cluster_status(mesh.coordinator).topology.ready and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(0.5)
        assert _reference(mesh.gateway, requests) == expected
        worker.terminate()
        worker.wait(30)
    finally:
        mesh.stop()


def _start_worker(mesh: MeshProcess):
    import subprocess
    import sys

    from support import child_env

    argv = [sys.executable, "-m", "stagemesh.cli", "stage-worker", "--coordinator", mesh.coordinator]
    argv += ["--threads", "1", "--kv-memory", "32MiB"]
    return subprocess.Popen(argv, env=child_env(), stdout=subprocess.DEVNULL)


def test_a_killed_expert_worker_without_replica_is_replaced_by_an_expert_spare(checkpoint):
    mesh = MeshProcess(checkpoint("mixtral"), "--ep", "2", "--expert-spares", "1", *ARGS)
    try:
        _wait_spares(mesh, 1)
        requests = _greedy(4)
        expected = _reference(mesh.gateway, requests)
        _assert_exact(_kill_mid_stream(mesh, "expert worker 0", requests), expected)
    finally:
        mesh.stop()


def _service_process(mesh: MeshProcess, command: str):
    """The live child of `mesh` that runs `stagemesh <command>` ("coordinator", "gateway")."""
    import psutil

    found = []
    for child in mesh.children:
        try:
            if child.cmdline()[3:4] == [command]:
                found.append(child)
        except psutil.NoSuchProcess:  # one this test killed
            pass
    (proc,) = found
    return proc


def _on_its_port(argv: list[str], address: str) -> list[str]:
    """The coordinator's command line, asking for the port it got (`stagemesh up` starts it on port 0)."""
    argv = list(argv)
    argv[argv.index("--port") + 1] = address.rsplit(":", 1)[1]
    return argv


def _wait_whole(coordinator: str, roles: list[str], spares: int, timeout: float) -> dict:
    """Until `coordctl status` shows the mesh serving with every role ready and `spares` spares."""
    deadline = time.monotonic() + timeout
    status = {}
    while time.monotonic() < deadline:
        try:
            status = _coordctl("status", "--coordinator", coordinator, "--json")
        except AssertionError:  # not answering yet (exit code 2)
            time.sleep(0.1)
            continue
        held = sorted(w["role"] for w in status["workers"] if w["state"] == "ready")
        if status["serving"] and held == roles and len(status["spares"]) == spares:
            return status
        time.sleep(0.1)
    raise AssertionError(f"the mesh was not whole {timeout:.0f}s after the restart: {status}")


def test_a_restarted_coordinator_gets_its_roster_back_and_a_drain_moves_a_role_without_failed_requests(
    checkpoint, tmp_path
):
    """The coordinator is killed (-9) mid-stream and started again on its port with its command line: the
    16 streams finish token-exact on the intact data path, the workers and the spare re-register, the
    pipeline keeps its epoch, `coordctl status` is whole within 10 s. Then `coordctl drain` moves stage 1
    to the (re-registered) spare under load: no request fails, every stream is token-exact (replay), the
    drained worker exits cleanly. Last, a gateway killed and restarted re-attaches; nothing else restarts."""
    import subprocess

    from click.testing import CliRunner
    from stagemesh.coordinator.cli import main as coordctl
    from support import child_env

    mesh = MeshProcess(checkpoint("llama"), "--pp", "2", "--spares", "1", *ARGS)
    restarted = []  # the processes this test starts again, stopped at the end
    try:
        _wait_spares(mesh, 1)
        requests = _greedy(16)
        expected = _reference(mesh.gateway, requests)
        before = _coordctl("status", "--coordinator", mesh.coordinator, "--json")
        roles = sorted(w["role"] for w in before["workers"])
        old = _service_process(mesh, "coordinator")
        argv = _on_its_port(old.cmdline(), mesh.coordinator)
        streams = Streams(mesh.gateway, requests)
        streams.wait_all_started()
        old.kill()
        assert not any(streams.finished) and not any(streams.errors), "a stream ended before the kill"
        old.wait(10)
        with open(tmp_path / "coordinator.log", "w") as log:
            restarted.append(subprocess.Popen(argv, env=child_env(), stdout=subprocess.DEVNULL, stderr=log))
        after = _wait_whole(mesh.coordinator, roles, spares=1, timeout=10)
        streams.join()
        _assert_exact(streams, expected)
        assert after["epoch"] > before["epoch"] and after["pipeline_epoch"] == before["pipeline_epoch"]
        assert [w["address"] for w in after["workers"]] == [w["address"] for w in before["workers"]]
        events = _coordctl("events", "--coordinator", mesh.coordinator, "--json")
        assert sorted(e["detail"].split(" again")[0].split(" is ")[1] for e in events if e["kind"] == "rejoined") == [
            "stage 0 rank 0",
            "stage 1 rank 0",
        ]
        assert not [e for e in events if e["kind"] in ("dead", "takeover")]

        drained = _worker_process(mesh, "stage 1 rank 0")
        streams = Streams(mesh.gateway, requests)
        streams.wait_all_started()
        reply = _coordctl("drain", "stage 1 rank 0", "--coordinator", mesh.coordinator, "--json")
        assert reply["role"].startswith("stage 1 rank 0")
        assert not any(streams.finished) and not any(streams.errors), "a stream ended before the drain"
        streams.join()
        _assert_exact(streams, expected)
        kinds = [e["kind"] for e in _coordctl("events", "--coordinator", mesh.coordinator, "--json")]
        assert kinds[kinds.index("drained") :].count("takeover") == 1
        deadline = time.monotonic() + 20
        while not any(f"(pid {drained.pid}) exited with code 0" in line for line in mesh.stderr_lines):
            assert time.monotonic() < deadline, "the drained worker did not exit cleanly"
            time.sleep(0.2)
        refused = CliRunner().invoke(coordctl, ["drain", "stage 0 rank 0", "--coordinator", mesh.coordinator])
        assert refused.exit_code == 2 and "no stage spare waits to take stage 0 rank 0" in refused.output
        restarted.append(_restart_gateway(mesh, requests[:4], tmp_path))
        assert _reference(mesh.gateway, requests[:4]) == expected[:4]
        events = _coordctl("events", "--coordinator", mesh.coordinator, "--json")
        assert [e["kind"] for e in events].count("dead") == 0  # nothing else restarted
    finally:
        mesh.stop()
        for proc in restarted:
            proc.terminate()
            proc.wait(30)


def _restart_gateway(mesh: MeshProcess, requests: list[GenerationParams], tmp_path):
    """kill -9 of the gateway mid-stream (its streams end UNAVAILABLE: clients retry) and a restart on its port
    with its command line: it re-attaches to the running mesh. Returns the new gateway process."""
    import subprocess

    from stagemesh.proto.rpc import check_health
    from support import child_env

    old = _service_process(mesh, "gateway")
    argv = _on_its_port(old.cmdline(), mesh.gateway)
    streams = Streams(mesh.gateway, requests)
    streams.wait_all_started()
    old.kill()
    streams.join()
    assert all(e is not None and e.code == grpc.StatusCode.UNAVAILABLE for e in streams.errors), streams.errors
    with open(tmp_path / "gateway.log", "w") as log:
        gateway = subprocess.Popen(argv, env=child_env(), stdout=subprocess.DEVNULL, stderr=log)
    deadline = time.monotonic() + 30
    while not check_health(mesh.gateway, timeout=1.0):
        assert time.monotonic() < deadline and gateway.poll() is None, (tmp_path / "gateway.log").read_text()[-2000:]
        time.sleep(0.2)
    return gateway
