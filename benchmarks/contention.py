"""How much two busy cores slow each other on this host: the same work in one process alone, then in two
processes at once (one torch thread each, as a tp=2 stage's ranks run). On a VM whose vCPUs share a
physical core or a power budget, a rank's GEMVs run slower beside the other rank's than alone, and that
bounds tp=2 below 2x before any collective.

    python -m stagemesh.benchmarks.contention KIND HIDDEN INTERMEDIATE LAYERS VOCAB SECONDS   (prints one rate)
"""

from __future__ import annotations

import subprocess
import sys
import time

KINDS = {"gemv": "GB/s", "matmul": "GFLOP/s"}  # a rank's decode GEMVs (MKL, eager); an in-cache matmul


def core_contention(hidden: int, intermediate: int, layers: int, vocab: int, seconds: float = 2.0) -> str:
    """One line: each kind's rate alone and, per process, with a second process doing the same (each run
    repeats its work for `seconds`)."""
    shape = [str(v) for v in (hidden, intermediate, layers, vocab, seconds)]
    parts = []
    for kind, unit in KINDS.items():
        alone = _rates([kind, *shape], 1)[0]
        pair = _rates([kind, *shape], 2)
        parts.append(
            f"{kind} alone {alone:.1f} {unit}, beside another {min(pair):.1f}-{max(pair):.1f} {unit} "
            f"({sum(pair) / len(pair) / alone:.0%})"
        )
    return (
        "one thread per process, half of each decode matrix (a tp=2 rank's GEMVs) and a 256x256 matmul: "
        + "; ".join(parts)
    )


def _rates(args: list[str], processes: int) -> list[float]:
    argv = [sys.executable, "-m", "stagemesh.benchmarks.contention", *args]
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, text=True) for _ in range(processes)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    if any(p.returncode for p in procs):
        raise RuntimeError(f"contention probe exited with {[p.returncode for p in procs]}")
    return [float(out.split()[-1]) for out in outs]


def _measure(kind: str, hidden: int, intermediate: int, layers: int, vocab: int, seconds: float) -> float:
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(1)
    if kind == "gemv":  # one tp=2 rank's share of qkv (GQA ignored: q, k, v as wide as hidden), o, gate_up, down
        per_layer = [
            (3 * hidden // 2, hidden),
            (hidden, hidden // 2),
            (intermediate, hidden),
            (hidden, intermediate // 2),
        ]
        weights = [torch.randn(s) for s in per_layer * layers + [(vocab // 2, hidden)]]
        xs = [torch.randn(1, w.shape[1]) for w in weights]
        work = sum(w.numel() * 4 for w in weights) / 1e9  # GB per pass

        def step():
            for x, w in zip(xs, weights):
                F.linear(x, w)
    else:
        a, b = torch.randn(256, 256), torch.randn(256, 256)
        work = 50 * 2 * 256**3 / 1e9  # GFLOP per pass

        def step():
            for _ in range(50):
                torch.mm(a, b)

    with torch.inference_mode():
        step()
        passes, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            step()
            passes += 1
        return passes * work / (time.perf_counter() - start)


if __name__ == "__main__":
    print(f"{_measure(sys.argv[1], *map(int, sys.argv[2:6]), float(sys.argv[6])):.3f}")
