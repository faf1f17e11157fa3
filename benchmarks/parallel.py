"""Tensor and pipeline parallelism against one worker, one thread per worker, on the same checkpoint:
decode latency at tp=2 vs tp=1, throughput under concurrent requests at pp=2 vs pp=1 at the suite's top
concurrency and at half of it, with each stage's busy fraction (issues 4 and 14), the
throughput-vs-concurrency sweep; and (a family of its own) the cost of one stage hop."""

from __future__ import annotations

from dataclasses import replace

import torch
from stagemesh.benchmarks.context import BenchContext, make_prompt
from stagemesh.benchmarks.hop import hop_overheads, hop_profile, hop_timings
from stagemesh.benchmarks.meshes import burst, measured_burst
from stagemesh.benchmarks.profiles import CpuMeter, busy_summary, decode_breakdown
from stagemesh.benchmarks.results import Row, Target
from stagemesh.benchmarks.serving import latency_series, mesh_rate
from stagemesh.benchmarks.timing import alternate, median, percentiles
from stagemesh.models.config import ModelConfig

# The pp rows: (key, concurrency as a share of the suite's top one, target pp=2 / pp=1 throughput)
PP_ROWS = (("pp_throughput", 1.0, 1.7), ("pp_throughput_half", 0.5, 1.4))


def pp_concurrencies(s) -> list[int]:
    return [max(1, int(s.concurrency[-1] * share)) for _, share, _ in PP_ROWS]


def sweep_points(s) -> list[int]:
    """The sweep's concurrencies measured once each (the pp rows' are measured with alternation)."""
    return [c for c in s.concurrency if c not in pp_concurrencies(s)]


def run_parallel(ctx: BenchContext) -> list[Row]:
    rows = []
    with ctx.mesh(ctx.layout(ctx.llama)) as single:
        with ctx.mesh(ctx.layout(ctx.llama, tp=2)) as tp2:
            rows.append(tp_row(ctx, single, tp2))
        with ctx.mesh(ctx.layout(ctx.llama, pp=2)) as pp2:
            rows += pp_rows(ctx, single, pp2)
    return rows + [tp_compiled_row(ctx)]


def tp_compiled_row(ctx: BenchContext) -> Row:
    """The tp row with both meshes --compile (batch-1 graphs only: a short warm-up); informational."""
    from stagemesh.benchmarks.compiled import compile_env

    ctx.advance("tp=2 vs tp=1, both compiled: starting (the stages capture their graphs)")
    with compile_env(ctx, batches="1"):
        with ctx.mesh(replace(ctx.layout(ctx.llama), compile=True)) as single:
            with ctx.mesh(replace(ctx.layout(ctx.llama, tp=2), compile=True)) as tp2:
                return tp_row(ctx, single, tp2, compiled=True)


def run_hop(ctx: BenchContext) -> list[Row]:
    with ctx.mesh(ctx.layout(ctx.llama, pp=2)) as pp2:
        return [hop_row(ctx, pp2)]


def tp_row(ctx: BenchContext, single, tp2, compiled: bool = False) -> Row:
    s, vocab = ctx.suite, ModelConfig.from_dir(ctx.llama).vocab_size
    prompt, n = make_prompt(s.prompt_tokens, 0, vocab), s.decode_tokens
    mesh_rate(single.gateway, [prompt], 2), mesh_rate(tp2.gateway, [prompt], 2)  # warm-up
    mode = ", compiled" if compiled else ""
    ctx.advance(f"tp=2 vs tp=1{mode}: batch-1 decode latency, 1 thread per rank")
    one, two = alternate(
        s.reps, lambda: 1e3 / mesh_rate(single.gateway, [prompt], n), lambda: 1e3 / mesh_rate(tp2.gateway, [prompt], n)
    )
    ours, base = median(two), median(one)
    ctx.add_series("scaling", f"tp: batch-1 decode speed{mode}", [[1, 1.0], [2, base / ours]])
    row = Row(
        "tp_latency_compiled" if compiled else "tp_latency",
        f"decode latency, tp=2, 1 thread per rank{mode}",
        f"tp=1, 1 thread{mode}",
        ours,
        base,
        "ms/token",
        base / ours,
        None if compiled else Target("ratio>=", 1.6),  # the target is the eager row's; this one informs
        note="ratio = tp=1 latency / tp=2 latency; batch 1, client-timed",
        detail={"tp1": one, "tp2": two},
    )
    if row.missed:
        row.profile = _compare_profiles({"tp=1": single, "tp=2": tp2}, prompt, n) + tp_collectives(ctx.llama)
        row.profile.append(tp_contention(ctx.llama, ctx.suite.probe_seconds))
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


def tp_contention(model_dir: str, seconds: float) -> str:
    from stagemesh.benchmarks.contention import core_contention

    c = ModelConfig.from_dir(model_dir)
    return core_contention(c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.vocab_size, seconds)


