"""One bad step is not a dead stage: a step that runs out of memory (injected into real stage workers with
STAGEMESH_FAULT_OOM_*, see stage_worker/faults.py) fails only its own requests with RESOURCE_EXHAUSTED,
its KV is freed everywhere, and the same stage goes on serving exact results."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import torch
from stagemesh.coordinator.client import cluster_events, cluster_status
from stagemesh.gateway.client import AsyncClient, Client, GatewayError, GenerationParams
from stagemesh.models.engine import ReferenceEngine
from stagemesh.models.requests import GenerationRequest
from support import MeshProcess, wait_kv_free

OOM_TOKENS = 20  # steps of more than this many tokens run out of memory
SHORT = [[5, 9, 23, 42, 7], list(range(3, 20)), [11, 400, 3]]  # prompts that fit (<= 20 tokens)
LONG = [(7 * i) % 500 + 3 for i in range(30)]


@pytest.fixture(scope="module")
def reference(checkpoint):
    engine = ReferenceEngine(checkpoint("llama"), dtype=torch.float64)

    def run(prompt, max_tokens):
        return engine.generate([GenerationRequest(tuple(prompt), max_tokens, ignore_eos=True)])[0].token_ids

    return run


def _oom_mesh(checkpoint, args: list[str], **fault: str) -> MeshProcess:
    env = {
        "STAGEMESH_FAULT_OOM_TOKENS": str(OOM_TOKENS),
        **{f"STAGEMESH_FAULT_OOM_{k.upper()}": v for k, v in fault.items()},
    }
    return MeshProcess(checkpoint("llama"), "--dtype", "float64", *args, env=env)


def _assert_still_serving_exactly(mesh: MeshProcess, reference) -> None:
    """Every worker is up, the mesh ready, and new requests on the same stages equal the reference."""
    assert all(c.is_running() for c in mesh.children)
    assert cluster_status(mesh.coordinator).topology.ready
    with Client(mesh.gateway, timeout=60) as client:
        for prompt in SHORT:
            assert client.generate(GenerationParams(prompt, max_tokens=12, ignore_eos=True)).token_ids == reference(
                prompt, 12
            )
    wait_kv_free(mesh.coordinator)


def _refused_long_prompt(client: Client) -> GatewayError:
    with pytest.raises(GatewayError) as e:
        client.generate(GenerationParams(LONG, max_tokens=5, ignore_eos=True))
    assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    return e.value


def _long_prompt_beside_a_stream(mesh: MeshProcess):
    """A stream runs; a long prompt is sent meanwhile and fails: (its error, the stream's first chunk, all the
    stream's tokens)."""

    async def run():
        async with AsyncClient(mesh.gateway, timeout=120) as client:
            stream = client.stream(GenerationParams(SHORT[0], max_tokens=80, ignore_eos=True))
            first = await stream.__anext__()
            with pytest.raises(GatewayError) as e:
                await client.generate(GenerationParams(LONG, max_tokens=5, ignore_eos=True))
            tokens = list(first.token_ids)
            async for chunk in stream:
                tokens.extend(chunk.token_ids)
            return e.value, first, tokens

    return asyncio.run(run())


def test_tp1_out_of_memory_mid_forward_fails_only_its_step(checkpoint, reference):
    """pp=2, the last stage runs out of memory inside its forward (after writing the step's KV): the failure
    travels back through stage 0; a stream running meanwhile (in its own micro-batch) finishes exactly."""
    mesh = _oom_mesh(checkpoint, ["--pp", "2"], at="forward", stage="1")
    try:
        error, first, tokens = _long_prompt_beside_a_stream(mesh)
        assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "stage 1 ran out of memory" in error.details and "injected out-of-memory" in error.details
        assert first.finish_reason is None  # the stream was running when the long prompt failed
        assert tokens == reference(SHORT[0], 80)
        wait_kv_free(mesh.coordinator)
        _assert_still_serving_exactly(mesh, reference)
        with Client(mesh.gateway, timeout=60) as client:  # and again: failing does not wear anything out
            _refused_long_prompt(client)
        _assert_still_serving_exactly(mesh, reference)
    finally:
        assert mesh.stop() == 0


def test_tp2_ranks_agree_on_an_out_of_memory_step(checkpoint, reference):
    """tp=2: only rank 1's reservation fails; both ranks learn it before any collective of the step, so the
    leader fails the step too and the ranks stay in step (later results are exact, nothing hangs)."""
    mesh = _oom_mesh(checkpoint, ["--tp", "2"], at="reserve", rank="1")
    try:
        with Client(mesh.gateway, timeout=60) as client:
            error = _refused_long_prompt(client)
        assert "another TP rank of this stage is out of memory" in error.details
        assert "retry with a shorter prompt" in error.details
        wait_kv_free(mesh.coordinator)
        _assert_still_serving_exactly(mesh, reference)
    finally:
        assert mesh.stop() == 0


def test_tp2_out_of_memory_inside_the_leaders_forward_fails_its_step_and_re_forms_the_group(checkpoint, reference):
    """tp=2 pp=2, stage 1's rank 0 alone runs out of memory inside the forward, leaving rank 1 inside a
    collective: that step's request fails with RESOURCE_EXHAUSTED, the two ranks re-form their group under a
    new epoch (no process leaves, no spare needed), and a stream that was running meanwhile (in the other
    micro-batch) is replayed and finishes exactly."""
    mesh = _oom_mesh(checkpoint, ["--tp", "2", "--pp", "2"], at="forward", stage="1", rank="0")
    try:
        error, first, tokens = _long_prompt_beside_a_stream(mesh)
        assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "injected out-of-memory" in error.details
        assert first.finish_reason is None
        assert tokens == reference(SHORT[0], 80)
        events = [e["kind"] for e in cluster_events(mesh.coordinator)]
        assert "regroup" in events and "dead" not in events
        wait_kv_free(mesh.coordinator)
        _assert_still_serving_exactly(mesh, reference)
    finally:
        assert mesh.stop() == 0
