"""The mesh across three hosts: network namespaces joined by a bridge stand in for them. Each host's services
run with exactly the argv and environment the cluster description gives them (what the compose services run),
and greedy output equals the reference engine. Then a partition: one host's link is cut mid-stream, its
workers are declared dead for their silence, the description's spares take their roles, and every stream
finishes as on the failure-free run; when the link comes back the cut workers are refused and exit, and one
restarted with its own argv (as compose restarts it) waits as a spare."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass

import pytest
import torch
from stagemesh.deploy.certs import make_certs
from stagemesh.deploy.cluster import Cluster, Service, parse_cluster, services, tls_environment
from support import HELPERS, child_env

SUBNET = "10.123.0"
IFNAME = "sm0"  # every host namespace names its interface the same, so one GLOO_SOCKET_IFNAME fits all
HOSTS = {"a": f"{SUBNET}.1", "b": f"{SUBNET}.2", "c": f"{SUBNET}.3"}
MAX_TOKENS = 64

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="creating network namespaces needs root (CI runs as root)")


@dataclass
class Namespaces:
    """Host namespaces on one bridge (in a namespace of its own, so this machine's network is untouched)."""

    prefix: str
    created: list[str]
    certs: str = ""  # the clients' TLS folder

    def name(self, host: str) -> str:
        return f"{self.prefix}-{host}"

    def exec(self, host: str) -> list[str]:
        return ["ip", "netns", "exec", self.name(host)]


def ip(*args: str) -> None:
    out = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, f"ip {' '.join(args)}: {out.stderr}"


def make_namespaces(stack: ExitStack) -> Namespaces:
    assert shutil.which("ip"), "iproute2's `ip` is missing (apt-get install iproute2; .ci/run does)"
    ns = Namespaces(f"sm{os.getpid()}", [])
    stack.callback(_delete, ns)
    switch = ns.name("switch")
    for name in [switch, *(ns.name(h) for h in HOSTS)]:
        ip("netns", "add", name)
        ns.created.append(name)
        ip("-n", name, "link", "set", "lo", "up")
    ip("-n", switch, "link", "add", "br0", "type", "bridge")
    ip("-n", switch, "link", "set", "br0", "up")
    for host, address in HOSTS.items():
        ip("link", "add", IFNAME, "netns", ns.name(host), "type", "veth", "peer", "name", f"p{host}", "netns", switch)
        ip("-n", switch, "link", "set", f"p{host}", "master", "br0", "up")
        ip("-n", ns.name(host), "addr", "add", f"{address}/24", "dev", IFNAME)
        ip("-n", ns.name(host), "link", "set", IFNAME, "up")
    return ns


def _delete(ns: Namespaces) -> None:
    for name in ns.created:
        pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout.split()
        for pid in pids:  # only this test's processes live in namespaces it made
            try:
                os.kill(int(pid), 9)
            except ProcessLookupError:
                pass
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def description(model: str, certs: str) -> Cluster:
    """Coordinator, gateway and two stage-worker spares on host a, stage 0's two TP ranks on b, stage 1's on c;
    mutual TLS between all."""
    return parse_cluster(
        {
            "model": {"path": model, "dtype": "float64"},
            "parallel": {"tp": 2, "pp": 2},
            "hosts": [
                {"name": "a", "address": HOSTS["a"], "devices": [], "spares": ["cpu", "cpu"]},
                {"name": "b", "address": HOSTS["b"], "devices": ["cpu", "cpu"]},
                {"name": "c", "address": HOSTS["c"], "devices": ["cpu", "cpu"]},
            ],
            "workers": {"threads": 1, "kv_memory": "8MiB"},
            "env": {"GLOO_SOCKET_IFNAME": IFNAME, "NCCL_SOCKET_IFNAME": IFNAME},
            "bind": "0.0.0.0",  # beyond loopback: allowed because TLS protects it
            "security": {"tls_dir": certs},
        }
    )


def start(ns: Namespaces, service: Service, stack: ExitStack, logs) -> subprocess.Popen:
    env = dict(child_env(), **dict(service.env))
    argv = [*ns.exec(service.host), sys.executable, "-m", "stagemesh.cli", *service.argv]
    proc = subprocess.Popen(argv, stdout=logs, stderr=subprocess.STDOUT, env=env)
    stack.callback(_stop, proc)
    return proc


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def in_host(ns: Namespaces, host: str, tool: str, *args: str) -> subprocess.CompletedProcess:
    """`stagemesh ARGS` or `coordctl ARGS` run inside a host's namespace (this namespace dials none of them),
    presenting the client certificate."""
    module = {"stagemesh": "stagemesh.cli", "coordctl": "stagemesh.coordinator.cli"}[tool]
    command = [*ns.exec(host), sys.executable, "-m", module, *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, env=client_env(ns))


def client_env(ns: Namespaces) -> dict[str, str]:
    return dict(child_env(), **tls_environment(ns.certs, "client"))


def coordctl(ns: Namespaces, cluster: Cluster, *args: str):
    out = in_host(ns, "a", "coordctl", *args, "--coordinator", cluster.coordinator_address, "--json")
    assert out.returncode in (0, 1), out.stderr  # status: 1 = not fully serving
    return json.loads(out.stdout)


def streams(ns: Namespaces, gateway: str, prompts: list[list[int]], max_tokens: int) -> subprocess.Popen:
    """helpers/netns_streams.py in host a: prints `started` once every stream has a token, then waits for a
    line on stdin before it notes how many had ended."""
    argv = [str(HELPERS / "netns_streams.py"), gateway, str(max_tokens), json.dumps(prompts)]
    command = [*ns.exec("a"), sys.executable, *argv]
    return subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=client_env(ns))


