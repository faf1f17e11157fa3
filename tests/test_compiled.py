"""The compiled decode path (`--compile`, models/compiled.py) against eager, on (1,1), (2,1), (1,2) and Mixtral.

Tolerance (float32): the largest |logit difference| <= 1e-3 x the largest |logit| of the step. Inductor
reorders float32 reductions (fused norms, oneDNN GEMM blocking, attention as matmul + softmax): each op
moves a value by ~1e-6 relative, and 4 layers measure ~3e-6 of the largest logit here. 1e-3 leaves ~300x
room for that rounding while a real bug (a wrong mask, position or KV slot, a stale page) moves logits
by O(1). Greedy tokens must then be equal. Every test is skipped, with the reason, where torch.compile
cannot run (no C++ compiler). Buckets are kept to one graph per process (STAGEMESH_COMPILE_BUCKETS).
"""

from __future__ import annotations

import functools
from dataclasses import replace

import pytest
import torch
from compiled_support import decode_logits
from stagemesh.models.compiled import BUCKETS_ENV, FREEZING_ENV, CompileOptions
from stagemesh.models.engine import ReferenceEngine
from stagemesh.models.loader import build_model
from stagemesh.models.requests import GenerationRequest
from stagemesh.models.runner import ModelRunner
from support import PROMPTS, hf_model, run_ranks

BUCKETS = "4x8"  # batches 1-4 pad to 4 (the prompts' batch is 3), up to 8 blocks: one graph
F32_TOL = 1e-3  # x the largest |logit| (see the module docstring)


@functools.cache
def compile_unavailable() -> str | None:
    try:
        torch.compile(lambda x: x * 2 + 1)(torch.ones(4))
    except Exception as e:  # noqa: BLE001 - any failure to build a kernel means this host cannot compile
        return f"torch.compile cannot run on this host: {type(e).__name__}: {str(e)[:200]}"
    return None


# Skipped only where torch.compile cannot build a kernel, with the reason printed (-ra shows it).
pytestmark = pytest.mark.skipif(compile_unavailable() is not None, reason=compile_unavailable() or "")


@pytest.fixture(autouse=True)
def compile_works(monkeypatch):
    monkeypatch.setenv(BUCKETS_ENV, BUCKETS)
    monkeypatch.setenv(FREEZING_ENV, "0")  # child processes (TP ranks, mesh workers) compile without freezing


def compiled_runner(path: str, dtype=torch.float32, freezing: bool = True, buckets: str = BUCKETS) -> ModelRunner:
    model, _ = build_model(path, dtype=dtype)
    options = replace(CompileOptions.parse(buckets), freezing=freezing)
    runner = ModelRunner(model, num_blocks=64, block_size=16, compile=options)
    runner.compiled.warm_up()
    return runner


def assert_close_to_eager(runner: ModelRunner, prompts=PROMPTS, steps: int = 8) -> None:
    ours, our_tokens = decode_logits(runner, prompts, steps, compiled=True)
    assert runner.compiled.stats.compiled_steps == steps
    ref, ref_tokens = decode_logits(runner, prompts, steps, compiled=False)  # same weights, same pages
    assert torch.equal(our_tokens, ref_tokens)
    for step in range(steps):
        worst = (ours[step] - ref[step]).abs().max().item()
        assert worst <= F32_TOL * ref[step].abs().max().item(), f"step {step}: {worst}"


@pytest.mark.parametrize("arch", ["llama", "mixtral"])
def test_compiled_decode_matches_eager(checkpoint, arch):
    """(1,1) and the Mixtral layout (local experts run eagerly between graphs): logits and greedy tokens."""
    runner = compiled_runner(checkpoint(arch), freezing=arch == "llama")  # freezing is slow to compile: once
    assert runner.compiled.stats.graphs >= 1
    before = graphs_compiled()
    assert_close_to_eager(runner)  # batch 3 and 1..8 blocks of pages: inside the warmed-up buckets
    assert graphs_compiled() == before, "serving compiled a new graph"


