"""The mesh as real processes on loopback: every layout (the llama_mesh fixture) produces Hugging Face's
greedy tokens, and its workers hold exactly their share of the weights."""

from __future__ import annotations

import asyncio

from stagemesh.coordinator.client import cluster_status
from stagemesh.coordinator.wire import plan_from_message
from stagemesh.gateway.client import AsyncClient, GenerationParams
from stagemesh.models.config import ModelConfig
from stagemesh.models.plan import ParallelPlan
from support import PROMPTS

MORE_PROMPTS = PROMPTS + [[11, 400, 3], [9] * 30, list(range(100, 160))]  # 41 and 60 tokens: chunked prefill


async def _generate_all(address: str, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    async with AsyncClient(address, timeout=120) as client:
        params = [GenerationParams(p, max_tokens=max_tokens, ignore_eos=True) for p in prompts]
        results = await asyncio.gather(*(client.generate(p) for p in params))
    return [r.token_ids for r in results]


def test_concurrent_greedy_equals_transformers(llama_mesh, hf_reference):
    outputs = asyncio.run(_generate_all(llama_mesh.gateway, MORE_PROMPTS, 24))
    for prompt, tokens in zip(MORE_PROMPTS, outputs):
        assert tokens == hf_reference("llama", prompt, 24)


def test_workers_hold_their_share_of_the_parameters(llama_mesh, checkpoint):
    status = cluster_status(llama_mesh.coordinator)
    config = ModelConfig.from_dir(checkpoint("llama"))
    plan = plan_from_message(status.topology.plan).parallel
    assert len(status.workers) == plan.tp * plan.pp
    for w in status.workers:
        # float64 weights: M / (tp * pp) of the sharded weights plus the replicated norms, from the plan's formula.
        assert w.param_bytes == plan.stage_param_count(config, w.stage, w.tp_rank) * 8
        assert w.state == "ready"
    total = sum(w.param_bytes for w in status.workers)
    whole = ParallelPlan.build(config).stage_param_count(config, 0, 0) * 8
    replicated = sum(plan.replicated_param_count(config, s.index) for s in plan.stages) * 8
    assert total == whole + (plan.tp - 1) * replicated


def test_generate_cli_against_the_mesh_matches_the_reference(llama_mesh, checkpoint):
    """`stagemesh generate --gateway` prints the same JSON as `stagemesh generate --model`."""
    import json
    import subprocess
    import sys

    common = ["--prompt", "Hello world", "--max-tokens", "12", "--ignore-eos", "--json"]

    def run(*args):
        out = subprocess.run(
            [sys.executable, "-m", "stagemesh.cli", "generate", *args, *common],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        return json.loads(out.stdout)

    assert run("--gateway", llama_mesh.gateway) == run("--model", checkpoint("llama"), "--dtype", "float64")
