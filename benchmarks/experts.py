"""Expert parallelism on a Mixtral checkpoint (issue 5): batch decode through a mesh whose experts live on
ep=2 expert workers against Hugging Face Mixtral `generate`, and the expert FFN throughput of ep=1 vs ep=2
workers at a fixed batch, driven by the stage's own dispatch code (RemoteExperts), in one run; the same
throughput on a Mixtral whose experts are large enough for expert parallelism to matter (issue 14: the
suite's `experts_preset`, hidden 1024 and experts of 2816, against the small one's 256 x 256)."""

from __future__ import annotations

import time

import torch
from stagemesh.benchmarks.context import THREADS, BenchContext, make_prompt
from stagemesh.benchmarks.hf import hf_generate, load_hf
from stagemesh.benchmarks.profiles import busy_summary, mesh_run_profile, torch_top_ops
from stagemesh.benchmarks.results import Row, Target
from stagemesh.benchmarks.serving import mesh_rate
from stagemesh.benchmarks.timing import alternate, decode_rate, median, timed
from stagemesh.models.config import ModelConfig


def run_experts(ctx: BenchContext) -> list[Row]:
    torch.set_num_threads(THREADS)
    hf = load_hf(ctx.mixtral)
    with ctx.mesh(ctx.layout(ctx.mixtral, ep=2)) as ep2:
        rows = [moe_decode_row(ctx, ep2, hf)]
        del hf
        with ctx.mesh(ctx.layout(ctx.mixtral, ep=1)) as ep1:
            rows.append(expert_ffn_row(ctx, ep1, ep2))
        with ctx.mesh(ctx.layout(ctx.mixtral, tp=2, ep=2)) as tp2:
            rows.append(tp_dispatch_row(ctx, ep2, tp2))
    return rows


def tp_dispatch_row(ctx: BenchContext, tp1, tp2) -> Row:
    """Who dispatches when the stage has tp > 1: each rank its slice of the tokens, then an all-gather
    (stage_worker/expert_router.py). Measured against tp=1, which dispatches every token from one rank."""
    s = ctx.suite
    vocab = ModelConfig.from_dir(ctx.mixtral).vocab_size
    prompts = [make_prompt(s.prompt_tokens, i, vocab) for i in range(s.moe_batch)]
    mesh_rate(tp1.gateway, prompts, 2), mesh_rate(tp2.gateway, prompts, 2)  # warm-up
    ctx.advance(f"Mixtral: batch-{len(prompts)} decode, tp=2 vs tp=1 dispatching to ep=2")
    one, two = alternate(
        s.reps,
        lambda: mesh_rate(tp1.gateway, prompts, s.decode_tokens),
        lambda: mesh_rate(tp2.gateway, prompts, s.decode_tokens),
    )
    ours, base = median(two), median(one)
    return Row(
        "tp_dispatch",
        f"Mixtral decode at batch {len(prompts)}, tp=2 stage dispatching to ep=2",
        "tp=1 stage, same expert workers",
        ours,
        base,
        "tok/s",
        ours / base,
        None,
        note="each TP rank dispatches its half of the tokens and the ranks all-gather the combined rows; "
        "1 thread per process",
        detail={"tp1": one, "tp2": two},
    )


def moe_decode_row(ctx: BenchContext, mesh, hf) -> Row:
    s = ctx.suite
    prompts = [make_prompt(s.prompt_tokens, i, hf.config.vocab_size) for i in range(s.moe_batch)]
    n = s.decode_tokens

    def hf_decode():
        prefill_s = timed(lambda: hf_generate(hf, prompts, 1))
        return decode_rate(len(prompts), n, prefill_s, timed(lambda: hf_generate(hf, prompts, n)))

    mesh_rate(mesh.gateway, prompts, 2), hf_generate(hf, prompts, 2)  # warm-up
    ctx.advance(f"Mixtral: batch-{len(prompts)} decode, mesh ep=2 vs HF")
    hf_s, mesh_s = alternate(s.reps, hf_decode, lambda: mesh_rate(mesh.gateway, prompts, n))
    ours, base = median(mesh_s), median(hf_s)
    row = Row(
        "moe_decode",
        f"Mixtral decode at batch {len(prompts)} through the mesh, ep=2, 1 thread per worker",
        f"HF Mixtral generate, {THREADS} threads",
        ours,
        base,
        "tok/s",
        ours / base,
        Target("ratio>=", 1.0),
        note=f"decode only, {len(prompts)} x (t({n}) - t(1)) / {n - 1}; {_shape(ctx.mixtral)}",
        detail={"mesh": mesh_s, "hf": hf_s},
    )
    if row.missed:
        lines, delta = mesh_run_profile(mesh, [(p, n) for p in prompts])
        hf_ops = torch_top_ops(lambda: hf_generate(hf, prompts, n), n, "HF Mixtral generate")
        row.profile = [dispatch_line(delta), *lines, *hf_ops]
    return row


def dispatch_line(delta: dict[str, tuple[int, float]]) -> str:
    """A decode step's time at the stage, split into the experts' compute and everything else."""
    stage_steps, stage_busy = delta.get("stage 0 rank 0", (0, 0.0))
    calls = sum(steps for role, (steps, _) in delta.items() if role.startswith("experts"))
    expert_busy = sum(busy for role, (_, busy) in delta.items() if role.startswith("experts"))
    per = max(stage_steps, 1)
    return (
        f"per step the stage took {stage_busy / per * 1e3:.1f} ms and waited on {calls / per:.1f} expert calls, "
        f"which computed {expert_busy / per * 1e3:.1f} ms in the expert workers; the other "
        f"{(stage_busy - expert_busy) / per * 1e3:.1f} ms are the stage's attention and router plus dispatch: "
        "encoding, blocking gRPC round trips (one per layer and worker), decoding"
    )


