"""Serving through the public API of a running mesh: continuous batching is exact, seeds reproduce,
cancellation and deadlines free KV at once, bad input gets its status and disturbs nothing."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
import urllib.request

import grpc
import pytest
import torch
from click.testing import CliRunner
from stagemesh.coordinator.cli import main as coordctl
from stagemesh.gateway.client import AsyncClient, Client, GatewayError, GenerationParams
from stagemesh.models.engine import ReferenceEngine
from stagemesh.models.requests import GenerationRequest, SamplingParams
from support import MeshProcess, child_env


@pytest.fixture(scope="session")
def reference(checkpoint):
    """reference(prompt, max_tokens, sampling) -> tokens of the request run alone in the reference engine."""
    engine = ReferenceEngine(checkpoint("llama"), dtype=torch.float64)
    cache = {}

    def run(prompt, max_tokens, sampling=SamplingParams()):
        key = (tuple(prompt), max_tokens, sampling)
        if key not in cache:
            req = GenerationRequest(tuple(prompt), max_tokens, sampling, ignore_eos=True)
            cache[key] = engine.generate([req])[0].token_ids
        return cache[key]

    return run


def workload(n: int = 32) -> list[tuple[list[int], int]]:
    """n requests of different prompt lengths (1-70 tokens: some span several 32-token steps) and output lengths."""
    return [([(13 * i + 7 * j) % 500 + 3 for j in range(1 + (i * 11) % 70)], 1 + (i * 7) % 30) for i in range(n)]


async def _stream_all(address: str, params: list[GenerationParams]) -> list[list[int]]:
    async def one(client, p):
        tokens = []
        async for chunk in client.stream(p):
            tokens.extend(chunk.token_ids)
        return tokens

    async with AsyncClient(address, timeout=300) as client:
        return await asyncio.gather(*(one(client, p) for p in params))


def test_32_concurrent_streams_equal_each_request_run_alone(llama_mesh, reference):
    requests = workload()
    params = [GenerationParams(p, max_tokens=n, ignore_eos=True) for p, n in requests]
    outputs = asyncio.run(_stream_all(llama_mesh.gateway, params))
    for (prompt, n), tokens in zip(requests, outputs):
        assert tokens == reference(prompt, n)


def test_same_seed_same_tokens_alone_or_among_others(llama_mesh, reference):
    sampling = dict(temperature=0.9, top_p=0.95, top_k=50, seed=1234)
    target = GenerationParams([5, 9, 23, 42], max_tokens=20, ignore_eos=True, **sampling)
    (alone,) = asyncio.run(_stream_all(llama_mesh.gateway, [target]))
    others = [
        GenerationParams(p, max_tokens=n, ignore_eos=True, temperature=1.0, seed=i)
        for i, (p, n) in enumerate(workload(8))
    ]
    together = asyncio.run(_stream_all(llama_mesh.gateway, others[:4] + [target] + others[4:]))[4]
    assert together == alone
    assert alone == reference([5, 9, 23, 42], 20, SamplingParams(**sampling))  # the engine draws the same way
    assert alone != reference([5, 9, 23, 42], 20)  # and it really sampled


def _kv_in_use(coordinator: str) -> tuple[int, list[int]]:
    data = json.loads(CliRunner().invoke(coordctl, ["status", "--coordinator", coordinator, "--json"]).output)
    return data["gateway"]["kv_blocks_used"], [w["kv_blocks_used"] for w in data["workers"]]


def _wait_kv_free(coordinator: str, timeout: float = 8.0) -> None:
    deadline = time.monotonic() + timeout
    while _kv_in_use(coordinator) != (0, [0] * len(_kv_in_use(coordinator)[1])):
        assert time.monotonic() < deadline, f"KV still in use: {_kv_in_use(coordinator)}"
        time.sleep(0.2)


def _cancelled_requests(mesh) -> float:
    """The gateway's stagemesh_requests_total{finish_reason="cancelled"}."""
    for line in _metrics(mesh).splitlines():
        if line.startswith('stagemesh_requests_total{finish_reason="cancelled"}'):
            return float(line.split()[-1])
    return 0.0


