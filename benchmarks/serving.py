"""The one-stage mesh (tp=1, pp=1, 2 threads) as users meet it, through the gateway: batch-1 decode against
the in-process reference engine, time to first token of a long prompt and throughput on requests of mixed
lengths against Hugging Face, all with the baseline in the same run."""

from __future__ import annotations

import random

import torch
from stagemesh.benchmarks.context import THREADS, BenchContext, make_prompt
from stagemesh.benchmarks.decode import engine, engine_generate, engine_rate, hf_llama
from stagemesh.benchmarks.hf import hf_generate, hf_static_batches
from stagemesh.benchmarks.meshes import burst
from stagemesh.benchmarks.profiles import decode_breakdown, mesh_run_profile, torch_top_ops
from stagemesh.benchmarks.results import Row, Target
from stagemesh.benchmarks.timing import alternate, decode_rate, median, percentiles, timed


def mesh_rate(address: str, prompts: list[list[int]], n: int) -> float:
    """Decode tokens/s of a batch through the mesh, prefill left out, timed by the client."""
    t1 = burst(address, [(p, 1) for p in prompts]).wall
    tn = burst(address, [(p, n) for p in prompts]).wall
    return decode_rate(len(prompts), n, t1, tn)


def run_serving(ctx: BenchContext) -> list[Row]:
    torch.set_num_threads(THREADS)
    eng, hf = engine(ctx), hf_llama(ctx)
    with ctx.mesh(ctx.layout(ctx.llama, threads=THREADS)) as mesh:
        rows = [mesh_decode_row(ctx, mesh, eng)]
        rows.append(ttft_row(ctx, mesh, eng, hf))
        rows.append(mixed_row(ctx, mesh, hf))
    ctx.drop("hf")
    return rows


def mesh_decode_row(ctx: BenchContext, mesh, eng) -> Row:
    s = ctx.suite
    prompt, n = make_prompt(s.prompt_tokens, 0, eng.config.vocab_size), s.decode_tokens
    mesh_rate(mesh.gateway, [prompt], 2)  # warm-up
    ctx.advance("mesh (1,1): batch-1 decode vs in-process engine")
    eng_s, mesh_s = alternate(s.reps, lambda: engine_rate(eng, prompt, n), lambda: mesh_rate(mesh.gateway, [prompt], n))
    ours, base = median(mesh_s), median(eng_s)
    row = Row(
        "mesh_decode",
        f"batch-1 decode through the mesh (1,1), {THREADS} threads",
        "in-process reference engine",
        ours,
        base,
        "tok/s",
        ours / base,
        Target("ratio>=", 0.95),
        note=f"client-timed, (t({n}) - t(1)) / {n - 1}",
        detail={"mesh": mesh_s, "engine": eng_s},
    )
    if row.missed:
        lines, stage_ms = decode_breakdown(mesh, [prompt], n)
        row.profile = [
            f"in-process engine {1e3 / base:.1f} ms per token; the stage's compute per decode step is "
            f"{stage_ms - 1e3 / base:+.1f} ms beside it",
            *lines,
        ]
    return row


def ttft_row(ctx: BenchContext, mesh, eng, hf) -> Row:
    s = ctx.suite
    prompt = make_prompt(s.ttft_prompt, 1, eng.config.vocab_size)
    ctx.advance(f"mesh (1,1): time to first token, {len(prompt)}-token prompt vs HF")
    mesh_ttft = lambda: burst(mesh.gateway, [(prompt, 1)]).requests[0].ttft  # noqa: E731
    hf_ttft = lambda: timed(lambda: hf_generate(hf, [prompt], 1))  # noqa: E731
    mesh_ttft(), hf_ttft(), engine_generate(eng, [prompt], 1)  # warm-up (the engine sizes its KV pool)
    eng_ttft = lambda: timed(lambda: engine_generate(eng, [prompt], 1))  # noqa: E731
    hf_s, mesh_s, eng_s = alternate(s.reps, hf_ttft, mesh_ttft, eng_ttft)
    ours, base = median(mesh_s) * 1e3, median(hf_s) * 1e3
    row = Row(
        "ttft",
        f"time to first token, {len(prompt)}-token prompt, mesh (1,1), {THREADS} threads",
        "HF generate (1 token), same threads",
        ours,
        base,
        "ms",
        ours / base,
        Target("ratio<=", 1.0),
        note=f"client-timed; in-process engine {median(eng_s) * 1e3:.0f} ms",
        detail={"mesh": mesh_s, "hf": hf_s, "engine": eng_s},
    )
    if row.missed:
        row.profile = [
            ttft_split(mesh, prompt, median(eng_s)),
            *torch_top_ops(lambda: engine_generate(eng, [prompt], 1), 1, "reference engine prefill"),
            *torch_top_ops(lambda: hf_generate(hf, [prompt], 1), 1, "HF prefill"),
        ]
    return row


