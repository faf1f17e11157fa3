"""How comparisons are timed: baseline and candidate alternate, so noise on the machine hits both; medians
and percentiles; the decode rate that leaves the prefill out."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def alternate(reps: int, *measures: Callable[[], float], pause: float = 0.2) -> list[list[float]]:
    """Runs measures[0], measures[1], ... in turn, `reps` times; samples[i] holds measure i's results.
    The pause lets the previous side's idle threads stop spinning before the next side starts."""
    samples: list[list[float]] = [[] for _ in measures]
    for _ in range(reps):
        for out, measure in zip(samples, measures):
            time.sleep(pause)
            out.append(measure())
    return samples


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def decode_rate(batch: int, n: int, t1: float, tn: float) -> float:
    """Tokens/s of decode alone: generating n tokens took tn, generating 1 (the prefill and its token)
    took t1; the difference is n - 1 decode steps of `batch` sequences."""
    return batch * (n - 1) / max(tn - t1, 1e-9)


def percentiles(xs: list[float], ps: tuple[int, ...] = (50, 90, 99)) -> dict[str, float | None]:
    """Nearest-rank percentiles, in the units of xs (None when there are no samples)."""
    if not xs:
        return {f"p{p}": None for p in ps}
    ordered = sorted(xs)
    return {f"p{p}": ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered)) - 1))] for p in ps}


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start