def _metrics(mesh) -> str:
    line = next(l for l in mesh.stderr_lines if "metrics on http://" in l)
    return urllib.request.urlopen(line.split("metrics on ")[1].strip(), timeout=10).read().decode()


def test_cancelling_a_stream_frees_its_kv(llama_mesh):
    before = _cancelled_requests(llama_mesh)
    with Client(llama_mesh.gateway, timeout=60) as client:
        stream = client.stream(GenerationParams([5, 9, 23], max_tokens=500, ignore_eos=True))
        for _, _ in zip(range(3), stream):
            pass
        stream.close()  # cancels the call mid-way (500 tokens take about a second)
        _wait_kv_free(llama_mesh.coordinator)
        assert _cancelled_requests(llama_mesh) == before + 1  # it ended by the cancel, not by finishing
        assert len(client.generate(GenerationParams([1, 2, 3], max_tokens=3)).token_ids) == 3


def test_a_deadline_frees_kv(llama_mesh):
    before = _cancelled_requests(llama_mesh)
    with Client(llama_mesh.gateway) as client:
        with pytest.raises(GatewayError) as e:
            for _ in client.stream(GenerationParams([5, 9, 23], max_tokens=500, ignore_eos=True), timeout=0.3):
                pass
        assert e.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        _wait_kv_free(llama_mesh.coordinator)
        assert _cancelled_requests(llama_mesh) == before + 1
        assert len(client.generate(GenerationParams([1, 2, 3], max_tokens=3), timeout=60).token_ids) == 3


BAD_REQUESTS = [
    (GenerationParams([]), "prompt is empty"),
    (GenerationParams(""), "prompt is empty"),
    (GenerationParams([5] * 600), "prompt has 600 tokens; the context is 512"),
    (GenerationParams([5, 6], max_tokens=0), "max_tokens must be >= 1, got 0"),
    (GenerationParams([5, 6], max_tokens=-3), "max_tokens must be >= 1, got -3"),
    (GenerationParams([5, 6], max_tokens=600), "exceeds the context of 512"),
    (GenerationParams([5, 6], temperature=-0.5), "temperature must be >= 0"),
    (GenerationParams([5, 6], top_p=0.0), "top_p must be in (0, 1]"),
    (GenerationParams([5, 6], top_p=1.5), "top_p must be in (0, 1]"),
    (GenerationParams([5, 6], top_k=-1), "top_k must be >= 0"),
    (GenerationParams([5, 99999]), "token ids must be in [0, 512); got 99999"),
    (GenerationParams("x" * (2 << 20)), "prompt.text is 2097152 bytes; the limit is 1048576"),
    (GenerationParams([5, 6], stop=("s",) * 40), "stop: at most 16 strings"),
    (GenerationParams([5, 6], logprobs=50), "logprobs must be in [0, 20]"),
]


@pytest.mark.parametrize("params,message", BAD_REQUESTS, ids=[m for _, m in BAD_REQUESTS])
def test_bad_input_is_invalid_argument_and_disturbs_nothing(llama_mesh, params, message):
    with Client(llama_mesh.gateway, timeout=60) as client:
        with pytest.raises(GatewayError) as e:
            client.generate(params)
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert message in e.value.details
        assert len(client.generate(GenerationParams([1, 2, 3], max_tokens=2)).token_ids) == 2


def test_streaming_api_reports_text_logprobs_and_usage(llama_mesh, reference):
    with Client(llama_mesh.gateway, timeout=60) as client:
        chunks = list(client.stream(GenerationParams("Hello world", max_tokens=6, ignore_eos=True, logprobs=3)))
        info = client.model_info()
    tokens = [t for c in chunks for t in c.token_ids]
    assert len(tokens) == 6 and chunks[-1].finish_reason == "length"
    assert all(len(l.top) == 3 and l.top[0][1] >= l.logprob - 1e-6 for c in chunks for l in c.logprobs)
    usage = chunks[-1].usage
    assert usage.completion_tokens == 6 and usage.prompt_tokens > 0 and usage.total_time >= usage.time_to_first_token
    assert (info.model_type, info.max_context, info.has_tokenizer) == ("llama", 512, True)


