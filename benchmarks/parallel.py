"""Tensor and pipeline parallelism against one worker, one thread per worker, on the same checkpoint:
decode latency at tp=2 vs tp=1, throughput under concurrent requests at pp=2 vs pp=1 with each stage's
busy fraction (issue 4), the throughput-vs-concurrency sweep, and the cost of one stage hop."""

from __future__ import annotations

import torch
from stagemesh.benchmarks.context import BenchContext, make_prompt
from stagemesh.benchmarks.hop import hop_overheads, hop_profile
from stagemesh.benchmarks.meshes import burst, measured_burst
from stagemesh.benchmarks.profiles import CpuMeter, busy_summary, decode_breakdown
from stagemesh.benchmarks.results import Row, Target
from stagemesh.benchmarks.serving import latency_series, mesh_rate
from stagemesh.benchmarks.timing import alternate, median, percentiles
from stagemesh.models.config import ModelConfig


def run_parallel(ctx: BenchContext) -> list[Row]:
    rows = []
    with ctx.mesh(ctx.layout(ctx.llama)) as single:
        with ctx.mesh(ctx.layout(ctx.llama, tp=2)) as tp2:
            rows.append(tp_row(ctx, single, tp2))
        with ctx.mesh(ctx.layout(ctx.llama, pp=2)) as pp2:
            rows.append(pp_row(ctx, single, pp2))
            rows.append(hop_row(ctx, pp2))
    return rows


def tp_row(ctx: BenchContext, single, tp2) -> Row:
    s, vocab = ctx.suite, ModelConfig.from_dir(ctx.llama).vocab_size
    prompt, n = make_prompt(s.prompt_tokens, 0, vocab), s.decode_tokens
    mesh_rate(single.gateway, [prompt], 2), mesh_rate(tp2.gateway, [prompt], 2)  # warm-up
    ctx.advance("tp=2 vs tp=1: batch-1 decode latency, 1 thread per rank")
    one, two = alternate(
        s.reps, lambda: 1e3 / mesh_rate(single.gateway, [prompt], n), lambda: 1e3 / mesh_rate(tp2.gateway, [prompt], n)
    )
    ours, base = median(two), median(one)
    ctx.add_series("scaling", "tp: batch-1 decode speed", [[1, 1.0], [2, base / ours]])
    row = Row(
        "tp_latency",
        "decode latency, tp=2, 1 thread per rank",
        "tp=1, 1 thread",
        ours,
        base,
        "ms/token",
        base / ours,
        Target("ratio>=", 1.6),
        note="ratio = tp=1 latency / tp=2 latency; batch 1, client-timed",
        detail={"tp1": one, "tp2": two},
    )
    if row.missed:
        row.profile = _compare_profiles({"tp=1": single, "tp=2": tp2}, prompt, n) + tp_collectives(ctx.llama)
    return row


def _compare_profiles(meshes: dict, prompt: list[int], n: int) -> list[str]:
    lines = []
    for label, mesh in meshes.items():
        lines += [f"{label}: {line}" for line in decode_breakdown(mesh, [prompt], n)[0]]
    return lines


def tp_collectives(model_dir: str) -> list[str]:
    """The collectives a tp=2 decode step waits on, priced by all-reduces measured on this host: the
    shared-memory path the stage uses, and gloo for comparison."""
    from stagemesh.benchmarks.collectives import allreduce_latency

    config = ModelConfig.from_dir(model_dir)
    m = allreduce_latency(config.hidden_size * 4)
    # o_proj and down_proj all-reduces per layer, the embedding's, the LM head's all-gather, the step broadcast
    count = 2 * config.num_hidden_layers + 1 + 1 + 1
    return [
        f"all-reduce of one token's activations ({config.hidden_size * 4} bytes) between two processes, 1 thread "
        f"each, alone / right after a GEMV: shared memory (what the stage uses) {m['shm_seconds'] * 1e6:.0f} / "
        f"{m['shm_between_gemvs'] * 1e6:.0f} us, gloo {m['seconds'] * 1e6:.0f} / {m['between_gemvs'] * 1e6:.0f} us; "
        f"a tp=2 decode step waits on ~{count} collectives (2 per layer, embedding, LM-head gather, the step "
        f"broadcast): ~{count * m['shm_seconds'] * 1e3:.1f}-{count * m['shm_between_gemvs'] * 1e3:.1f} ms per "
        "token through shared memory"
    ]


