"""The deployment: cluster descriptions, the compose files rendered from them (validated by docker-compose, each
service's command parsed by the real CLI), the image's Dockerfile, and `stagemesh up --config` serving."""

from __future__ import annotations

import asyncio
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import click
import pytest
import torch
import yaml
from click.testing import CliRunner
from stagemesh.cli import main
from stagemesh.deploy.cluster import (
    EXPERT,
    STAGE,
    host_services,
    load_cluster,
    localize,
    parse_cluster,
    placements,
    services,
    spare_placements,
)
from stagemesh.deploy.compose import render, stale_files
from stagemesh.errors import InvalidArgument
from support import _readline, child_env, free_port

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DESCRIPTIONS = sorted(DEPLOY.rglob("cluster.yaml"))
COMPOSE_FILES = sorted(DEPLOY.rglob("compose*.yaml"))


def parse_command(argv: list[str]) -> click.Context:
    """Parses `stagemesh ARGV` the way the CLI would, without running it; raises on a bad command or flag."""
    command = main.commands.get(argv[0])
    assert command is not None, f"stagemesh has no command {argv[0]!r}"
    return command.make_context(argv[0], list(argv[1:]))


def minimal(**overrides) -> dict:
    raw = {
        "model": {"path": "/models/m", "dtype": "float32"},
        "parallel": {"tp": 2, "pp": 2},
        "hosts": [
            {"name": "a", "address": "10.0.0.1", "devices": ["cuda:0", "cuda:1"]},
            {"name": "b", "address": "10.0.0.2", "devices": ["cuda:0", "cuda:1"]},
        ],
    }
    raw.update(overrides)
    return raw


# ---- the description ----


def test_examples_parse_and_place_every_worker():
    assert [p.relative_to(DEPLOY).as_posix() for p in DESCRIPTIONS] == [
        "cluster.yaml",
        "llama-70b-two-hosts/cluster.yaml",
        "mixtral-two-hosts/cluster.yaml",
    ]
    llama = load_cluster(DEPLOY / "llama-70b-two-hosts" / "cluster.yaml")
    where = [(p.role, p.index, p.rank, p.host.name, p.device, p.port) for p in placements(llama)]
    assert where == [(STAGE, s, r, f"gpu{s + 1}", f"cuda:{r}", 50100 + 4 * s + r) for s in range(2) for r in range(4)]
    mixtral = load_cluster(DEPLOY / "mixtral-two-hosts" / "cluster.yaml")
    experts = [(p.host.name, p.device) for p in placements(mixtral) if p.role == EXPERT]
    assert experts == [("gpu2", f"cuda:{i}") for i in range(4)]


def test_services_carry_the_flags_of_their_role():
    cluster = parse_cluster(minimal(env={"NCCL_DEBUG": "WARN"}, workers={"threads": 3}))
    by_name = {s.name: s for s in services(cluster)}
    assert list(by_name) == [
        "coordinator",
        "gateway",
        "stage-0-rank-0",
        "stage-0-rank-1",
        "stage-1-rank-0",
        "stage-1-rank-1",
    ]
    leader = parse_command(list(by_name["stage-1-rank-0"].argv)).params
    assert leader["coordinator"] == "10.0.0.1:50050" and leader["advertise"] == "10.0.0.2"
    assert (leader["stage"], leader["tp_rank"], leader["port"], leader["dist_port"]) == (1, 0, 50102, 29501)
    assert (leader["host"], leader["device"], leader["threads"]) == ("0.0.0.0", "cuda:0", 3)
    assert "--dist-port" not in by_name["stage-1-rank-1"].argv  # only TP rank 0 hosts the rendezvous store
    gateway = parse_command(list(by_name["gateway"].argv)).params
    assert (gateway["advertise"], gateway["port"]) == ("10.0.0.1", 50051)
    assert all(dict(s.env) == {"NCCL_DEBUG": "WARN"} for s in by_name.values())
    pinned = {s.name: s for s in services(cluster, pinned=True)}
    assert pinned["stage-1-rank-1"].gpu == 1 and "cuda:0" in pinned["stage-1-rank-1"].argv


