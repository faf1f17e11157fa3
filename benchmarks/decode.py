"""Batch-1 decode in one process: the reference engine against Hugging Face `generate` on the same
checkpoint and threads, and against the memory-bandwidth roofline measured in the same run."""

from __future__ import annotations

import torch
from stagemesh.benchmarks.context import THREADS, BenchContext, make_prompt
from stagemesh.benchmarks.hf import hf_generate, load_hf
from stagemesh.benchmarks.profiles import torch_top_ops
from stagemesh.benchmarks.results import Row, Target
from stagemesh.benchmarks.roofline import decode_weight_bytes, gemv_floor, kernel_floors, read_bandwidth
from stagemesh.benchmarks.timing import alternate, decode_rate, median, timed


def engine(ctx: BenchContext):
    from stagemesh.models.engine import ReferenceEngine

    return ctx.model("engine", lambda: ReferenceEngine(ctx.llama, dtype=torch.float32))


def hf_llama(ctx: BenchContext):
    return ctx.model("hf", lambda: load_hf(ctx.llama))


def engine_generate(eng, prompts: list[list[int]], max_tokens: int) -> None:
    from stagemesh.models.requests import GenerationRequest

    eng.generate([GenerationRequest(tuple(p), max_tokens, ignore_eos=True) for p in prompts])


def engine_rate(eng, prompt: list[int], n: int) -> float:
    """Batch-1 decode tokens/s of the reference engine, prefill left out."""
    return decode_rate(
        1, n, timed(lambda: engine_generate(eng, [prompt], 1)), timed(lambda: engine_generate(eng, [prompt], n))
    )


def hf_rate(hf, prompt: list[int], n: int) -> float:
    return decode_rate(1, n, timed(lambda: hf_generate(hf, [prompt], 1)), timed(lambda: hf_generate(hf, [prompt], n)))


def run_decode(ctx: BenchContext) -> list[Row]:
    torch.set_num_threads(THREADS)
    s, eng, hf = ctx.suite, engine(ctx), hf_llama(ctx)
    prompt = make_prompt(s.prompt_tokens, 0, eng.config.vocab_size)
    n = s.decode_tokens
    engine_rate(eng, prompt, 2), hf_rate(hf, prompt, 2)  # warm-up: first calls allocate caches
    bandwidths = [read_bandwidth()]
    ctx.advance("decode: reference engine vs HF generate")
    hf_samples, eng_samples = alternate(s.reps, lambda: hf_rate(hf, prompt, n), lambda: engine_rate(eng, prompt, n))
    bandwidths.append(read_bandwidth())
    ours, base = median(eng_samples), median(hf_samples)
    speed = Row(
        "decode_vs_hf",
        f"batch-1 decode, reference engine, {THREADS} threads",
        "HF generate, same checkpoint and threads",
        ours,
        base,
        "tok/s",
        ours / base,
        Target("ratio>=", 1.1),
        note=f"decode only: (t({n}) - t(1)) / {n - 1}, {len(prompt)}-token prompt",
        detail={"engine": eng_samples, "hf": hf_samples},
    )
    roofline = roofline_row(eng, ours, max(bandwidths, key=lambda b: b["best"]))
    if speed.missed or roofline.missed:
        profile = gemv_line(eng, ours) + decode_profile(eng, hf, prompt, s.profile_steps)
        speed.profile = roofline.profile = profile
    return [speed, roofline]


def gemv_line(eng, tokens_per_s: float) -> list[str]:
    """The step against its GEMVs alone: what the matrix reads cost, and what everything else costs."""
    weight_bytes = decode_weight_bytes(eng.model, eng.config.tie_word_embeddings)
    floor = gemv_floor(eng.model, eng.config.tie_word_embeddings)
    step = 1 / tokens_per_s
    line = (
        f"decode step {step * 1e3:.1f} ms ({weight_bytes / step / 1e9:.1f} GB/s of weights); the same weight "
        f"matrices through eager F.linear back to back, nothing else: {floor * 1e3:.1f} ms "
        f"({weight_bytes / floor / 1e9:.1f} GB/s)"
    )
    if step >= floor:
        return [
            f"{line}; the other {(step - floor) * 1e3:.1f} ms are attention, norms, rotary, residuals, sampling "
            "and Python dispatch"
        ]
    return [f"{line}: the whole step reads its weights faster than eager F.linear's kernels alone"]


def kernel_line(eng, tokens_per_s: float) -> str:
    """The compiled batch-1 step against its weight reads alone, through its own kernel and through sum."""
    weight_bytes = decode_weight_bytes(eng.model, eng.config.tie_word_embeddings)
    floors, step = kernel_floors(eng.model, eng.config.tie_word_embeddings), 1 / tokens_per_s
    rate = lambda t: f"{t * 1e3:.1f} ms, {weight_bytes / t / 1e9:.1f} GB/s"  # noqa: E731
    line = (
        f"the same weight matrices back to back, nothing else: through the batch-1 graph's reduction kernel "
        f"(LinearsAsSums, compiled alone) {rate(floors['reduction'])}; through torch.sum {rate(floors['sum'])}"
    )
    if step < floors["reduction"]:
        return f"{line}; the whole step beat its reductions alone (noise: the step is little else)"
    return (
        f"{line}; the step's other {(step - floors['reduction']) * 1e3:.1f} ms are attention, norms, rotary, "
        "residuals, the graph call and sampling"
    )


def roofline_row(eng, tokens_per_s: float, bandwidth: dict) -> Row:
    weight_bytes = decode_weight_bytes(eng.model, eng.config.tie_word_embeddings)
    achieved = weight_bytes * tokens_per_s
    note = (
        f"{weight_bytes / 1e6:.0f} MB of weights read per token x {tokens_per_s:.1f} tok/s; read bandwidth "
        f"median of {_spread(bandwidth)} ({bandwidth['threads']} threads, {bandwidth['bytes'] / 2**20:.0f} MiB)"
    )
    return Row(
        "decode_roofline",
        "batch-1 decode, share of the memory-bandwidth roofline",
        f"best read bandwidth measured ({bandwidth['best_kind']})",
        achieved / 1e9,
        bandwidth["best"] / 1e9,
        "GB/s",
        achieved / bandwidth["best"],
        Target("ratio>=", 0.85),
        note=note,
        detail={"weight_bytes": weight_bytes, "bandwidth": bandwidth},
    )


def _spread(bandwidth: dict) -> str:
    """'gemv 30.1 GB/s (28.0-31.2), sum 33.0 GB/s (...)': both kernels, median and range."""
    parts = []
    for kind in ("gemv", "sum"):
        low, high = bandwidth.get("spread", {}).get(kind, (bandwidth[kind], bandwidth[kind]))
        parts.append(f"{kind} {bandwidth[kind] / 1e9:.1f} GB/s ({low / 1e9:.1f}-{high / 1e9:.1f})")
    return ", ".join(parts)


def decode_profile(eng, hf, prompt: list[int], steps: int) -> list[str]:
    """torch.profiler over `steps` decode tokens of each side (a 1-token generate, the prefill, taken off)."""
    ours = torch_top_ops(
        lambda: engine_generate(eng, [prompt], steps + 1),
        steps,
        "reference engine, decode steps",
        minus=lambda: engine_generate(eng, [prompt], 1),
    )
    theirs = torch_top_ops(
        lambda: hf_generate(hf, [prompt], steps + 1),
        steps,
        "HF generate, decode steps",
        minus=lambda: hf_generate(hf, [prompt], 1),
    )
    return ours + theirs