def _shape(path: str) -> str:
    c = ModelConfig.from_dir(path)
    return (
        f"{c.num_hidden_layers} layers, hidden {c.hidden_size}, {c.num_local_experts} experts of "
        f"{c.intermediate_size}, top-{c.num_experts_per_tok}"
    )


def run_large_experts(ctx: BenchContext) -> list[Row]:
    from stagemesh.benchmarks.runner import checkpoint

    large = checkpoint(None, "mixtral", ctx.suite.experts_preset)
    with ctx.mesh(ctx.layout(large, ep=1)) as ep1, ctx.mesh(ctx.layout(large, ep=2)) as ep2:
        row = expert_ffn_row(ctx, ep1, ep2, "expert_ffn_large", Target("ratio>=", 1.5), large)
    row.what = row.what.replace("expert FFN throughput", "expert FFN throughput, large experts")
    return [row]


def expert_ffn_row(
    ctx: BenchContext, ep1, ep2, key: str = "expert_ffn", target: Target | None = None, model: str | None = None
) -> Row:
    s = ctx.suite
    ctx.advance(f"expert FFN throughput, ep=2 vs ep=1, batch {s.expert_batch}, {_shape(model or ctx.mixtral)}")
    one, two = ExpertLoad(ep1.coordinator, s.expert_batch), ExpertLoad(ep2.coordinator, s.expert_batch)
    one.throughput(1), two.throughput(1)  # warm-up: opens the channels
    base_s, ours_s = alternate(s.reps, lambda: one.throughput(s.expert_rounds), lambda: two.throughput(s.expert_rounds))
    ours, base = median(ours_s), median(base_s)
    label = "large experts" if target else f"batch {s.expert_batch}"
    ctx.add_series("scaling", f"ep: expert FFN throughput, {label}", [[1, 1.0], [2, ours / base]])
    profile = [
        f"ep={e}: {line}"
        for e, mesh, load in ((1, ep1, one), (2, ep2, two))
        for line in ffn_profile(mesh, load, s.expert_rounds)
    ]
    streamed = one.weight_bytes()
    profile.append(
        f"expert weights streamed per pass over the layers: {streamed / 1e6:.0f} MB (every expert with a routed "
        f"token reads its 3 matrices once); ep=1 reads them at {streamed * base / s.expert_batch / 1e9:.1f} GB/s, "
        f"the two ep=2 workers together at {streamed * ours / s.expert_batch / 1e9:.1f} GB/s"
    )
    return Row(
        key,
        f"expert FFN throughput, ep=2, batch {s.expert_batch}, 1 thread per expert worker",
        "ep=1, 1 thread",
        ours,
        base,
        "tok/s",
        ours / base,
        target,
        note="tokens through every MoE layer's experts per second, random top-2 routing, dispatched by the "
        f"stage's RemoteExperts over gRPC; near-linear scaling would be ~2x; {_shape(model or ctx.mixtral)}",
        profile=profile,
        detail={"ep1": base_s, "ep2": ours_s},
    )


def ffn_profile(mesh, load: ExpertLoad, rounds: int) -> list[str]:
    """The expert workers' own compute time during one more measurement, against its wall time."""
    from stagemesh.benchmarks.meshes import stats_delta, worker_stats

    before, start = worker_stats(mesh, since=time.monotonic()), time.perf_counter()
    load.throughput(rounds)
    wall = time.perf_counter() - start
    after = worker_stats(mesh, since=time.monotonic())
    delta = {k: v for k, v in stats_delta(before, after).items() if k.startswith("experts")}
    return busy_summary(delta, wall)


class ExpertLoad:
    """Sends batches of routed tokens through every MoE layer's remote experts, as a stage does."""

    def __init__(self, coordinator: str, batch: int) -> None:
        from stagemesh.coordinator.client import cluster_status
        from stagemesh.coordinator.wire import plan_from_message
        from stagemesh.stage_worker.expert_router import ExpertDirectory, ExpertPool, RemoteExperts

        t = cluster_status(coordinator).topology
        plan = plan_from_message(t.plan)
        config = ModelConfig.from_dir(plan.spec.model_dir)
        owners = [plan.parallel.expert_owners(e) for e in range(config.num_local_experts)]
        directory = ExpertDirectory(tuple(t.expert_addresses), tuple(t.expert_alive))
        pool = ExpertPool(lambda: directory, timeout=60.0)
        self.config = config
        self.layers = [RemoteExperts(i, owners, pool) for i in range(config.num_hidden_layers)]
        gen = torch.Generator().manual_seed(0)
        self.hidden = torch.randn(batch, config.hidden_size, generator=gen)  # (T, D)
        scores = torch.randn(batch, config.num_local_experts, generator=gen).softmax(-1)  # (T, E)
        self.weights, self.ids = scores.topk(config.num_experts_per_tok, dim=-1)  # (T, K) each

    def weight_bytes(self) -> int:
        """float32 bytes of the experts this load's routing reaches, over every MoE layer."""
        c = self.config
        return c.num_hidden_layers * self.ids.unique().numel() * 3 * c.hidden_size * c.intermediate_size * 4

    def throughput(self, rounds: int) -> float:
        """Tokens per second through all MoE layers, `rounds` passes."""
        start = time.perf_counter()
        for _ in range(rounds):
            for layer in self.layers:
                layer(self.hidden, self.ids, self.weights)
        return rounds * self.hidden.shape[0] / (time.perf_counter() - start)