def test_spares_follow_the_workers_and_register_without_a_role():
    hosts = minimal()["hosts"]
    hosts[0]["spares"] = ["cuda:2"]
    hosts[1]["spares"], hosts[1]["expert_spares"] = ["cpu"], ["cuda:3"]
    cluster = parse_cluster(minimal(parallel={"tp": 2, "pp": 2, "ep": 1}, hosts=hosts + [_host("c", ["cpu"])]))
    where = [(p.role, p.index, p.host.name, p.device, p.port) for p in spare_placements(cluster)]
    assert where == [(STAGE, 0, "a", "cuda:2", 50105), (STAGE, 1, "b", "cpu", 50106), (EXPERT, 0, "b", "cuda:3", 50107)]
    by_name = {s.name: s for s in services(cluster, pinned=True)}
    assert [n for n, s in by_name.items() if s.spare] == ["stage-spare-0", "stage-spare-1", "expert-spare-0"]
    spare = parse_command(list(by_name["stage-spare-0"].argv)).params
    assert (spare["stage"], spare["tp_rank"], spare["port"], spare["advertise"]) == (None, None, 50105, "10.0.0.1")
    assert spare["dist_port"] == 29502 and by_name["stage-spare-0"].gpu == 2  # its store, should it take a rank 0
    expert = parse_command(list(by_name["expert-spare-0"].argv)).params
    assert expert["expert_worker_index"] is None and by_name["expert-spare-0"].gpu == 3
    assert cluster.layout().spares == 2 and cluster.layout().expert_spares == 1
    assert [p.device for p in spare_placements(localize(cluster))] == ["cuda:2", "cpu", "cuda:5"]


def _host(name: str, devices: list[str], **more) -> dict:
    return {"name": name, "address": f"10.0.0.{ord(name) - 96}", "devices": devices, **more}


def test_localize_puts_every_host_here_and_numbers_the_gpus_in_order():
    local = localize(parse_cluster(minimal()))
    assert {h.address for h in local.hosts} == {"127.0.0.1"} and local.bind == "127.0.0.1"
    assert [p.device for p in placements(local)] == ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]
    for service in services(local):
        params = parse_command(list(service.argv)).params
        assert params["host"] == "127.0.0.1" and params.get("advertise") in (None, "127.0.0.1")


@pytest.mark.parametrize(
    "change,message",
    [
        ({"colour": "blue"}, "unknown key 'colour'"),
        ({"model": {"dtype": "float32"}}, "model: 'path' is required"),
        ({"parallel": {"tp": "two"}}, "parallel.tp: expected int, got str 'two'"),
        ({"parallel": {"tp": 4, "pp": 2}}, "4*2 + 0 = 8 workers need one device each, but the hosts list 4"),
        ({"coordinator": {"host": "c"}}, "coordinator.host 'c' is not one of the hosts (a, b)"),
        ({"workers": {"port": 50049}}, "coordinator.port (50050) and workers.port (50049-50052) overlap"),
        ({"gateway": {"metrics_port": 29501}}, "workers.dist_port (29500-29501) and gateway.metrics_port (29501)"),
        (
            {"hosts": [{"name": "a", "address": "x", "devices": ["cuda:0", "cuda:0", "cpu", "cpu"]}]},
            "lists a GPU twice",
        ),
        ({"hosts": [{"name": "a", "address": "x", "devices": ["gpu0"] * 4}]}, "device 'gpu0': write cpu or cuda:N"),
        ({"hosts": [{"name": "A", "address": "x", "devices": ["cpu"] * 4}]}, "host name 'A'"),
        (
            {"hosts": [{"name": "a", "address": "x", "devices": ["cpu"] * 4}, {"name": "b", "address": "y"}]},
            "host 'b' would run no service",
        ),
        ({"env": {"NCCL DEBUG": "1"}}, "'NCCL DEBUG' is not an environment variable name"),
        ({"hosts": [_host("a", ["cuda:0", "cpu", "cpu", "cpu"], spares=["cuda:0"])]}, "lists a GPU twice"),
        ({"hosts": [_host("a", ["cpu"] * 4, expert_spares=["cpu"])]}, "expert_spares: this mesh has no expert"),
        ({"hosts": [_host("a", ["cpu"] * 4, spares=["gpu1"])]}, "device 'gpu1': write cpu or cuda:N"),
        (
            {"hosts": [_host("a", ["cpu"] * 4, spares=["cpu"])], "gateway": {"port": 50104}},
            "gateway.port (50104) and workers.port (50100-50104) overlap",
        ),
        (
            {"hosts": [_host("a", ["cpu"] * 4, spares=["cpu"])], "gateway": {"metrics_port": 29502}},
            "workers.dist_port (29500-29502) and gateway.metrics_port (29502)",
        ),
    ],
)
def test_bad_descriptions_are_refused_with_the_reason(change, message):
    with pytest.raises(InvalidArgument) as error:
        parse_cluster(minimal(**change))
    assert message in str(error.value)


