"""The latency floor under tensor parallelism on this host: an all-reduce of one decode token's activations
between two fresh processes with one torch thread each, the way a tp=2 stage's ranks run, alone and right
after a GEMV (as in a layer) — through the shared-memory path a CPU stage uses, and through gloo.

    python -m stagemesh.benchmarks.collectives RANK PORT BYTES REPS   (rank 0 prints microseconds as JSON)
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import time


def allreduce_latency(nbytes: int, reps: int = 300) -> dict[str, float]:
    """Median seconds of one gloo all_reduce of `nbytes` float32 between two local processes, alone
    ("seconds") and as it adds to a (hidden x hidden) GEMV before it, the way a layer's row-parallel
    projection is followed by its all-reduce ("between_gemvs")."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    module = [sys.executable, "-m", "stagemesh.benchmarks.collectives"]
    argv = [[*module, str(r), str(port), str(nbytes), str(reps)] for r in (0, 1)]
    procs = [subprocess.Popen(argv[r], stdout=subprocess.PIPE, text=True, env=env) for r in (0, 1)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    if any(p.returncode for p in procs):
        raise RuntimeError(f"all-reduce probe exited with {[p.returncode for p in procs]}")
    return json.loads(outs[0].strip().splitlines()[-1])


def _measure(rank: int, port: int, nbytes: int, reps: int) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    hidden = max(1, nbytes // 4)
    x, weight = torch.randn(1, hidden), torch.randn(hidden, hidden)
    alone = _median(lambda: dist.all_reduce(x), reps)
    gemv = _median(lambda: torch.nn.functional.linear(x, weight), reps)
    both = _median(lambda: dist.all_reduce(torch.nn.functional.linear(x, weight)), reps)
    shm = _shared_memory(rank, port)
    shm_alone = _median(lambda: shm.all_reduce(x), reps)
    shm_both = _median(lambda: shm.all_reduce(torch.nn.functional.linear(x, weight)), reps)
    dist.barrier()
    if rank == 0:
        result = {
            "seconds": alone,
            "between_gemvs": both - gemv,
            "shm_seconds": shm_alone,
            "shm_between_gemvs": shm_both - gemv,
        }
        print(json.dumps(result), flush=True)
    dist.destroy_process_group()


def _shared_memory(rank: int, port: int):
    """The stage's shared-memory collectives (stage_worker.shm_collectives) between the two processes."""
    import torch.distributed as dist
    from stagemesh.stage_worker.shm_collectives import ShmCollectives

    path = f"/dev/shm/stagemesh-probe-{port}"
    if rank == 0:
        shm = ShmCollectives(path, 0, 2, 1 << 20, create=True)
    dist.barrier()
    if rank == 1:
        shm = ShmCollectives(path, 1, 2, 1 << 20, create=False)
    dist.barrier()
    if rank == 0:
        os.unlink(path)
    return shm


def _median(fn, reps: int) -> float:
    import torch.distributed as dist

    for _ in range(20):
        fn()
    dist.barrier()
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


if __name__ == "__main__":
    _measure(*map(int, sys.argv[1:5]))