def graphs_compiled() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def test_batch1_graph_reads_weights_as_sums(checkpoint):
    """(1,1) at batch 1 (its own graph, linears as streaming reductions: models.compiled.LinearsAsSums): close
    to eager, eager's tokens, and no GEMM kernel runs in its decode steps (the symbolic graph calls mm)."""
    runner = compiled_runner(checkpoint("llama"), freezing=False, buckets="1x8")
    assert_close_to_eager(runner, PROMPTS[2:])
    from torch.profiler import profile

    with profile() as prof:
        decode_logits(runner, PROMPTS[:1], 2)  # the eager prefill, then 2 decode steps through the graph
    gemms = sum(e.count for e in prof.key_averages() if e.key in ("aten::mm", "aten::addmm"))
    assert gemms == len(runner.model.layers) * 4 + 1, gemms  # the prefill's 4 per layer and the head


def test_batch1_reduction_reads_its_input_from_memory():
    """linear_as_sum writes x once and streams W against it: inductor left alone inlines what produces x (here a
    norm) into the reduction and recomputes it for every row of W, a fifth of the bench model's batch-1 step."""
    from stagemesh.models.compiled import linear_as_sum, register_realize_op
    from torch._inductor.utils import run_and_get_code

    register_realize_op()
    h, w = torch.randn(1, 96), torch.randn(40, 96)
    fn = torch.compile(lambda h, w: linear_as_sum(torch.rms_norm(h, (96,)) * h, w))
    out, (code,) = run_and_get_code(fn, h, w)
    torch.testing.assert_close(out, torch.nn.functional.linear(torch.rms_norm(h, (96,)) * h, w))
    assert "empty_strided_cpu((1, 96)" in code  # the normed x, realised (without the barrier: only (1, 1), (1, 40))


def test_batch1_graph_is_chosen_at_warm_up(checkpoint):
    """CompileOptions.batch1: "padded" sends batch 1 through the next bucket's graph (GEMMs, no graph of its
    own is used), "measure" times both and says which it kept (in the bucket description `coordctl status`
    shows); anything else is refused."""
    runner = compiled_runner(checkpoint("llama"), freezing=False, buckets="1,2x8")
    assert runner.compiled.stats.batch1 in ("sums", "padded")
    assert f"(batch 1: {runner.compiled.stats.batch1})" in runner.compiled.describe_buckets()
    runner.compiled.options = replace(runner.compiled.options, batch1="padded")
    runner.compiled.warm_up()  # chooses again: the graphs exist
    assert runner.compiled.pad_batch1 and runner.compiled.stats.batch1 == "padded"
    assert_close_to_eager(runner, PROMPTS[2:])
    from torch.profiler import profile

    with profile() as prof:
        decode_logits(runner, PROMPTS[:1], 2)
    gemms = sum(e.count for e in prof.key_averages() if e.key in ("aten::mm", "aten::addmm"))
    assert gemms == 3 * (len(runner.model.layers) * 4 + 1), gemms  # the prefill and each of 2 decode steps
    from stagemesh.errors import InvalidArgument

    with pytest.raises(InvalidArgument, match="compile batch1: one of measure, sums, padded"):
        CompileOptions(batch1="fastest")


def test_compiled_engine_generates_eager_tokens(checkpoint):
    """The reference engine with compile: batched greedy generation gives eager's tokens; prefill stays eager."""
    path = checkpoint("llama")
    requests = [GenerationRequest(tuple(p), 24, ignore_eos=True) for p in PROMPTS]
    eager = ReferenceEngine(path).generate(requests)
    options = replace(CompileOptions.parse(BUCKETS), freezing=False)
    engine = ReferenceEngine(path, compile=options, kv_blocks=32)
    compiled = engine.generate(requests)
    assert [r.token_ids for r in compiled] == [r.token_ids for r in eager]
    stats = engine._runner.compiled.stats
    assert stats.compiled_steps > 0 and stats.eager_steps > 0  # decode compiled, the prefill eager