def test_compose_needs_the_model_under_the_mount():
    with pytest.raises(InvalidArgument, match="under /models"):
        render(parse_cluster(minimal(model={"path": "/srv/m"})))


# ---- the compose files ----


def test_every_compose_file_is_rendered_from_its_folders_description():
    assert {p.parent for p in COMPOSE_FILES} == {p.parent for p in DESCRIPTIONS}
    for description in DESCRIPTIONS:
        assert stale_files(description) == [], f"run `stagemesh compose --config {description.relative_to(ROOT)}`"


def test_compose_check_reports_a_stale_folder(tmp_path):
    folder = tmp_path / "deploy"
    shutil.copytree(DEPLOY / "llama-70b-two-hosts", folder)
    config = str(folder / "cluster.yaml")
    assert CliRunner().invoke(main, ["compose", "--config", config, "--check"]).exit_code == 0
    text = (folder / "cluster.yaml").read_text()
    (folder / "cluster.yaml").write_text(text.replace("  NCCL_DEBUG: WARN", "  NCCL_DEBUG: WARN\n  NCCL_IB_DISABLE: 1"))
    result = CliRunner().invoke(main, ["compose", "--config", config, "--check"])
    assert result.exit_code == 1 and "stale: compose.gpu1.yaml" in result.output and "stale: .env" in result.output
    written = CliRunner().invoke(main, ["compose", "--config", config])
    assert written.exit_code == 0, written.output
    assert stale_files(config) == []
    assert "NCCL_IB_DISABLE: ${NCCL_IB_DISABLE}" in (folder / "compose.gpu2.yaml").read_text()
    assert "\nNCCL_IB_DISABLE=1\n" in (folder / ".env").read_text()


def security_environment_of(cluster, name: str) -> dict[str, str]:
    """What every compose service gets besides the description's environment: tokens (blank in .env until the
    operator fills them) and, with TLS, its own certificate under /certs."""
    env = {"STAGEMESH_CLUSTER_TOKEN": ""} | ({"STAGEMESH_CLIENT_TOKEN": ""} if name == "gateway" else {})
    if cluster.security.tls_dir:
        cert = name if name in ("coordinator", "gateway") else "worker"
        env |= {
            "STAGEMESH_TLS_CERT": f"/certs/{cert}.crt",
            "STAGEMESH_TLS_KEY": f"/certs/{cert}.key",
            "STAGEMESH_TLS_CA": "/certs/ca.crt",
        }
    return env