def test_stop_strings_cut_the_text(llama_mesh):
    with Client(llama_mesh.gateway, timeout=60) as client:
        free = client.generate(GenerationParams("Hello world", max_tokens=20, ignore_eos=True))
        stop = free.text[3:6]
        stopped = client.generate(GenerationParams("Hello world", max_tokens=20, ignore_eos=True, stop=(stop,)))
    assert stopped.finish_reason == "stop"
    assert stopped.text == free.text[: free.text.index(stop)]


def test_a_client_made_only_from_the_served_descriptors_streams(llama_mesh):
    """No stagemesh code on the client side: descriptors come from server reflection, as grpcurl does it."""
    from google.protobuf import message_factory
    from google.protobuf.descriptor_pool import DescriptorPool
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with grpc.insecure_channel(llama_mesh.gateway) as ch:
        pool = DescriptorPool(ProtoReflectionDescriptorDatabase(ch))
        method = pool.FindServiceByName("stagemesh.v1.Generation").FindMethodByName("Generate")
        request_class = message_factory.GetMessageClass(method.input_type)
        response_class = message_factory.GetMessageClass(method.output_type)
        call = ch.unary_stream(
            "/stagemesh.v1.Generation/Generate",
            request_serializer=request_class.SerializeToString,
            response_deserializer=response_class.FromString,
        )
        request = request_class(max_tokens=5, ignore_eos=True)
        request.token_ids.ids.extend([5, 9, 23])
        responses = list(call(request, timeout=60))
    assert sum(len(r.token_ids) for r in responses) == 5
    assert responses[-1].finish_reason == 1  # FINISH_REASON_LENGTH


def test_coordctl_status_lists_every_worker_and_tracks_health(llama_mesh):
    result = CliRunner().invoke(coordctl, ["status", "--coordinator", llama_mesh.coordinator, "--json"])
    assert result.exit_code == 0
    data = json.loads(result.output)
    plan = data["plan"]
    assert data["serving"] and len(data["workers"]) == plan["tp"] * plan["pp"]
    roles = {(w["stage"], w["tp_rank"]) for w in data["workers"]}
    assert roles == {(s, r) for s in range(plan["pp"]) for r in range(plan["tp"])}
    for w in data["workers"]:
        assert w["role"].startswith(f"stage {w['stage']} rank {w['tp_rank']}: layers")
        assert w["state"] == "ready" and w["kv_blocks"] > 0 and "kv_blocks_used" in w
        assert w["param_bytes"] == w["predicted_param_bytes"]
    table = CliRunner().invoke(coordctl, ["status", "--coordinator", llama_mesh.coordinator])
    assert table.exit_code == 0 and "SERVING" in table.output


def test_prometheus_metrics(llama_mesh):
    with Client(llama_mesh.gateway, timeout=60) as client:
        client.generate(GenerationParams([4, 5, 6], max_tokens=4, ignore_eos=True))
    body = _metrics(llama_mesh)
    for series in (
        "stagemesh_time_to_first_token_seconds_bucket",
        "stagemesh_inter_token_latency_seconds_bucket",
        "stagemesh_e2e_request_latency_seconds_count",
        "stagemesh_num_requests_waiting",
        "stagemesh_num_requests_running",
        "stagemesh_kv_cache_usage_ratio",
        "stagemesh_prompt_tokens_total",
        "stagemesh_generation_tokens_total",
        'stagemesh_stage_busy_seconds_total{stage="0"}',
    ):
        assert series in body


@pytest.fixture(scope="module")
def one_at_a_time(checkpoint):
    mesh = MeshProcess(checkpoint("llama"), "--max-running", "1", "--max-queue", "1", "--metrics-port", "0")
    yield mesh
    mesh.stop()