def ttft_split(mesh, prompt: list[int], engine_seconds: float) -> str:
    """One more first token through the mesh: the stage's prefill compute against the client's wait."""
    from stagemesh.benchmarks.meshes import measured_burst

    result, delta = measured_burst(mesh, [(prompt, 1)])
    busy = delta.get("stage 0 rank 0", (0, 0.0))[1]
    ttft = result.requests[0].ttft
    return (
        f"mesh: {ttft * 1e3:.0f} ms to the first token at the client, of which the stage computed "
        f"{busy * 1e3:.0f} ms (the in-process engine's whole prefill: {engine_seconds * 1e3:.0f} ms); "
        f"{(ttft - busy) * 1e3:.0f} ms in the gateway, gRPC and hand-offs"
    )


def mixed_requests(ctx: BenchContext, vocab: int) -> list[tuple[list[int], int]]:
    s, rng = ctx.suite, random.Random(0)
    return [
        (make_prompt(rng.randint(*s.mixed_prompt), 100 + i, vocab), rng.randint(*s.mixed_output))
        for i in range(s.mixed_requests)
    ]


def mixed_row(ctx: BenchContext, mesh, hf, label: str = "mesh (1,1)", target: float = 2.0) -> Row:
    s = ctx.suite
    requests = mixed_requests(ctx, hf.config.vocab_size)
    tokens = sum(n for _, n in requests)
    ctx.advance(f"mesh (1,1): {len(requests)} mixed requests vs HF static batches of {s.static_batch}")
    runs: dict[str, list] = {"hf": [], "mesh": []}
    hf_run = lambda: _keep(runs["hf"], hf_static_batches(hf, requests, s.static_batch))  # noqa: E731
    mesh_run = lambda: _keep(runs["mesh"], burst(mesh.gateway, requests).requests)  # noqa: E731
    hf_s, mesh_s = alternate(s.heavy_reps, lambda: tokens / timed(hf_run), lambda: tokens / timed(mesh_run))
    ours, base = median(mesh_s), median(hf_s)
    latency_series(ctx, f"{label}, {len(requests)} mixed requests", runs["mesh"][-1])
    latency_series(ctx, f"HF static batches of {s.static_batch}", runs["hf"][-1])
    what = f"throughput, {len(requests)} requests of mixed lengths, {label}, {THREADS} threads"
    row = Row(
        "mixed_throughput",
        what,
        f"HF generate in static batches of {s.static_batch}, same requests",
        ours,
        base,
        "tok/s",
        ours / base,
        Target("ratio>=", target),
        note=f"prompts {s.mixed_prompt[0]}-{s.mixed_prompt[1]}, outputs "
        f"{s.mixed_output[0]}-{s.mixed_output[1]} tokens, all sent at once; generated tokens / wall time",
        detail={"mesh": mesh_s, "hf": hf_s, "tokens": tokens},
    )
    if row.missed:
        share = prefill_share(mesh, hf, requests, s.static_batch, tokens / ours, tokens / base)
        row.profile = mesh_run_profile(mesh, requests)[0] + [share]
    return row


def prefill_share(mesh, hf, requests, static_batch: int, mesh_all: float, hf_all: float) -> str:
    """How much of a mixed run (`mesh_all`, `hf_all`: the row's median seconds) is its prompts: the same
    requests cut to 1 token each (prefill and the first token), on both sides."""
    firsts = [(p, 1) for p, _ in requests]
    mesh_first = timed(lambda: burst(mesh.gateway, firsts))
    hf_first = timed(lambda: hf_static_batches(hf, firsts, static_batch))
    return (
        f"the prompts alone (every request cut to 1 token): mesh {mesh_first:.1f} s of its {mesh_all:.1f} s run "
        f"({mesh_first / mesh_all:.0%}), HF static batches {hf_first:.1f} s of {hf_all:.1f} s "
        f"({hf_first / hf_all:.0%}); the rest is decode: mesh {mesh_all - mesh_first:.1f} s, HF {hf_all - hf_first:.1f} s"
    )


def _keep(store: list, timings) -> None:
    store.append(timings)


def latency_series(ctx: BenchContext, label: str, timings) -> None:
    ctx.add_series(
        "latency",
        label,
        {
            "ttft": percentiles([t.ttft for t in timings]),
            "e2e": percentiles([t.e2e for t in timings]),
            "itl": percentiles([g for t in timings for g in t.gaps]),
        },
    )