def docker_compose_config(path: Path) -> dict:
    assert shutil.which("docker-compose"), "docker-compose is missing: `apt-get install docker-compose` (.ci/run does)"
    out = subprocess.run(["docker-compose", "-f", str(path), "config"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "is not set" not in out.stderr, out.stderr  # every variable has its value in .env
    return yaml.safe_load(out.stdout)


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.relative_to(DEPLOY).as_posix())
def test_compose_file_validates_and_runs_the_descriptions_commands(path):
    assert_runs_the_descriptions_commands(path)


def test_compose_files_run_the_spares_under_their_profile(tmp_path):
    """Spares on two of three hosts, with TLS: each is a worker service without a role, in profile `spares`."""
    hosts = [_host("a", [], spares=["cuda:0"]), _host("b", ["cuda:0", "cuda:1"]), _host("c", ["cuda:0", "cuda:1"])]
    hosts[2]["expert_spares"] = ["cuda:2"]
    hosts[2]["devices"].append("cuda:3")
    raw = minimal(parallel={"tp": 2, "pp": 2, "ep": 1}, hosts=hosts, security={"tls_dir": "./certs"})
    (tmp_path / "cluster.yaml").write_text(yaml.safe_dump(raw))
    written = CliRunner().invoke(main, ["compose", "--config", str(tmp_path / "cluster.yaml")])
    assert written.exit_code == 0, written.output
    spares = {}
    for host in "abc":
        spares |= assert_runs_the_descriptions_commands(tmp_path / f"compose.{host}.yaml")
    assert sorted(spares) == ["expert-spare-0", "stage-spare-0"]
    stage = parse_command(spares["stage-spare-0"]["command"]).params
    assert (stage["stage"], stage["tp_rank"], stage["advertise"], stage["device"]) == (None, None, "10.0.0.1", "cuda:0")
    assert parse_command(spares["expert-spare-0"]["command"]).params["expert_worker_index"] is None


def assert_runs_the_descriptions_commands(path: Path) -> dict[str, dict]:
    """Checks one compose file against its folder's description; returns its spare services, resolved."""
    resolved = docker_compose_config(path)["services"]
    cluster = load_cluster(path.parent / "cluster.yaml")
    host = path.name.split(".")[1] if path.name != "compose.yaml" else cluster.hosts[0].name
    expected = {s.name: s for s in host_services(cluster, host, pinned=True)}
    assert set(resolved) == set(expected)
    for name, service in resolved.items():
        parse_command(service["command"])  # a real stagemesh command with valid flags
        assert service["command"] == list(expected[name].argv)
        assert dict(service.get("environment", {})) == dict(expected[name].env) | security_environment_of(cluster, name)
        check = service["healthcheck"]["test"]
        assert check[:3] == ["CMD", "stagemesh", "health"]
        parse_command(check[2:])
        assert check[3] == f"{cluster.host(host).address}:{expected[name].port}"
        assert service["network_mode"] == "host" and service["restart"] == cluster.compose.restart
        certs = [f"{cluster.security.tls_dir}:/certs:ro"] if cluster.security.tls_dir else []
        assert [v.replace(str(path.parent.resolve()), ".") for v in service["volumes"]] == [
            f"{cluster.compose.models_dir}:/models:ro",
            *certs,
        ]
        devices = service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
        gpu = expected[name].gpu
        assert [d["device_ids"] for d in devices] == ([[str(gpu)]] if gpu is not None else [])
        assert service.get("profiles", []) == (["spares"] if expected[name].spare else [])
    return {name: service for name, service in resolved.items() if expected[name].spare}


def test_dockerfile_installs_this_project_as_a_user_with_a_model_volume():
    text = (DEPLOY / "Dockerfile").read_text()
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    assert "ARG VARIANT=cuda" in lines and "FROM base-${VARIANT}" in lines
    assert any(line.startswith("FROM nvidia/cuda:") and line.endswith("AS base-cuda") for line in lines)
    assert any(line.startswith("FROM python:3.11-slim") and line.endswith("AS base-cpu") for line in lines)
    assert "COPY . /tmp/stagemesh" in lines and any("pip install --no-cache-dir /tmp/stagemesh" in l for l in lines)
    users = [line for line in lines if line.startswith("USER ")]
    assert users and users[-1] != "USER root" and lines.index(users[-1]) > lines.index("COPY . /tmp/stagemesh")
    assert "VOLUME /models" in lines and 'ENTRYPOINT ["stagemesh"]' in lines
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored and "README.md" not in ignored  # pyproject's readme


# ---- stagemesh up --config ----


def test_up_config_refuses_other_layout_flags(tmp_path):
    config = tmp_path / "cluster.yaml"
    config.write_text(yaml.safe_dump(minimal()))
    result = CliRunner().invoke(main, ["up", "--config", str(config), "--tp", "2"])
    assert result.exit_code == 2 and "--config describes the whole mesh: drop --tp" in result.output
    assert "give --model DIR (or --config FILE)" in CliRunner().invoke(main, ["up"]).output


def free_ports(count: int) -> int:
    """The first of `count` consecutive free ports."""
    for _ in range(50):
        first = free_port()
        socks = []
        try:
            for port in range(first, first + count):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", port))
            return first
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no run of free ports")


def test_up_config_serves_the_reference_tokens(checkpoint, tmp_path):
    """Two described hosts (stage 0 on one, stage 1 and a spare on the other) run here as one mesh; the spare
    starts once it serves, so it waits for a lost role instead of taking one."""
    model = checkpoint("llama")
    raw = minimal(
        model={"path": model, "dtype": "float64"},
        parallel={"tp": 1, "pp": 2},
        hosts=[
            {"name": "a", "address": "192.0.2.1", "devices": ["cpu"]},
            {"name": "b", "address": "192.0.2.2", "devices": ["cpu"], "spares": ["cpu"]},
        ],
        coordinator={"port": free_port()},
        gateway={"port": free_port(), "host": "b"},
        workers={"port": free_ports(3), "dist_port": free_ports(2), "threads": 1, "kv_memory": "8MiB"},
    )
    config = tmp_path / "cluster.yaml"
    config.write_text(yaml.safe_dump(raw))
    proc = subprocess.Popen(
        [sys.executable, "-m", "stagemesh.cli", "up", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=child_env(),
    )
    errors: list[str] = []
    threading.Thread(target=lambda: errors.extend(proc.stderr), daemon=True).start()
    try:
        line = _readline(proc, 120)
        assert line.startswith("ready "), f"{line}\n{''.join(errors)[-3000:]}"
        fields = dict(part.split("=", 1) for part in line.split()[1:])
        assert fields["gateway"] == f"127.0.0.1:{raw['gateway']['port']}"
        assert fields["coordinator"] == f"127.0.0.1:{raw['coordinator']['port']}"
        _assert_workers_where_described(fields["coordinator"], raw)
        prompts = [[5, 9, 23, 42, 7], list(range(3, 30))]
        assert _generate(fields["gateway"], prompts, 12) == _reference(model, prompts, 12)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0


def _assert_workers_where_described(coordinator: str, raw: dict) -> None:
    from stagemesh.coordinator.client import cluster_status

    status = cluster_status(coordinator, timeout=30)  # a loaded machine: answers can take seconds
    for _ in range(600):  # the spare starts after the mesh serves
        if status.spares:
            break
        time.sleep(0.1)
        status = cluster_status(coordinator, timeout=30)
    first = raw["workers"]["port"]
    workers = {(w.stage, w.tp_rank): w.address for w in status.workers}
    assert workers == {(0, 0): f"127.0.0.1:{first}", (1, 0): f"127.0.0.1:{first + 1}"}
    assert [(s.kind, s.address) for s in status.spares] == [("stage", f"127.0.0.1:{first + 2}")]


def _generate(gateway: str, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    from stagemesh.gateway.client import AsyncClient, GenerationParams

    async def run():
        async with AsyncClient(gateway, timeout=120) as client:
            params = [GenerationParams(p, max_tokens=max_tokens, ignore_eos=True) for p in prompts]
            return [r.token_ids for r in await asyncio.gather(*(client.generate(p) for p in params))]

    return asyncio.run(run())


def _reference(model: str, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    from stagemesh.models.engine import ReferenceEngine
    from stagemesh.models.requests import GenerationRequest

    engine = ReferenceEngine(model, dtype=torch.float64)
    results = engine.generate([GenerationRequest(tuple(p), max_tokens, ignore_eos=True) for p in prompts])
    return [r.token_ids for r in results]
