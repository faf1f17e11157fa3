"""A plain pipeline for the GPU check: `world` processes, each one stage (ModelRunner over its layers), with
micro-batches in flight; activations go down and sampled (greedy) tokens come back over torch.distributed
gloo, through host memory. world=1 is the pp=1 baseline running the same loop. Stands in for the gRPC mesh
where grpcio is not installed; it measures the pipelining, not the mesh's services.

    python -m stagemesh.benchmarks.gpu_pipeline MODEL_DIR RANK WORLD PORT DEVICE BATCH PROMPT TOKENS REPS
"""

from __future__ import annotations

import json
import math
import sys
import time

import torch
import torch.distributed as dist
from stagemesh.benchmarks.timing import decode_rate, median

BLOCK = 16


class StageLoop:
    def __init__(self, path: str, rank: int, world: int, device: str, batch: int, prompt_len: int, tokens: int):
        from stagemesh.models.config import ModelConfig
        from stagemesh.models.loader import build_model
        from stagemesh.models.plan import ParallelPlan
        from stagemesh.models.runner import ModelRunner

        config = ModelConfig.from_dir(path)
        spec = ParallelPlan.build(config, 1, world).stages[rank]
        model, _ = build_model(path, spec, dtype=torch.bfloat16, device=device)
        self.per_seq = math.ceil((prompt_len + tokens) / BLOCK)
        self.runner = ModelRunner(model, batch * self.per_seq, BLOCK, device)
        self.rank, self.world, self.device = rank, world, device
        self.micro = 2 if world > 1 and batch > 1 else 1  # micro-batches in flight
        self.per = batch // self.micro
        self.prompt_len, self.hidden = prompt_len, config.hidden_size
        self.vocab = config.vocab_size

    def chunks(self, m: int, k: int):
        from stagemesh.models.batch import SeqChunk

        seqs = range(m * self.per, (m + 1) * self.per)
        table = lambda s: tuple(range(s * self.per_seq, (s + 1) * self.per_seq))  # noqa: E731
        if k == 0:
            return [SeqChunk(s, 0, self.prompt_len, table(s)) for s in seqs]
        return [SeqChunk(s, self.prompt_len + k - 1, 1, table(s)) for s in seqs]

    def generate(self, n: int) -> float:
        """Generates n tokens for every sequence; returns the seconds rank 0 saw (it sends first, hears last)."""
        if self.world > 1:
            dist.barrier()
        start = time.perf_counter()
        self.pending = []
        (self._first if self.rank == 0 else self._last)(n)
        for work in self.pending:
            work.wait()
        return time.perf_counter() - start

    @torch.inference_mode()
    def _first(self, n: int) -> None:
        ids = torch.tensor(
            [
                3 + (s * 7919 + i * 131) % (self.vocab - 3)
                for s in range(self.per * self.micro)
                for i in range(self.prompt_len)
            ]
        ).view(self.micro, -1)
        tokens = [ids[m] for m in range(self.micro)]
        for k in range(n):
            for m in range(self.micro):
                if k and self.world > 1:
                    tokens[m] = _recv((self.per,), torch.int64, src=self.world - 1)
                out = self.runner.run(self.chunks(m, k), input_ids=tokens[m].to(self.device))
                if self.world == 1:
                    tokens[m] = out.argmax(-1).cpu()
                else:
                    self.pending.append(_send(out, dst=1))
        for _ in range(self.micro if self.world > 1 else 0):
            _recv((self.per,), torch.int64, src=self.world - 1)

    @torch.inference_mode()
    def _last(self, n: int) -> None:
        for k in range(n):
            for m in range(self.micro):
                rows = self.per * (self.prompt_len if k == 0 else 1)
                hidden = _recv((rows, self.hidden), torch.bfloat16, src=self.rank - 1).to(self.device)
                logits = self.runner.run(self.chunks(m, k), hidden=hidden)
                self.pending.append(_send(logits.argmax(-1), dst=0))


def _send(t: torch.Tensor, dst: int):
    """Starts sending `t` (gloo moves host bytes: any dtype goes as uint8); wait() on the result. Sends must
    not block: each side sends a micro-batch while the other is still sending it the previous one's."""
    return dist.isend(t.detach().contiguous().cpu().view(torch.uint8), dst=dst)


def _recv(shape: tuple[int, ...], dtype: torch.dtype, src: int) -> torch.Tensor:
    itemsize = torch.empty((), dtype=dtype).element_size()
    buf = torch.empty(*shape[:-1], shape[-1] * itemsize, dtype=torch.uint8)
    dist.recv(buf, src=src)
    return buf.view(dtype)


def main(
    path: str, rank: int, world: int, port: int, device: str, batch: int, prompt_len: int, tokens: int, reps: int
) -> None:
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    loop = StageLoop(path, rank, world, device, batch, prompt_len, tokens)
    loop.generate(2)  # warm-up
    rates = [decode_rate(batch, tokens, loop.generate(1), loop.generate(tokens)) for _ in range(reps)]
    if rank == 0:
        print(json.dumps({"world": world, "batch": batch, "micro_batches": loop.micro, "tokens_per_s": median(rates)}))
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    a = sys.argv[1:]
    main(a[0], *map(int, a[1:4]), a[4], *map(int, a[5:9]))
