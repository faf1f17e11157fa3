"""The GPU check (issue 8), run by `benchmarks/gpu_check.sh` on one H100/H200 with nothing beyond PyTorch
and transformers: a random-weight Llama-3-8B-shaped bf16 checkpoint; decode tokens/s at batch 1 and 32 of
a stage worker's compute path (ModelRunner through the reference engine, no gRPC) against HF eager
`generate` in the same run; the share of the HBM roofline (device copy bandwidth measured in the same
run); and pp=2 as two processes on the one GPU (activations and tokens over torch.distributed gloo) against
pp=1. It imports no grpc: the mesh's services are not what it measures. `--shape tiny --device cpu` runs
the same flow in seconds (the test suite does, so the script cannot rot unseen)."""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from stagemesh.benchmarks.timing import decode_rate, median

SHAPES = {
    "llama3-8b": dict(
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=14336,
        vocab_size=128256,
        max_position_embeddings=131072,
    ),
    "tiny": dict(
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=512,
        max_position_embeddings=512,
    ),
}
BATCHES = (1, 32)
SHARD_BYTES = 4 << 30


def llama_config(shape: str) -> dict:
    original = min(8192, SHAPES[shape]["max_position_embeddings"] // 8)  # Llama 3.1's RoPE scaling, as HF wants it
    return {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        **SHAPES[shape],
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "bfloat16",
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": original,
        },
    }


def write_checkpoint(out: Path, shape: str, device: str) -> Path:
    """Random bf16 weights made on `device` (fast), written as safetensors shards with an index."""
    from safetensors.torch import save_file
    from stagemesh.models.config import ModelConfig, hf_shape
    from stagemesh.models.make_checkpoint import checkpoint_tensor_names

    raw = llama_config(shape)
    config = ModelConfig.from_hf_dict(raw)
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator(device=device).manual_seed(0)
    shard, weight_map, files = {}, {}, 0
    for name in checkpoint_tensor_names(config):
        dims = hf_shape(config, name)
        t = torch.randn(dims, generator=gen, device=device, dtype=torch.bfloat16)
        shard[name] = (1 + 0.1 * t if len(dims) == 1 else t / math.sqrt(dims[1])).cpu()
        if sum(x.numel() * 2 for x in shard.values()) >= SHARD_BYTES:
            files = _save_shard(out, shard, weight_map, files, save_file)
    _save_shard(out, shard, weight_map, files, save_file)
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (out / "config.json").write_text(json.dumps(raw, indent=2))
    return out


