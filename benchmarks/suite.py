"""The sizes of a benchmark run: which checkpoints, how many tokens, requests and repetitions. `quick` is
the published one (about 20 minutes on 2 cores), `full` measures longer and sweeps wider, `smoke` runs
every case on tiny checkpoints in seconds so CI keeps the harness working."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Suite:
    name: str
    llama_preset: str  # generated when --model is not given
    mixtral_preset: str  # generated when --mixtral is not given
    experts_preset: str  # the Mixtral of the large-expert row, generated into ./checkpoints/
    reps: int  # baseline and candidate alternate this many times; the median is reported
    heavy_reps: int  # the same for the long serving runs
    prompt_tokens: int  # prompt of the decode measurements
    decode_tokens: int  # N in the decode rate (t(N) - t(1)) / (N - 1)
    serve_tokens: int  # tokens per request in the concurrency runs
    concurrency: tuple[int, ...]  # throughput sweep (pp=1 and pp=2); the pp rows: the last and half of it
    mixed_requests: int  # requests of mixed lengths against HF static batches
    mixed_prompt: tuple[int, int]  # prompt length range of those requests
    mixed_output: tuple[int, int]  # max_tokens range of those requests
    static_batch: int  # HF's static batch size
    ttft_prompt: int  # prompt of the time-to-first-token row
    moe_batch: int  # Mixtral decode batch
    expert_batch: int  # tokens per expert FFN call (issue 5)
    expert_rounds: int  # passes over all MoE layers per expert FFN measurement
    hop_steps: int  # decode steps sent through one stage hop
    hop_bytes: int  # activations per hop step: hop_bytes / (hidden x itemsize) decode sequences
    profile_steps: int  # decode steps under torch.profiler when a row misses
    compile_buckets: str = ""  # STAGEMESH_COMPILE_BUCKETS of the compiled rows; "" = CompileOptions' defaults
    compile_freezing: bool = True  # inductor freezing (prepacked oneDNN weights): slow to compile, fast to run
    probe_seconds: float = 2.0  # each run of a miss profile's timed probe (benchmarks/contention.py)


SUITES = {
    "quick": Suite(
        "quick",
        "bench",
        "small",
        "experts",
        reps=5,
        heavy_reps=2,
        prompt_tokens=32,
        decode_tokens=32,
        serve_tokens=32,
        concurrency=(1, 8, 32, 64),
        mixed_requests=64,
        mixed_prompt=(8, 64),
        mixed_output=(4, 40),
        static_batch=8,
        ttft_prompt=512,
        moe_batch=8,
        expert_batch=32,
        expert_rounds=40,
        hop_steps=60,
        hop_bytes=32 * 1024,
        profile_steps=8,
    ),
    "full": Suite(
        "full",
        "bench",
        "small",
        "experts",
        reps=5,
        heavy_reps=3,
        prompt_tokens=32,
        decode_tokens=64,
        serve_tokens=64,
        concurrency=(1, 4, 8, 16, 32, 64),
        mixed_requests=64,
        mixed_prompt=(8, 128),
        mixed_output=(8, 64),
        static_batch=8,
        ttft_prompt=512,
        moe_batch=8,
        expert_batch=32,
        expert_rounds=100,
        hop_steps=200,
        hop_bytes=32 * 1024,
        profile_steps=16,
    ),
    "smoke": Suite(
        "smoke",
        "tiny",
        "tiny",
        "tiny",
        reps=1,
        heavy_reps=1,
        prompt_tokens=4,
        decode_tokens=3,
        serve_tokens=2,
        concurrency=(1, 4),
        mixed_requests=4,
        mixed_prompt=(2, 8),
        mixed_output=(1, 3),
        static_batch=2,
        ttft_prompt=16,
        moe_batch=2,
        expert_batch=4,
        expert_rounds=2,
        hop_steps=3,
        hop_bytes=32 * 1024,
        profile_steps=1,
        compile_buckets="2x2",
        compile_freezing=False,
        probe_seconds=0.2,
    ),
}