def pp_row(ctx: BenchContext, single, pp2) -> Row:
    s, vocab = ctx.suite, ModelConfig.from_dir(ctx.llama).vocab_size
    requests = lambda c: [(make_prompt(s.prompt_tokens, i, vocab), s.serve_tokens) for i in range(c)]  # noqa: E731
    burst(single.gateway, requests(2)), burst(pp2.gateway, requests(2))  # warm-up
    sweep = {"pp=1, 1 thread": [], "pp=2, 1 thread per stage": []}
    for c in s.concurrency[:-1]:
        ctx.advance(f"pp=2 vs pp=1: throughput at {c} concurrent")
        for label, mesh in zip(sweep, (single, pp2)):
            sweep[label].append([c, burst(mesh.gateway, requests(c)).throughput])
    top = s.concurrency[-1]
    ctx.advance(f"pp=2 vs pp=1: throughput at {top} concurrent, busy fractions")
    runs = {"pp1": [], "pp2": []}
    one, two = alternate(
        s.heavy_reps, lambda: _run(single, requests(top), runs["pp1"]), lambda: _run(pp2, requests(top), runs["pp2"])
    )
    for label, samples in zip(sweep, (one, two)):
        ctx.add_series("throughput", label, sweep[label] + [[top, median(samples)]])
    return _pp_result(ctx, top, one, two, runs)


def _run(mesh, requests, store: list) -> float:
    cpu = CpuMeter.for_mesh(mesh)
    result, delta = measured_burst(mesh, requests, meter=cpu)
    store.append((result, delta, cpu))
    return result.throughput


def _pp_result(ctx: BenchContext, top: int, one: list[float], two: list[float], runs: dict) -> Row:
    ours, base = median(two), median(one)
    ctx.add_series("scaling", f"pp: throughput at {top} concurrent", [[1, 1.0], [2, ours / base]])
    result, delta, cpu = runs["pp2"][-1]
    busy = {role: b / result.wall for role, (_, b) in delta.items()}
    latency_series(ctx, f"pp=1, {top} concurrent", runs["pp1"][-1][0].requests)
    latency_series(ctx, f"pp=2, {top} concurrent", result.requests)
    note = "busy " + ", ".join(f"{role.split(' rank')[0]} {f:.0%}" for role, f in sorted(busy.items()))
    row = Row(
        "pp_throughput",
        f"throughput at {top} concurrent requests, pp=2, 1 thread per worker",
        "pp=1, 1 thread",
        ours,
        base,
        "tok/s",
        ours / base,
        Target("ratio>=", 1.7),
        note=f"{note}; {ctx.suite.prompt_tokens}-token prompts, {ctx.suite.serve_tokens} tokens each",
        detail={"pp1": one, "pp2": two, "busy_fraction": busy},
    )
    if row.missed:
        for label, (res, d, meter) in (("pp=1", runs["pp1"][-1]), ("pp=2", runs["pp2"][-1])):
            row.profile += [f"{label}: {line}" for line in busy_summary(d, res.wall) + meter.summary()]
        row.profile.append(stage_balance(ctx.llama))
    return row


def stage_balance(model_dir: str) -> str:
    """How evenly pp=2 (`--layers balanced`) splits the weights each step streams (the embedding is only
    indexed)."""
    from stagemesh.models.plan import ParallelPlan

    config = ModelConfig.from_dir(model_dir)
    plan = ParallelPlan.build(config, 1, 2, layers="balanced")
    embed = config.vocab_size * config.hidden_size
    counts = [
        plan.stage_param_count(config, i, 0) - (embed if spec.has_embedding else 0)
        for i, spec in enumerate(plan.stages)
    ]
    parts = ", ".join(
        f"stage {i} ({plan.stages[i].describe()}{' + LM head' if plan.stages[i].has_head else ''}) {c / 1e6:.0f}M"
        for i, c in enumerate(counts)
    )
    return (
        f"weights streamed per step: {parts}; the larger stage bounds pp=2 at {sum(counts) / max(counts):.2f}x "
        "of pp=1 even with perfect overlap and no contention"
    )


def hop_row(ctx: BenchContext, pp2) -> Row:
    from stagemesh.coordinator.client import cluster_status
    from stagemesh.coordinator.wire import plan_from_message

    ctx.advance("one stage hop")
    topology = cluster_status(pp2.coordinator).topology
    plan = plan_from_message(topology.plan)
    hidden_size = plan.hidden_size
    seqs = max(1, ctx.suite.hop_bytes // (hidden_size * 4))
    hidden = torch.randn(seqs, hidden_size)
    args = (topology.stage_addresses[1], topology.pipeline_epoch, hidden, ctx.suite.hop_steps, plan.spec.block_size)
    hop_overheads(*args[:3], 2, args[4])  # warm-up: connects the channel
    samples = [x * 1e3 for x in hop_overheads(*args)]
    kb = hidden.numel() * 4 / 1024
    row = Row(
        "stage_hop",
        f"one stage hop, {kb:.0f} KB of activations ({seqs} x {hidden_size} float32)",
        "-",
        median(samples),
        None,
        "ms",
        None,
        Target("value<=", 0.5, "ms"),
        note=f"median added latency (round trip - stage compute) over {len(samples)} decode steps to the "
        f"last stage of pp=2; p90 {percentiles(samples)['p90']:.3f} ms",
        detail={"samples_ms": samples},
    )
    if row.missed:
        row.profile = hop_profile(hidden, topology.pipeline_epoch, row.value / 1e3, ctx.suite.hop_steps)
    return row
