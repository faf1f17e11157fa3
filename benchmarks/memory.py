"""Memory per worker against the plan: every stage worker of a tp=2, pp=2 layout loads its shard in its
own process; its parameter bytes are compared with M / (tp * pp) + its replicated parameters, its peak
resident memory while loading with the shard plus 0.5 GB."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from stagemesh.benchmarks.context import BenchContext
from stagemesh.benchmarks.results import Row, Target
from stagemesh.models.config import ModelConfig
from stagemesh.models.plan import ParallelPlan

TP, PP = 2, 2
FLOAT32 = 4


def probe_all(model_dir: str) -> list[dict]:
    """Runs load_probe for every (stage, rank), all at once (each process's peak is its own)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "stagemesh.benchmarks.load_probe",
                model_dir,
                str(TP),
                str(PP),
                str(stage),
                str(rank),
            ],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        for stage in range(PP)
        for rank in range(TP)
    ]
    results = []
    for p in procs:
        out, _ = p.communicate(timeout=600)
        if p.returncode != 0:
            raise RuntimeError(f"load probe {p.args[-2:]} exited with {p.returncode}")
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def plan_bytes(config: ModelConfig, stage: int) -> int:
    """The plan's share of one worker: M / (tp * pp) plus what every TP rank of its stage holds in full."""
    plan = ParallelPlan.build(config, TP, PP)
    total = ParallelPlan.build(config).stage_param_count(config, 0, 0)
    return (total // (TP * PP) + plan.replicated_param_count(config, stage)) * FLOAT32


def run_memory(ctx: BenchContext) -> list[Row]:
    ctx.advance(f"memory: loading every shard of tp={TP}, pp={PP}")
    config = ModelConfig.from_dir(ctx.llama)
    plan = ParallelPlan.build(config, TP, PP)
    probes = probe_all(ctx.llama)
    for p in probes:
        p["plan_bytes"] = plan_bytes(config, p["stage"])
        p["exact_formula_bytes"] = plan.stage_param_count(config, p["stage"], p["rank"]) * FLOAT32
    worst = max(probes, key=lambda p: p["param_bytes"] / p["plan_bytes"])
    exact = all(p["param_bytes"] == p["exact_formula_bytes"] for p in probes)
    params = Row(
        "param_bytes",
        f"parameter bytes per worker, tp={TP} pp={PP} (worst of {len(probes)})",
        "the plan's M/(tp*pp) + replicated",
        worst["param_bytes"] / 1e9,
        worst["plan_bytes"] / 1e9,
        "GB",
        worst["param_bytes"] / worst["plan_bytes"],
        Target("ratio<=", 1.02),
        note=f"stage {worst['stage']} rank {worst['rank']}; every worker equals the plan's exact per-worker "
        f"count: {'yes' if exact else 'NO'}",
        detail={"workers": probes},
    )
    return [params, rss_row(probes)]


def rss_row(probes: list[dict]) -> Row:
    worst = max(probes, key=lambda p: p["peak_rss"] - p["param_bytes"])
    return Row(
        "load_rss",
        f"peak RSS while loading a shard, tp={TP} pp={PP} (worst of {len(probes)})",
        "the shard's parameter bytes",
        worst["peak_rss"] / 1e9,
        worst["param_bytes"] / 1e9,
        "GB",
        worst["peak_rss"] / worst["param_bytes"],
        Target("excess<=", 0.5, "GB"),
        note=f"whole process incl. Python and torch ({worst['rss_before_load'] / 1e9:.2f} GB before loading)",
        detail={"workers": probes},
    )
