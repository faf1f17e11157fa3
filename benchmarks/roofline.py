"""The memory-bandwidth roofline of batch-1 decode: the weight bytes one decode step must stream, and the
read bandwidth this machine reaches (a large GEMV and a large reduction, the better of the two), both
measured in the run that uses them."""

from __future__ import annotations

import time

import torch
from torch import nn


def decode_weight_bytes(model: nn.Module, tied_embedding: bool) -> int:
    """Bytes of every weight a decode step reads: all parameters but the embedding table, which is only
    indexed (one row per token) unless it doubles as the LM head."""
    total = 0
    for name, p in model.named_parameters():
        if "embed_tokens" in name and not tied_embedding:
            continue
        total += p.numel() * p.element_size()
    return total


@torch.inference_mode()
def gemv_floor(model: nn.Module, tied_embedding: bool, reps: int = 5) -> float:
    """Seconds for F.linear to stream every weight matrix a decode step reads, back to back, for one token:
    a decode step with nothing but its GEMVs (best of `reps`)."""
    import torch.nn.functional as F

    weights, inputs = _step_matrices(model, tied_embedding)
    return _best_time(lambda: [F.linear(inputs[w.shape[1]], w) for w in weights], reps)


@torch.inference_mode()
def kernel_floors(model: nn.Module, tied_embedding: bool, reps: int = 5) -> dict[str, float]:
    """The compiled batch-1 graph's counterpart of gemv_floor: seconds to stream every weight matrix of a
    decode step through the reduction its linears become (models.compiled.LinearsAsSums, compiled alone),
    and through torch.sum (what the roofline's best kernel reads), back to back, best of `reps`."""
    from stagemesh.models.compiled import linear_as_sum, register_realize_op

    register_realize_op()
    weights, inputs = _step_matrices(model, tied_embedding)
    weights = [w.detach() for w in weights]  # plain tensors: dynamo guards on each parameter it is given
    xs = [inputs[w.shape[1]] for w in weights]
    reads = torch.compile(lambda xs, ws: [linear_as_sum(x, w) for x, w in zip(xs, ws)], dynamic=False)
    return {
        "reduction": _best_time(lambda: reads(xs, weights), reps),  # one graph, as in the decode step
        "sum": _best_time(lambda: [w.sum() for w in weights], reps),
    }


def _step_matrices(model: nn.Module, tied_embedding: bool):
    """The 2-D weights a decode step reads, and a 1-row input for each input width."""
    weights = [
        p for name, p in model.named_parameters() if p.dim() == 2 and ("embed_tokens" not in name or tied_embedding)
    ]
    return weights, {w.shape[1]: torch.randn(1, w.shape[1], dtype=w.dtype) for w in weights}


def read_bandwidth(megabytes: int = 256, reps: int = 9) -> dict:
    """Bytes/s read by torch.mv over a (rows, 4096) float32 matrix of `megabytes` and by torch.sum over the
    same bytes, with the current torch thread count. The two kernels alternate `reps` times and each reports
    its median (one lucky or unlucky timing on a shared machine moves neither); the roofline is the better
    median, and both are kept with their spread."""
    import statistics

    cols = 4096
    matrix = torch.randn(megabytes * 2**20 // (4 * cols), cols)
    vector = torch.randn(cols)
    nbytes = matrix.numel() * matrix.element_size()
    kernels = {"gemv": lambda: torch.mv(matrix, vector), "sum": lambda: matrix.sum()}
    for fn in kernels.values():
        fn()
    samples: dict[str, list[float]] = {k: [] for k in kernels}
    for _ in range(reps):
        for name, fn in kernels.items():
            start = time.perf_counter()
            fn()
            samples[name].append(nbytes / (time.perf_counter() - start))
    medians = {k: statistics.median(v) for k, v in samples.items()}
    best = max(medians, key=medians.get)
    return {
        **medians,
        "best": medians[best],
        "best_kind": best,
        "spread": {k: (min(v), max(v)) for k, v in samples.items()},
        "bytes": nbytes,
        "threads": torch.get_num_threads(),
    }


def _best_time(fn, reps: int) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best
