"""Loads one stage worker's shard in a fresh process, the way the worker does, and prints what it cost as
one JSON line: the parameter bytes it holds and the peak resident memory of the process (Linux VmHWM:
unlike ru_maxrss, it starts afresh at exec, so the benchmark's own memory is not counted).

    python -m stagemesh.benchmarks.load_probe MODEL_DIR TP PP STAGE RANK
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def peak_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024  # kB
    raise RuntimeError("no VmHWM in /proc/self/status: peak RSS is measured on Linux only")


def probe(model_dir: str, tp: int, pp: int, stage: int, rank: int) -> dict:
    import torch
    from stagemesh.models.config import ModelConfig
    from stagemesh.models.loader import build_model
    from stagemesh.models.plan import ParallelPlan
    from stagemesh.models.tp import TPRank

    plan = ParallelPlan.build(ModelConfig.from_dir(model_dir), tp, pp)
    before = peak_rss_bytes()
    model, _ = build_model(model_dir, plan.stages[stage], TPRank(rank, tp), torch.float32)
    held = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"stage": stage, "rank": rank, "param_bytes": held, "peak_rss": peak_rss_bytes(), "rss_before_load": before}


if __name__ == "__main__":
    model_dir, *numbers = sys.argv[1:]
    print(json.dumps(probe(model_dir, *map(int, numbers))))