def _save_shard(out: Path, shard: dict, weight_map: dict, files: int, save_file) -> int:
    if shard:
        name = f"model-{files + 1:05d}.safetensors"
        save_file(shard, str(out / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
        shard.clear()
    return files + 1


def copy_bandwidth(device: str, gib: float = 2.0, reps: int = 10) -> float:
    """Device memory bandwidth of a large copy, counting the bytes read and written (best of `reps`)."""
    src = torch.empty(int(gib * 2**30) // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(reps):
        _sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() * src.element_size() / best


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def prompts(batch: int, length: int, vocab: int) -> list[list[int]]:
    return [[3 + (b * 7919 + i * 131) % (vocab - 3) for i in range(length)] for b in range(batch)]


def engine_rates(
    path: Path, device: str, n: int, prompt_len: int, reps: int, compiled: bool = False
) -> tuple[dict, object]:
    """Decode tokens/s of the reference engine (a stage worker's ModelRunner) at each batch size; with
    `compiled`, through the graphs of --compile (CUDA graphs on a GPU), captured for exactly these shapes."""
    from stagemesh.models.compiled import CompileOptions
    from stagemesh.models.engine import ReferenceEngine
    from stagemesh.models.requests import GenerationRequest

    options, kv_blocks = None, 256
    if compiled:
        blocks = -(-(prompt_len + n) // 16)
        options = replace(CompileOptions.from_env(), batch_buckets=BATCHES, block_buckets=(blocks,))
        kv_blocks = BATCHES[-1] * blocks
    engine = ReferenceEngine(path, dtype=torch.bfloat16, device=device, compile=options, kv_blocks=kv_blocks)
    vocab = engine.config.vocab_size

    def run(batch: int, tokens: int) -> float:
        requests = [GenerationRequest(tuple(p), tokens, ignore_eos=True) for p in prompts(batch, prompt_len, vocab)]
        return _timed(lambda: engine.generate(requests), device)

    return _rates(run, n, reps), engine


def hf_rates(path: Path, device: str, n: int, prompt_len: int, reps: int) -> dict:
    """The same for Hugging Face eager `generate` (attn_implementation="eager")."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, attn_implementation="eager")
    model = model.to(device).eval()
    vocab = model.config.vocab_size

    @torch.inference_mode()
    def run(batch: int, tokens: int) -> float:
        ids = torch.tensor(prompts(batch, prompt_len, vocab), device=device)
        return _timed(
            lambda: model.generate(
                ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, eos_token_id=None, pad_token_id=0
            ),
            device,
        )

    return _rates(run, n, reps)  # the model goes with `run`


def _rates(run, n: int, reps: int) -> dict:
    run(1, 2)  # warm-up
    return {b: median([decode_rate(b, n, run(b, 1), run(b, n)) for _ in range(reps)]) for b in BATCHES}


def _timed(fn, device: str) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def pipeline_rates(path: Path, device: str, batch: int, prompt_len: int, n: int, reps: int) -> dict:
    """pp=1 (one process) then pp=2 (two processes on the same device), each a fresh set of processes."""
    results = {}
    for world in (1, 2):
        port = _free_port()
        args = [str(world), str(port), device, str(batch), str(prompt_len), str(n), str(reps)]
        module = [sys.executable, "-m", "stagemesh.benchmarks.gpu_pipeline", str(path)]
        procs = [subprocess.Popen([*module, str(r), *args], stdout=subprocess.PIPE, text=True) for r in range(world)]
        outs = [p.communicate(timeout=900)[0] for p in procs]
        if any(p.returncode for p in procs):
            raise RuntimeError(f"pp={world} pipeline exited with {[p.returncode for p in procs]}")
        results[f"pp={world}"] = json.loads(outs[0].strip().splitlines()[-1])
    return results


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_check(out: Path, checkpoint: Path, shape: str, device: str, tokens: int, prompt_len: int, reps: int) -> dict:
    from stagemesh.benchmarks.roofline import decode_weight_bytes

    clock, phases = time.perf_counter(), {}

    def phase(name: str) -> None:
        nonlocal clock
        phases[name] = round(time.perf_counter() - clock, 1)
        clock = time.perf_counter()

    write_checkpoint(checkpoint, shape, device), phase("write checkpoint")
    bandwidth = copy_bandwidth(device)
    ours, engine = engine_rates(checkpoint, device, tokens, prompt_len, reps)
    weight_bytes = decode_weight_bytes(engine.model, tied_embedding=False)
    del engine
    _free(device), phase("reference engine")
    compiled, engine = engine_rates(checkpoint, device, tokens, prompt_len, reps, compiled=True)
    graphs = engine._runner.compiled.stats
    compile_info = {"graphs": graphs.graphs, "warmup_seconds": round(graphs.warmup_seconds, 1)}
    del engine
    _free(device), phase("compiled engine")
    theirs = hf_rates(checkpoint, device, tokens, prompt_len, reps)
    _free(device), phase("HF eager generate")
    pp = pipeline_rates(checkpoint, device, BATCHES[-1], prompt_len, tokens, reps)
    phase("pp=1 vs pp=2")
    return {
        "device": _device_name(device),
        "shape": shape,
        "torch": torch.__version__,
        "transformers": _hf_version(),
        "tokens": tokens,
        "prompt_tokens": prompt_len,
        "copy_bandwidth": bandwidth,
        "weight_bytes": weight_bytes,
        "engine": ours,
        "compiled": compiled,
        "compile": compile_info,
        "hf_eager": theirs,
        "pipeline": pp,
        "seconds": phases,
    }


def _free(device: str) -> None:
    import gc

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def _device_name(device: str) -> str:
    return torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu"


def _hf_version() -> str:
    import transformers

    return transformers.__version__


def markdown(r: dict) -> str:
    lines = [
        f"GPU check on {r['device']} ({r['shape']}, bf16, torch {r['torch']}, transformers {r['transformers']}); "
        f"decode tokens/s = batch x (t({r['tokens']}) - t(1)) / {r['tokens'] - 1}, "
        f"{r['prompt_tokens']}-token prompts.",
        "",
        "| what | stagemesh | baseline (same run) | ratio |",
        "|---|---|---|---|",
    ]
    for b in BATCHES:
        ours, theirs = r["engine"][b], r["hf_eager"][b]
        lines.append(
            f"| decode tok/s, batch {b}, ModelRunner vs HF eager generate | {ours:.1f} | {theirs:.1f} | "
            f"{ours / theirs:.2f}x |"
        )
    for b in BATCHES:
        ours, theirs = r["compiled"][b], r["hf_eager"][b]
        lines.append(
            f"| decode tok/s, batch {b}, compiled (--compile) vs HF eager generate | {ours:.1f} | {theirs:.1f} | "
            f"{ours / theirs:.2f}x |"
        )
    for side, label in (("engine", "eager"), ("compiled", "compiled")):
        achieved = r["weight_bytes"] * r[side][1]
        lines.append(
            f"| batch-1 share of HBM roofline, {label} ({r['weight_bytes'] / 1e9:.1f} GB/token) | "
            f"{achieved / 1e9:.0f} GB/s | "
            f"copy {r['copy_bandwidth'] / 1e9:.0f} GB/s | {achieved / r['copy_bandwidth']:.1%} |"
        )
    one, two = r["pipeline"]["pp=1"]["tokens_per_s"], r["pipeline"]["pp=2"]["tokens_per_s"]
    lines.append(
        f"| decode tok/s, batch {BATCHES[-1]}, pp=2 (2 processes, 1 GPU) vs pp=1 | {two:.1f} | {one:.1f} | "
        f"{two / one:.2f}x |"
    )
    c = r["compile"]
    lines += ["", f"Compiled: {c['graphs']} graph(s) captured in {c['warmup_seconds']} s."]
    lines += ["", "Seconds per phase: " + ", ".join(f"{k} {v}" for k, v in r["seconds"].items())]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    import shutil
    import tempfile

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench-results/gpu", help="Folder for gpu_check.json and gpu_check.md.")
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b", help="Checkpoint shape.")
    p.add_argument("--device", default="cuda", help="cuda (the check) or cpu (a dry run with --shape tiny).")
    p.add_argument("--tokens", type=int, default=32, help="Decode tokens per measurement.")
    p.add_argument("--prompt", type=int, default=128, help="Prompt tokens.")
    p.add_argument("--reps", type=int, default=2, help="Repetitions (median).")
    args = p.parse_args(argv)
    out, scratch = Path(args.out), Path(tempfile.mkdtemp(prefix="stagemesh-gpu-check-"))
    try:
        result = run_check(out, scratch / "checkpoint", args.shape, args.device, args.tokens, args.prompt, args.reps)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "gpu_check.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