def run_streams(driver: subprocess.Popen, cut=lambda: None, then=lambda: None) -> dict:
    """Waits until every stream has a token, calls `cut`, notes how many streams had ended, calls `then` while
    they run on, and returns their outcome."""
    assert driver.stdout.readline() == "started\n"
    cut()
    driver.stdin.write("cut\n")
    driver.stdin.flush()
    then()
    out, _ = driver.communicate(timeout=180)
    return json.loads(out)


def wait_serving(ns: Namespaces, gateway: str, procs: dict[str, subprocess.Popen], log_path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while in_host(ns, "a", "stagemesh", "health", gateway, "--timeout", "2").returncode != 0:
        dead = [name for name, p in procs.items() if p.poll() is not None]
        assert not dead and time.monotonic() < deadline, f"dead: {dead}\n{log_path.read_text()[-4000:]}"
        time.sleep(0.5)


def test_mesh_across_three_hosts_equals_the_reference_and_survives_a_cut_link(checkpoint, tmp_path):
    model = checkpoint("llama")
    certs = str(tmp_path / "certs")
    make_certs(certs, ["coordinator", "gateway", "worker", "client"], list(HOSTS.values()))
    cluster = description(model, certs)
    log_path = tmp_path / "mesh.log"
    with ExitStack() as stack, open(log_path, "w") as logs:
        ns = make_namespaces(stack)
        ns.certs = certs
        procs = {s.name: start(ns, s, stack, logs) for s in services(cluster) if not s.spare}
        gateway = f"{HOSTS['a']}:{cluster.gateway.port}"
        wait_serving(ns, gateway, procs, log_path, timeout=120)
        procs |= {s.name: start(ns, s, stack, logs) for s in services(cluster) if s.spare}  # after the roles
        status = coordctl(ns, cluster, "status")
        assert status["serving"]
        hosts = {(w["stage"], w["tp_rank"]): w["address"].split(":")[0] for w in status["workers"]}
        assert hosts == {(0, 0): HOSTS["b"], (0, 1): HOSTS["b"], (1, 0): HOSTS["c"], (1, 1): HOSTS["c"]}
        prompts = [[5, 9, 23, 42, 7], list(range(3, 40))]
        for prompt, expected in zip(prompts, reference(model, prompts, 12)):
            out = in_host(
                ns,
                "a",
                "stagemesh",
                "generate",
                "--gateway",
                gateway,
                "--prompt-ids",
                ",".join(map(str, prompt)),
                "--max-tokens",
                "12",
                "--ignore-eos",
                "--json",
            )
            assert out.returncode == 0, out.stderr + log_path.read_text()[-4000:]
            assert json.loads(out.stdout)["token_ids"] == expected
        partition_is_survived(ns, cluster, procs, stack, logs, log_path)


def partition_is_survived(ns: Namespaces, cluster: Cluster, procs, stack: ExitStack, logs, log_path) -> None:
    """Cuts host c's link (stage 1's two ranks) while streams run: silence, not a dead process."""
    gateway = f"{HOSTS['a']}:{cluster.gateway.port}"
    deadline = time.monotonic() + 60
    while len(coordctl(ns, cluster, "status")["spares"]) < 2:
        assert time.monotonic() < deadline, f"the spares did not register\n{log_path.read_text()[-4000:]}"
        time.sleep(0.5)
    prompts = [[(11 * i + 7 * j) % 400 + 3 for j in range(5 + i)] for i in range(4)]
    expected = run_streams(streams(ns, gateway, prompts, MAX_TOKENS))
    assert expected["errors"] == [None] * len(prompts) and all(len(t) == MAX_TOKENS for t in expected["tokens"])
    link = ["-n", ns.name("switch"), "link", "set", "pc"]

    def heal() -> None:
        """Once both are declared dead the link comes back, while the spares take over: the cut workers
        hear that they lost their roles and exit."""
        deadline = time.monotonic() + 30
        while len([e for e in coordctl(ns, cluster, "events") if e["kind"] == "dead"]) < 2:
            assert time.monotonic() < deadline, (
                f"the cut workers were not declared dead\n{log_path.read_text()[-4000:]}"
            )
            time.sleep(0.5)
        ip(*link, "up")

    cut = run_streams(streams(ns, gateway, prompts, MAX_TOKENS), lambda: ip(*link, "down"), heal)
    assert cut["ended_at_cut"] == 0, "a stream ended before the cut"
    assert cut["errors"] == [None] * len(prompts), f"{cut['errors']}\n{log_path.read_text()[-4000:]}"
    assert cut["tokens"] == expected["tokens"], "a stream differs from the failure-free run"

    events = coordctl(ns, cluster, "events")
    dead = sorted(e["detail"] for e in events if e["kind"] == "dead")
    assert [d.split(":")[0] for d in dead] == [f"stage 1 rank {r} at {HOSTS['c']}" for r in range(2)], dead
    assert all("no heartbeat" in d for d in dead)
    takeovers = [e["detail"] for e in events if e["kind"] == "takeover"]
    assert len(takeovers) == 2 and all(t.startswith(HOSTS["a"]) and HOSTS["c"] in t for t in takeovers)

    for name in ("stage-1-rank-0", "stage-1-rank-1"):  # the leader's goodbye may end its peer first
        procs[name].wait(60)
    assert "was declared dead and lost its role" in log_path.read_text()
    restarted = start(ns, next(s for s in services(cluster) if s.name == "stage-1-rank-0"), stack, logs)
    deadline = time.monotonic() + 60
    while True:
        status = coordctl(ns, cluster, "status")
        if any(x["address"].startswith(HOSTS["c"]) for x in status["spares"]):
            break
        assert restarted.poll() is None and time.monotonic() < deadline, log_path.read_text()[-4000:]
        time.sleep(0.5)
    workers = {(w["stage"], w["tp_rank"]): w["address"].split(":")[0] for w in status["workers"]}
    assert status["serving"]
    assert workers == {(0, 0): HOSTS["b"], (0, 1): HOSTS["b"], (1, 0): HOSTS["a"], (1, 1): HOSTS["a"]}


def reference(model: str, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    from stagemesh.models.engine import ReferenceEngine
    from stagemesh.models.requests import GenerationRequest

    engine = ReferenceEngine(model, dtype=torch.float64)
    results = engine.generate([GenerationRequest(tuple(p), max_tokens, ignore_eos=True) for p in prompts])
    return [r.token_ids for r in results]