def pp_rows(ctx: BenchContext, single, pp2) -> list[Row]:
    s, vocab = ctx.suite, ModelConfig.from_dir(ctx.llama).vocab_size
    requests = lambda c: [(make_prompt(s.prompt_tokens, i, vocab), s.serve_tokens) for i in range(c)]  # noqa: E731
    burst(single.gateway, requests(2)), burst(pp2.gateway, requests(2))  # warm-up
    sweep = {"pp=1, 1 thread": [], "pp=2, 1 thread per stage": []}
    for c in sweep_points(s):
        ctx.advance(f"pp=2 vs pp=1: throughput at {c} concurrent")
        for label, mesh in zip(sweep, (single, pp2)):
            sweep[label].append([c, burst(mesh.gateway, requests(c)).throughput])
    rows = []
    for (key, _, target), c in zip(PP_ROWS, pp_concurrencies(s)):
        ctx.advance(f"pp=2 vs pp=1: throughput at {c} concurrent, busy fractions")
        runs = {"pp1": [], "pp2": []}
        one, two = alternate(
            s.heavy_reps,
            lambda c=c, runs=runs: _run(single, requests(c), runs["pp1"]),
            lambda c=c, runs=runs: _run(pp2, requests(c), runs["pp2"]),
        )
        for label, samples in zip(sweep, (one, two)):
            sweep[label].append([c, median(samples)])
        rows.append(_pp_result(ctx, key, c, target, one, two, runs))
    for label, points in sweep.items():
        ctx.add_series("throughput", label, sorted(points))
    top = pp_concurrencies(s)[0]
    ctx.add_series("scaling", f"pp: throughput at {top} concurrent", [[1, 1.0], [2, rows[0].ratio]])
    return rows


def _run(mesh, requests, store: list) -> float:
    cpu = CpuMeter.for_mesh(mesh)
    result, delta = measured_burst(mesh, requests, meter=cpu)
    store.append((result, delta, cpu))
    return result.throughput


def _pp_result(
    ctx: BenchContext, key: str, top: int, target: float, one: list[float], two: list[float], runs: dict
) -> Row:
    ours, base = median(two), median(one)
    result, delta, cpu = runs["pp2"][-1]
    busy = {role: b / result.wall for role, (_, b) in delta.items()}
    base_result, base_delta, _ = runs["pp1"][-1]
    base_busy = {role: b / base_result.wall for role, (_, b) in base_delta.items()}
    latency_series(ctx, f"pp=1, {top} concurrent", base_result.requests)
    latency_series(ctx, f"pp=2, {top} concurrent", result.requests)
    note = "pp=2 busy " + ", ".join(f"{role.split(' rank')[0]} {f:.0%}" for role, f in sorted(busy.items()))
    note += ", pp=1 busy " + ", ".join(f"{f:.0%}" for _, f in sorted(base_busy.items()))
    row = Row(
        key,
        f"throughput at {top} concurrent requests, pp=2, 1 thread per worker",
        "pp=1, 1 thread",
        ours,
        base,
        "tok/s",
        ours / base,
        Target("ratio>=", target),
        note=f"{note} (compute seconds / wall); {ctx.suite.prompt_tokens}-token prompts, "
        f"{ctx.suite.serve_tokens} tokens each",
        detail={"pp1": one, "pp2": two, "busy_fraction": busy, "pp1_busy_fraction": base_busy},
    )
    if row.missed:
        for label, (res, d, meter) in (("pp=1", runs["pp1"][-1]), ("pp=2", runs["pp2"][-1])):
            row.profile += [f"{label}: {line}" for line in busy_summary(d, res.wall) + meter.summary()]
        row.profile += [step_bound(base_delta, delta), stage_balance(ctx.llama)]
    return row


def step_bound(pp1: dict[str, tuple[int, float]], pp2: dict[str, tuple[int, float]]) -> str:
    """What the stages' own step times allow: with pp micro-batches in flight each stage computes every one of
    them per round, so perfect overlap gives pp=2 at most T(pp=1 step) / (2 x the slower stage's step); and
    how much more work a round is than pp=1's step (contention for the cores and the memory bus)."""
    per = lambda d, role: d[role][1] / max(1, d[role][0])  # noqa: E731
    one = per(pp1, "stage 0 rank 0")
    stages = sorted(r for r in pp2 if r.startswith("stage"))
    steps = [per(pp2, r) for r in stages]
    if not one or not steps or not all(steps):
        return "no stage steps recorded"
    parts = " + ".join(f"{t * 1e3:.0f}" for t in steps)
    return (
        f"per step: pp=1 {one * 1e3:.0f} ms for the whole batch; pp=2 {parts} ms per micro-batch (half the "
        f"batch, half the layers each); perfect overlap bounds pp=2 at {one / (2 * max(steps)):.2f}x of pp=1, "
        f"and a round of pp=2 is {2 * sum(steps) / one:.2f}x pp=1's work (1.00x = no contention)"
    )


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
    timings = hop_timings(*args)
    samples = [overhead * 1e3 for overhead, _ in timings]
    busy = [b * 1e3 for _, b in timings]
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
        f"last stage of pp=2; p90 {percentiles(samples)['p90']:.3f} ms; the stage computed "
        f"{median(busy):.1f} ms per step",
        detail={"samples_ms": samples, "busy_ms": busy},
    )
    if row.missed:
        row.profile = hop_profile(
            hidden, topology.pipeline_epoch, row.value / 1e3, ctx.suite.hop_steps, median(busy) / 1e3
        )
    return row
