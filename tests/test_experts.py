"""Expert parallelism: Mixtral served with expert workers equals Hugging Face, each worker holds only its
experts, replicas absorb a dead worker, bad dispatches get INVALID_ARGUMENT."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
import torch
from click.testing import CliRunner
from stagemesh.cli import main
from stagemesh.coordinator.client import cluster_status
from stagemesh.coordinator.status import expert_imbalance, status_dict
from stagemesh.coordinator.wire import plan_from_message
from stagemesh.gateway.client import AsyncClient, Client, GatewayError, GenerationParams
from stagemesh.models.config import ModelConfig
from stagemesh.proto import expert_pb2 as pb
from stagemesh.proto import expert_pb2_grpc
from stagemesh.proto.rpc import channel
from stagemesh.proto.tensor_codec import encode
from support import PROMPTS, MeshProcess, stream_broken_by

MOE_PROMPTS = PROMPTS + [[11, 400, 3], list(range(100, 160))]


async def _generate_all(address: str, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    async with AsyncClient(address, timeout=300) as client:
        results = await asyncio.gather(
            *(client.generate(GenerationParams(p, max_tokens=max_tokens, ignore_eos=True)) for p in prompts)
        )
    return [r.token_ids for r in results]


def test_concurrent_greedy_equals_transformers(mixtral_mesh, hf_reference):
    outputs = asyncio.run(_generate_all(mixtral_mesh.gateway, MOE_PROMPTS, 20))
    for prompt, tokens in zip(MOE_PROMPTS, outputs):
        assert tokens == hf_reference("mixtral", prompt, 20)


def test_each_expert_worker_holds_only_its_experts(mixtral_mesh, checkpoint):
    status = cluster_status(mixtral_mesh.coordinator)
    config = ModelConfig.from_dir(checkpoint("mixtral"))
    plan = plan_from_message(status.topology.plan).parallel
    experts = [w for w in status.workers if w.kind == "expert"]
    assert sorted(w.expert_index for w in experts) == list(range(plan.ep))
    per_expert = 3 * config.hidden_size * config.intermediate_size * config.num_hidden_layers * 8  # float64
    for w in experts:
        held = plan.expert_groups[w.expert_index]
        assert w.param_bytes == len(held) * per_expert == plan.expert_param_count(config, w.expert_index) * 8
        assert w.role == f"expert worker {w.expert_index}: experts {','.join(map(str, held))}"
    for w in status.workers:  # the stages keep only the routers of their MoE layers
        if w.kind == "stage":
            assert w.param_bytes == plan.stage_param_count(config, w.stage, w.tp_rank) * 8


def test_expert_load_is_counted_and_shown(mixtral_mesh):
    with Client(mixtral_mesh.gateway, timeout=60) as client:
        client.generate(GenerationParams([5, 9, 23, 42], max_tokens=8, ignore_eos=True))
    time.sleep(1.5)  # one heartbeat
    data = status_dict(cluster_status(mixtral_mesh.coordinator))
    load = [l for w in data["workers"] for l in w["expert_load"]]
    tokens = sum(t for l in load for t in l["tokens"])
    assert tokens > 0 and expert_imbalance(load) >= 1.0
    assert {l["layer"] for l in load} == {0, 1, 2, 3}
    result = CliRunner().invoke(
        __import__("stagemesh.coordinator.cli", fromlist=["main"]).main,
        ["status", "--coordinator", mixtral_mesh.coordinator],
    )
    assert "expert load imbalance (max / mean tokens per expert)" in result.output


@pytest.fixture(scope="module")
def replicated(checkpoint):
    """ep=3 with every expert on two workers."""
    mesh = MeshProcess(checkpoint("mixtral"), "--ep", "3", "--expert-replicas", "all=2", "--dtype", "float64")
    yield mesh
    mesh.stop()


def _expert_address(mesh, index: int) -> str:
    return cluster_status(mesh.coordinator).topology.expert_addresses[index]


@pytest.mark.parametrize(
    "hidden,ids,message",
    [
        (
            torch.randn(2, 64, dtype=torch.float64),
            [[0, 4], [1, -1]],
            "expert 4 is not held by this worker (it holds 0,1,2,6,7)",
        ),
        (torch.randn(2, 32, dtype=torch.float64), [[0, -1], [1, -1]], "hidden states must be (tokens, 64)"),
        (torch.randn(2, 64, dtype=torch.float32), [[0, -1], [1, -1]], "hidden states must be float64"),
    ],
)
def test_bad_dispatch_is_invalid_argument_and_the_worker_keeps_serving(replicated, hidden, ids, message):
    request = pb.ExpertRequest(
        layer=0, hidden=encode(hidden), expert_ids=encode(torch.tensor(ids)), weights=encode(torch.full((2, 2), 0.5))
    )
    with channel(_expert_address(replicated, 0)) as ch:  # all=2 over ep=3: worker 0 holds 0,1,2 and copies of 6,7
        stub = expert_pb2_grpc.ExpertsStub(ch)
        with pytest.raises(grpc.RpcError) as e:
            stub.Compute(request, timeout=30)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in e.value.details()
        good = pb.ExpertRequest(
            layer=0,
            hidden=encode(torch.randn(2, 64, dtype=torch.float64)),
            expert_ids=encode(torch.tensor([[0, 1], [2, -1]])),
            weights=encode(torch.full((2, 2), 0.5)),
        )
        assert list(stub.Compute(good, timeout=30).output.shape) == [2, 64]


def test_killing_a_replica_mid_stream_loses_nothing(replicated, hf_reference):
    prompts = [[5, 9, 23, 42, 7], list(range(3, 20)), [11, 400, 3]]

    async def run():
        async with AsyncClient(replicated.gateway, timeout=300) as client:
            streams = [client.stream(GenerationParams(p, max_tokens=150, ignore_eos=True)) for p in prompts]
            firsts = [await s.__anext__() for s in streams]
            replicated.child("--expert-worker-index 1").kill()
            results = []
            for first, stream in zip(firsts, streams):
                tokens = list(first.token_ids)
                async for chunk in stream:
                    tokens.extend(chunk.token_ids)
                results.append(tokens)
            return results

    for prompt, tokens in zip(prompts, asyncio.run(run())):
        assert tokens == hf_reference("mixtral", prompt, 150)
    with Client(replicated.gateway, timeout=60) as client:  # and new requests keep working
        assert client.generate(GenerationParams(prompts[0], max_tokens=10, ignore_eos=True)).token_ids == hf_reference(
            "mixtral", prompts[0], 10
        )


def test_a_dead_expert_without_replica_fails_steps_with_unavailable(checkpoint):
    mesh = MeshProcess(checkpoint("mixtral"), "--ep", "2")
    try:
        error = stream_broken_by(mesh.gateway, mesh.child("--expert-worker-index 0"), max_tokens=400)
        assert "expert" in error.details
    finally:
        mesh.stop()


def test_a_stopping_expert_worker_ends_open_streams_with_unavailable(checkpoint):
    """SIGTERM to an expert worker while a client holds its Stream open (as every stage does): the stream ends
    with UNAVAILABLE and the reason, rather than being cancelled once the server's grace ran out (which grpc
    logged as an unhandled CancelledError)."""
    import queue

    mesh = MeshProcess(checkpoint("mixtral"), "--ep", "1", "--dtype", "float64")
    try:
        requests: queue.SimpleQueue = queue.SimpleQueue()
        good = pb.ExpertRequest(
            layer=0,
            hidden=encode(torch.randn(2, 64, dtype=torch.float64)),
            expert_ids=encode(torch.tensor([[0, 1], [2, -1]])),
            weights=encode(torch.full((2, 2), 0.5)),
        )
        with channel(_expert_address(mesh, 0)) as ch:
            replies = expert_pb2_grpc.ExpertsStub(ch).Stream(iter(requests.get, None), timeout=60)
            requests.put(good)
            assert list(next(replies).output.shape) == [2, 64]
            mesh.child("--expert-worker-index 0").terminate()
            with pytest.raises(grpc.RpcError) as e:
                next(replies)
            requests.put(None)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "the expert worker is stopping" in e.value.details()
    finally:
        mesh.stop()
    assert not [line for line in mesh.stderr_lines if "Exception not handled" in line]


@pytest.mark.parametrize(
    "args,message",
    [
        (["--ep", "9"], "ep=9 exceeds num_local_experts=8"),
        (["--ep", "2", "--expert-replicas", "1=3"], "needs ep >= 3"),
    ],
)
def test_impossible_expert_layouts_are_refused_at_start(checkpoint, args, message):
    result = CliRunner().invoke(main, ["coordinator", "--model", checkpoint("mixtral"), *args])
    assert result.exit_code == 2 and message in result.output


@pytest.mark.parametrize("tp", [1, 2])
def test_an_expert_workers_refusal_reaches_the_client_with_one_status_at_any_tp(checkpoint, tmp_path, monkeypatch, tp):
    """An expert worker that sees another checkpoint (here: one with 2 of the 4 MoE layers) refuses the
    stage's dispatch for layer 2; the client gets INVALID_ARGUMENT naming it, whether one rank dispatches
    (tp=1) or each rank a slice (tp=2, the refusal carried through the all-gather)."""
    import json
    import shutil

    from stagemesh.deploy import launcher
    from stagemesh.deploy.commands import MeshLayout

    model = checkpoint("mixtral")
    other = tmp_path / "two-layers"
    shutil.copytree(model, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 2}))
    commands = launcher.worker_commands

    def misconfigured(layout, coordinator):
        return [
            (n, [*a, "--model", str(other)] if n.startswith("expert") else a) for n, a in commands(layout, coordinator)
        ]

    monkeypatch.setattr(launcher, "worker_commands", misconfigured)
    layout = MeshLayout(str(model), tp=tp, ep=1, dtype="float64", threads=1, kv_memory="8MiB")
    mesh = launcher.LocalMesh(layout)
    try:
        mesh.start(timeout=120)
        with Client(mesh.gateway, timeout=60) as client:
            with pytest.raises(GatewayError) as e:
                client.generate(GenerationParams([5, 9, 23], max_tokens=4, ignore_eos=True))
    finally:
        mesh.stop()
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "layer 2" in e.value.details
