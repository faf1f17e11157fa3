"""The compiled decode path (`--compile`, models/compiled.py) against Hugging Face and the roofline: batch 1
and 8 in float32 and bfloat16 in process, the mesh (1,1) with --compile against the in-process compiled
engine, and 64 mixed requests through it against HF static batches. Baselines run in the same process,
alternating with the candidate; the compiled graphs are captured once, before any timing."""

from __future__ import annotations

import contextlib
import os

import torch
from stagemesh.benchmarks.context import THREADS, BenchContext, make_prompt
from stagemesh.benchmarks.decode import engine_generate, gemv_line, kernel_line, roofline_row
from stagemesh.benchmarks.hf import hf_generate, load_hf
from stagemesh.benchmarks.profiles import torch_top_ops
from stagemesh.benchmarks.results import Row, Target
from stagemesh.benchmarks.roofline import read_bandwidth
from stagemesh.benchmarks.serving import mesh_rate, mixed_row
from stagemesh.benchmarks.timing import alternate, decode_rate, median, timed
from stagemesh.models.compiled import BUCKETS_ENV, FREEZING_ENV

BATCH = 8  # the continuous-batching regime where the kernel choice matters most (issue 14)


@contextlib.contextmanager
def compile_env(ctx: BenchContext, batches: str | None = None):
    """The suite's buckets and freezing for this process and the meshes it starts; `batches` ("1") replaces
    the batch buckets, keeping the suite's block buckets."""
    saved = {k: os.environ.get(k) for k in (BUCKETS_ENV, FREEZING_ENV)}
    spec = ctx.suite.compile_buckets
    if batches:
        blocks = spec.partition("x")[2]
        spec = f"{batches}x{blocks}" if blocks else batches
    if spec:
        os.environ[BUCKETS_ENV] = spec
    os.environ[FREEZING_ENV] = "1" if ctx.suite.compile_freezing else "0"
    try:
        yield
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def compiled_engine(ctx: BenchContext, dtype: torch.dtype):
    from stagemesh.models.compiled import CompileOptions
    from stagemesh.models.engine import ReferenceEngine

    def load():
        return ReferenceEngine(ctx.llama, dtype=dtype, compile=CompileOptions.from_env())

    return ctx.model(f"compiled-{dtype}", load)


def batch_rate(generate, prompts: list[list[int]], n: int) -> float:
    """Decode tokens/s of a batch, prefill left out: (t(n) - t(1)) over the n - 1 steps."""
    return decode_rate(len(prompts), n, timed(lambda: generate(prompts, 1)), timed(lambda: generate(prompts, n)))


def run_compiled(ctx: BenchContext) -> list[Row]:
    torch.set_num_threads(THREADS)
    with compile_env(ctx):
        rows = in_process_rows(ctx, torch.float32, "fp32", roofline=True)
        ctx.drop("hf")
        rows += in_process_rows(ctx, torch.bfloat16, "bf16", roofline=False)
        ctx.drop("hf-bf16", f"compiled-{torch.bfloat16}")
    return rows


def run_compiled_mesh(ctx: BenchContext) -> list[Row]:
    torch.set_num_threads(THREADS)
    with compile_env(ctx):
        rows = mesh_rows(ctx)
    ctx.drop(f"compiled-{torch.float32}", "hf")
    return rows