def _gauge(mesh, name: str) -> float:
    return next(float(l.split()[-1]) for l in _metrics(mesh).splitlines() if l.startswith(name + " "))


def test_a_full_queue_is_resource_exhausted(one_at_a_time):
    with Client(one_at_a_time.gateway, timeout=60) as client:
        running = client.stream(GenerationParams([5, 9], max_tokens=500, ignore_eos=True))  # about a second
        next(running)
        queued = []
        waiter = threading.Thread(target=lambda: queued.append(client.generate(GenerationParams([5, 9], max_tokens=2))))
        waiter.start()
        deadline = time.monotonic() + 5
        while _gauge(one_at_a_time, "stagemesh_num_requests_waiting") < 1:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        with pytest.raises(GatewayError) as e:
            client.generate(GenerationParams([1, 2], max_tokens=2))
        assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "queue is full" in e.value.details
        running.close()
        waiter.join(30)
        assert len(queued[0].token_ids) == 2
        assert len(client.generate(GenerationParams([1, 2], max_tokens=2)).token_ids) == 2


def test_beyond_the_model_is_invalid_beyond_the_whole_cache_is_resource_exhausted(checkpoint):
    """The model's context (512) bounds a request; the KV cache (4 blocks of 16 tokens here) only decides
    whether it can ever run: prompt + max_tokens over 64 tokens is RESOURCE_EXHAUSTED, not INVALID_ARGUMENT."""
    mesh = MeshProcess(checkpoint("llama"), "--kv-memory", "64KiB")
    try:
        with Client(mesh.gateway, timeout=60) as client:
            assert client.model_info().max_context == 512
            with pytest.raises(GatewayError) as e:
                client.generate(GenerationParams([5] * 600, max_tokens=2))
            assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "context is 512" in e.value.details
            with pytest.raises(GatewayError) as e:
                client.generate(GenerationParams([5, 9], max_tokens=100, ignore_eos=True))
            assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "the whole mesh holds 4" in e.value.details
            assert len(client.generate(GenerationParams([5, 9], max_tokens=60, ignore_eos=True)).token_ids) == 60
    finally:
        mesh.stop()


def test_not_ready_is_unavailable(checkpoint, tmp_path):
    """A gateway whose mesh has no workers yet answers UNAVAILABLE with the reason, and a request that is
    bad whatever the model refuses as INVALID_ARGUMENT even then."""
    cli = [sys.executable, "-m", "stagemesh.cli"]
    coordinator = subprocess.Popen(
        [*cli, "coordinator", "--model", checkpoint("llama")], stdout=subprocess.PIPE, text=True, env=child_env()
    )
    try:
        address = coordinator.stdout.readline().split("address=")[1].strip()
        gateway = subprocess.Popen(
            [*cli, "gateway", "--coordinator", address], stdout=subprocess.PIPE, text=True, env=child_env()
        )
        try:
            gw = gateway.stdout.readline().split("address=")[1].strip()
            deadline = time.monotonic() + 10
            with Client(gw, timeout=30) as client:
                while True:  # until the gateway has heard the coordinator's first topology
                    with pytest.raises(GatewayError) as e:
                        client.generate(GenerationParams([1, 2], max_tokens=2))
                    assert e.value.code == grpc.StatusCode.UNAVAILABLE
                    if "waiting for stage 0 rank 0" in e.value.details or time.monotonic() > deadline:
                        break
                    time.sleep(0.1)
            assert e.value.details == "not ready: waiting for stage 0 rank 0"
            with Client(gw, timeout=30) as client:
                bad = {
                    "max_tokens": GenerationParams([1, 2], max_tokens=0),
                    "temperature": GenerationParams([1], temperature=-1.0),
                }
                for field, params in bad.items():
                    with pytest.raises(GatewayError) as e:
                        client.generate(params)
                    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and field in e.value.details
        finally:
            gateway.terminate()
            gateway.wait(20)
    finally:
        coordinator.terminate()
        coordinator.wait(20)