@pytest.mark.parametrize("batch,buckets", [(3, "1,4x8"), (1, "1x8")])
def test_compiled_tp2_ranks_identical_and_close(checkpoint, tmp_path, monkeypatch, batch, buckets):
    """(2,1): each rank's compiled decode logits are bit-identical to the other's, and close to eager tp=1.
    Batch 3 runs the graph symbolic in batch (and the ranks time batch 1's two graphs at warm-up and must
    agree on one); batch 1 its own graph, whose linears are reductions. Each is one graph: the collectives
    are custom ops inside it (a graph break at each collective made 13 pieces here; on the bench model such
    a step ran slower than eager)."""
    path = checkpoint("llama")
    prompts = PROMPTS[:batch]
    monkeypatch.setenv(BUCKETS_ENV, buckets)
    out = tmp_path / "logits"
    run_ranks("tp_compiled_logits.py", 2, [path, str(out), *(",".join(map(str, p)) for p in prompts)], timeout=300)
    from safetensors.torch import load_file

    ranks = [load_file(f"{out}.{r}") for r in range(2)]
    assert torch.equal(ranks[0]["logits"], ranks[1]["logits"])
    graphs = len(buckets.split("x")[0].split(","))  # batch 1's own graph and the symbolic one
    assert [int(r["graphs"]) for r in ranks] == [graphs, graphs]
    assert bool(ranks[0]["padded"]) == bool(ranks[1]["padded"])
    model, _ = build_model(path, dtype=torch.float32)
    ref, ref_tokens = decode_logits(ModelRunner(model, 64, 16), prompts, 8, compiled=False)
    assert torch.equal(ranks[0]["tokens"], ref_tokens)
    worst = (ranks[0]["logits"] - ref).abs().amax(dim=(1, 2))
    assert (worst <= F32_TOL * ref.abs().amax(dim=(1, 2))).all(), worst


def test_compiled_bf16_close_to_transformers_bf16(checkpoint):
    """bf16: the compiled decode's logits against Hugging Face in bf16 on the same fed tokens.

    Tolerance: 0.1 absolute, the eager bf16 test's bound (test_engine_vs_hf): bf16 keeps 8 significant
    bits, so logits of magnitude ~4 round in steps of 0.016-0.03 and two implementations that round at
    different points differ by a few of those steps."""
    path = checkpoint("llama")
    runner = compiled_runner(path, torch.bfloat16, freezing=False)  # freezing is covered once, in fp32 (CI time)
    ours, fed = decode_logits(runner, PROMPTS, 8)
    hf = hf_model(path, torch.bfloat16)
    for b, prompt in enumerate(PROMPTS):
        ids = torch.tensor([prompt + fed[:, b].tolist()])
        with torch.no_grad():
            ref = hf(ids).logits[0, len(prompt) :].float()  # (steps, V): after each fed token
        assert (ours[:, b] - ref).abs().max().item() <= 0.1


def test_options_parse_and_refuse():
    assert CompileOptions.parse("1,2,4x2,8") == CompileOptions(batch_buckets=(1, 2, 4), block_buckets=(2, 8))
    assert CompileOptions.parse("4").block_buckets == ()
    from stagemesh.errors import InvalidArgument

    for bad in ("4,2", "x2", "a"):
        with pytest.raises(InvalidArgument):
            CompileOptions.parse(bad)


def test_mesh_pp2_compiled_tokens_and_status(checkpoint):
    """(1,2) through `stagemesh up --compile`: eager's greedy tokens, and `coordctl status` reports the graphs."""
    from stagemesh.coordinator.client import cluster_status
    from stagemesh.coordinator.status import status_dict
    from stagemesh.gateway.client import Client, GenerationParams
    from support import MeshProcess

    path = checkpoint("llama")
    requests = [GenerationRequest(tuple(p), 12, ignore_eos=True) for p in PROMPTS]
    eager = [r.token_ids for r in ReferenceEngine(path).generate(requests)]
    mesh = MeshProcess(path, "--pp", "2", "--dtype", "float32", "--compile", timeout=300)
    try:
        with Client(mesh.gateway, timeout=120) as client:
            for prompt, tokens in zip(PROMPTS, eager):
                assert client.generate(GenerationParams(prompt, max_tokens=12, ignore_eos=True)).token_ids == tokens
        import time

        time.sleep(1.5)  # a heartbeat carries the counts
        data = status_dict(cluster_status(mesh.coordinator))
        stages = [w for w in data["workers"] if w["kind"] == "stage"]
        assert len(stages) == 2
        for w in stages:
            assert w["compile"]["graphs"] >= 1 and w["compile"]["compiled_steps"] >= 11, w["compile"]
            assert w["compile"]["buckets"] == "batch 4 x blocks 8"
        from rich.console import Console
        from stagemesh.coordinator.status import render

        console = Console(record=True, width=300)
        render(data, console)
        table = console.export_text()
        assert "graphs," in table and "s warm-up" in table, table
    finally:
        assert mesh.stop() == 0