def in_process_rows(ctx: BenchContext, dtype: torch.dtype, name: str, roofline: bool) -> list[Row]:
    s = ctx.suite
    ctx.advance(f"compiled {name}: capturing the decode graphs")
    eng = compiled_engine(ctx, dtype)
    hf = ctx.model("hf" if dtype == torch.float32 else "hf-bf16", lambda: load_hf(ctx.llama, dtype))
    vocab, n = eng.config.vocab_size, s.decode_tokens
    prompts = [make_prompt(s.prompt_tokens, i, vocab) for i in range(BATCH)]
    ours = lambda ps, k: engine_generate(eng, ps, k)  # noqa: E731
    theirs = lambda ps, k: hf_generate(hf, ps, k)  # noqa: E731
    batch_rate(ours, prompts[:1], 2), batch_rate(theirs, prompts[:1], 2)  # warm-up
    rows, bandwidths = [], [read_bandwidth()] if roofline else []
    graphs = eng._runner.compiled.stats
    note_graphs = (
        f"{graphs.graphs} graph(s), warm-up {graphs.warmup_seconds:.0f} s ({eng._runner.compiled.describe_buckets()})"
    )
    targets = {1: 1.25, BATCH: 2.0}
    for b in (1, BATCH):
        ctx.advance(f"compiled {name}: batch-{b} decode vs HF generate")
        batch = prompts[:b]
        hf_s, eng_s = alternate(s.reps, lambda: batch_rate(theirs, batch, n), lambda: batch_rate(ours, batch, n))  # noqa: B023
        row = Row(
            f"compiled_{name}_b{b}",
            f"batch-{b} decode, compiled, {name}, {THREADS} threads",
            f"HF generate {name}, batch {b}, same checkpoint and threads",
            median(eng_s),
            median(hf_s),
            "tok/s",
            median(eng_s) / median(hf_s),
            Target("ratio>=", targets[b]),
            note=f"decode only: (t({n}) - t(1)) / {n - 1}; {note_graphs}",
            detail={"compiled": eng_s, "hf": hf_s},
        )
        if row.missed:
            row.profile = step_profile(eng, hf, prompts[:b], s.profile_steps, name)
        rows.append(row)
    if roofline:
        bandwidths.append(read_bandwidth())
        best = max(bandwidths, key=lambda bw: bw["best"])
        row = roofline_row(eng, rows[0].value, best)
        row.key, row.what = "compiled_roofline", "batch-1 decode, compiled, share of the memory-bandwidth roofline"
        if row.missed:
            lines = gemv_line(eng, rows[0].value)
            if 1 in eng._runner.compiled.batch_buckets:  # batch 1 has its own graph (LinearsAsSums)
                lines.append(kernel_line(eng, rows[0].value))
            row.profile = lines + step_profile(eng, hf, prompts[:1], s.profile_steps, name)
        rows.insert(1, row)
    return rows


def step_profile(eng, hf, prompts: list[list[int]], steps: int, name: str) -> list[str]:
    """Per decode step (the prefill profiled alone and taken off), like the rates the rows compare."""
    ours = torch_top_ops(
        lambda: engine_generate(eng, prompts, steps + 1),
        steps,
        f"compiled engine {name}, decode steps",
        minus=lambda: engine_generate(eng, prompts, 1),
    )
    theirs = torch_top_ops(
        lambda: hf_generate(hf, prompts, steps + 1),
        steps,
        f"HF generate {name}, decode steps",
        minus=lambda: hf_generate(hf, prompts, 1),
    )
    return ours + theirs


def mesh_rows(ctx: BenchContext) -> list[Row]:
    """The mesh (1,1) with --compile: batch-1 decode against the in-process compiled engine, and the mixed
    requests against HF static batches (float32)."""
    s = ctx.suite
    eng = compiled_engine(ctx, torch.float32)
    hf = ctx.model("hf", lambda: load_hf(ctx.llama))
    prompt, n = make_prompt(s.prompt_tokens, 0, eng.config.vocab_size), s.decode_tokens
    ctx.advance("compiled mesh (1,1): starting (the stage captures its graphs)")
    layout = ctx.layout(ctx.llama, threads=THREADS)
    from dataclasses import replace

    with ctx.mesh(replace(layout, compile=True)) as mesh:
        mesh_rate(mesh.gateway, [prompt], 2)  # warm-up
        ctx.advance("compiled mesh (1,1): batch-1 decode vs in-process compiled engine")
        in_process = lambda: batch_rate(lambda ps, k: engine_generate(eng, ps, k), [prompt], n)  # noqa: E731
        eng_s, mesh_s = alternate(s.reps, in_process, lambda: mesh_rate(mesh.gateway, [prompt], n))
        decode = Row(
            "compiled_mesh_decode",
            f"batch-1 decode through the mesh (1,1), compiled, {THREADS} threads",
            "in-process compiled engine",
            median(mesh_s),
            median(eng_s),
            "tok/s",
            median(mesh_s) / median(eng_s),
            Target("ratio>=", 0.95),
            note=f"client-timed, (t({n}) - t(1)) / {n - 1}",
            detail={"mesh": mesh_s, "engine": eng_s},
        )
        mixed = mixed_row(ctx, mesh, hf, label="mesh (1,1) compiled", target=4.0)  # its miss profiled at 4x
        mixed.key = "compiled_mixed_throughput"
        mixed.note += "; " + compile_counts(mesh)
    return [decode, mixed]


def compile_counts(mesh) -> str:
    """The stage's own count of compiled and eager steps, from `coordctl status`."""
    from stagemesh.coordinator.client import cluster_status
    from stagemesh.coordinator.status import status_dict

    for w in status_dict(cluster_status(mesh.coordinator))["workers"]:
        if w["kind"] == "stage" and w["compile"]:
            c = w["compile"]
            return (
                f"stage: {c['compiled_steps']} compiled / {c['eager_steps']} eager steps so far, {c['graphs']} graph(s)"
            )
    return "stage reported no compile stats"
