"""The compiled decode path (`--compile`): one decode step of a model slice captured by torch.compile for
a few padded shape buckets at start-up, so serving never recompiles.

A decode-only step (every chunk one token) is padded to the next batch bucket and its block tables to
the next block bucket, then run through the graph of that batch bucket. Padded rows write their K/V into
a scratch block past the pool's last (the runner allocates it) and attend to it alone, so they never
touch a sequence's pages; padded key columns are masked as they are in eager decode. Prefill and mixed
steps stay eager, over the same KV pages, and the logits go to the same sampling code.

On CPU the graphs are inductor C++ kernels with `freezing` (weights constant-folded and prepacked for
oneDNN), symbolic in batch and key length: one graph serves every bucket from batch 2 up, and batch 1 has
its own, whose linears are streaming reductions (`LinearsAsSums`). Which of the two serves batch 1 is
measured at warm-up (`CompileOptions.batch1`): the faster one differs between CPUs and dtypes. On CUDA
`mode="reduce-overhead"` (CUDA graphs), one capture per (batch, blocks) bucket. Legend: B = padded batch,
T = padded key slots (blocks x block_size), D = hidden size, V = vocab.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
import types
from bisect import bisect_left
from dataclasses import dataclass, field, replace

import torch
from stagemesh.errors import InvalidArgument
from stagemesh.models.batch import StepBatch
from stagemesh.models.tp import TPRank
from stagemesh.models.transformer import Transformer
from torch import nn
from torch.nn import functional as F

log = logging.getLogger("stagemesh.compile")

BUCKETS_ENV = "STAGEMESH_COMPILE_BUCKETS"  # "1,2,4x1,4" = batch buckets x block buckets (CI keeps it small)
FREEZING_ENV = "STAGEMESH_COMPILE_FREEZING"  # "0" turns freezing off (compiles ~5x faster; CI's TP and mesh)
BATCH1_ENV = "STAGEMESH_COMPILE_BATCH1"  # CompileOptions.batch1 for processes started with --compile
BATCH1_CHOICES = ("measure", "sums", "padded")
BATCH1_TRIALS = 5  # alternated steps of each batch-1 path at warm-up


def _powers_of_two(limit: int) -> tuple[int, ...]:
    out, n = [], 1
    while n < limit:
        out.append(n)
        n *= 2
    return (*out, limit)


@dataclass(frozen=True)
class CompileOptions:
    """Which padded shapes are captured; a decode step larger than the largest bucket runs eagerly."""

    batch_buckets: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)  # 64: the mixed-load bench
    block_buckets: tuple[int, ...] = ()  # () = powers of two up to the model's context in blocks
    freezing: bool = True  # CPU: prepacked oneDNN weights (2x the weight memory: eager prefill keeps its own)
    # CPU batch-1 steps: "sums" = their own graph (LinearsAsSums), "padded" = the next batch bucket's graph
    # (oneDNN), "measure" = time both at warm-up and keep the faster. On the bench model, 2 threads: AMD EPYC
    # (AVX2) fp32 sums ~1.5x padded; Intel Xeon (AVX-512, AMX) fp32 sums 1.07x padded, bf16 padded 1.4x sums.
    batch1: str = "measure"

    def __post_init__(self) -> None:
        for name in ("batch_buckets", "block_buckets"):
            values = getattr(self, name)
            if any(v < 1 for v in values) or list(values) != sorted(set(values)):
                raise InvalidArgument(f"compile {name}: increasing positive integers, got {values}")
        if not self.batch_buckets:
            raise InvalidArgument("compile batch_buckets: at least one")
        if self.batch1 not in BATCH1_CHOICES:
            raise InvalidArgument(f"compile batch1: one of {', '.join(BATCH1_CHOICES)}, got {self.batch1!r}")

    @classmethod
    def parse(cls, spec: str) -> CompileOptions:
        """'1,2,4' (batch buckets) or '1,2,4x2,8' (batch buckets x block buckets)."""
        batches, _, blocks = spec.partition("x")
        try:
            ints = lambda s: tuple(int(v) for v in s.split(",") if v.strip())  # noqa: E731
            return cls(batch_buckets=ints(batches), block_buckets=ints(blocks))
        except ValueError:
            raise InvalidArgument(f"{BUCKETS_ENV}={spec!r}: want e.g. '1,2,4' or '1,2,4x2,8'") from None

    @classmethod
    def from_env(cls) -> CompileOptions:
        spec = os.environ.get(BUCKETS_ENV)
        options = cls.parse(spec) if spec else cls()
        freezing = os.environ.get(FREEZING_ENV, "1") != "0"
        return replace(options, freezing=freezing, batch1=os.environ.get(BATCH1_ENV, options.batch1))

    def blocks_for(self, max_blocks: int) -> tuple[int, ...]:
        if not self.block_buckets:
            return _powers_of_two(max_blocks)
        return tuple(sorted({min(b, max_blocks) for b in self.block_buckets}))


@dataclass
class CompileStats:
    """What start-up captured, for the logs and `coordctl status`."""

    graphs: int = 0  # compiled graph pieces (CPU: the symbolic graph and the batch-1 one; CUDA: per bucket pair)
    warmup_seconds: float = 0.0
    compiled_steps: int = 0  # decode steps served by a graph
    eager_steps: int = 0  # steps that were not (prefill, mixed, or past the largest bucket)
    buckets: list[tuple[int, int]] = field(default_factory=list)  # (batch, blocks) pairs run at start-up
    batch1: str = ""  # which graph serves batch 1 ("sums" or "padded"), "" when batch 1 has no choice


class DecodeStep(nn.Module):
    """The tensor-only decode step that is compiled: the model's own forward over a decode-only batch.
    `gemv_as_sums`: a 1-row step's linears are traced as reductions (`LinearsAsSums`)."""

    def __init__(self, model: Transformer, gemv_as_sums: bool) -> None:
        super().__init__()
        self.model, self.gemv_as_sums = model, gemv_as_sums

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, keys: torch.Tensor):
        """tokens: ids (B,) on the first stage, else hidden (B, D); positions, slots (B,); keys (B, T) the
        KV slots each row reads. Returns logits (B, V) on the last stage, else hidden (B, D)."""
        rows = torch.arange(positions.shape[0], device=positions.device)
        batch = StepBatch((), positions, slots, rows, rows, keys, positions, ())
        inputs = dict(input_ids=tokens) if self.model.has_embedding else dict(hidden=tokens)
        if self.gemv_as_sums and positions.shape[0] == 1:  # the batch-1 graph (size 1 is specialised)
            with LinearsAsSums():
                return self.model(batch, **inputs)
        return self.model(batch, **inputs)


class LinearsAsSums(torch.overrides.TorchFunctionMode):
    """While dynamo traces a 1-row step, `F.linear(x, W, b)` becomes `(x * W).sum(-1) + b`, which inductor
    compiles into one vectorised reduction streaming W's rows. On this project's 2-vCPU CPU that reads the
    weights at ~0.8 of a plain `sum`'s rate, where oneDNN's linear reaches ~0.6 at one row (~0.4 at the two
    rows batch 1 used to be padded to) and MKL's ~0.3 (the bench model's 65 decode matrices, 2 threads):
    batch-1 decode is nothing but that read. Code that runs eagerly in between (experts) keeps
    `F.linear`."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.linear or not torch.compiler.is_compiling():
            return func(*args, **kwargs)
        return linear_as_sum(*args, **kwargs)


def linear_as_sum(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (1, K), weight (N, K) -> (1, N), accumulated in float32 or wider. The weight is not cast: freezing
    would fold a cast of it into a second, wider copy that every step then reads.

    x is written to memory first (`inductor_force_stride_order`, a no-op in eager): left to itself, inductor
    inlines what produces x (the norm, the residual adds, the embedding lookup, SiLU) into the reduction and
    recomputes it for every row of W, which cost a fifth of the bench model's batch-1 step (22 -> 28 tok/s,
    2 threads). Call `register_realize_op()` before tracing."""
    x = torch.ops.prims.inductor_force_stride_order(x, x.stride())
    acc = torch.promote_types(x.dtype, torch.float32)
    y = (x[:, None, :] * weight[None]).sum(-1, dtype=acc)  # (1, N)
    return (y if bias is None else y + bias).to(x.dtype)


def register_realize_op() -> None:
    """Registers `prims.inductor_force_stride_order` (linear_as_sum's). Importing inductor at start-up costs a
    worker ~1 s, so this runs only where a graph is about to be traced."""
    import torch._inductor.inductor_prims  # noqa: F401


class CompiledDecode:
    """The captured graphs of one model slice and the padding that routes a decode step to them."""

    def __init__(self, model: Transformer, num_blocks: int, block_size: int, options: CompileOptions) -> None:
        self.model, self.block_size, self.options = model, block_size, options
        self.device = next(model.parameters()).device
        self.scratch_block = num_blocks  # the runner allocates num_blocks + 1; this one only padding writes
        max_blocks = -(-model.config.max_position_embeddings // block_size)
        self.block_buckets = options.blocks_for(max_blocks)
        # CPU: one graph symbolic in batch and key length, so inductor packs each weight once for oneDNN
        # (a static batch gets MKL packing per batch size), and a batch-1 graph of its own (dynamo
        # specialises size 1) whose linears are reductions over the unpacked weights (LinearsAsSums).
        self.symbolic = self.device.type == "cpu"
        self.batch_buckets = options.batch_buckets
        self.pad_batch1 = False  # batch 1 goes through the next bucket's graph (decided at warm-up)
        self.stats = CompileStats()
        self._graph = None
        self._step = DecodeStep(model, gemv_as_sums=self.symbolic)
        if self.device.type == "cuda":
            _collectives_between_graphs()
        model.rotary(torch.zeros(1, dtype=torch.long, device=self.device), torch.float32)  # fills its device cache
        for layer in model.layers.values():  # routed experts (local or remote) have data-dependent shapes
            if hasattr(layer.mlp, "experts"):
                layer.mlp.experts.forward = torch.compiler.disable(layer.mlp.experts.forward)

    def takes(self, batch: StepBatch) -> bool:
        return (
            batch.decode_only
            and 0 < batch.num_tokens <= self.batch_buckets[-1]
            and batch.decode_slots.shape[1] <= self.block_buckets[-1] * self.block_size
        )

    def describe_buckets(self) -> str:
        batches, blocks = ",".join(map(str, self.batch_buckets)), ",".join(map(str, self.block_buckets))
        batch1 = f" (batch 1: {self.stats.batch1})" if self.stats.batch1 else ""
        return f"batch {batches} x blocks {blocks}{batch1}"

    @torch.inference_mode()
    def warm_up(self, tp: TPRank = TPRank()) -> CompileStats:
        """Compiles every batch bucket, runs every (batch, blocks) pair once, so serving never compiles, and
        chooses batch 1's graph. Again after a TP group was re-formed, the same steps (and collectives) as a
        spare's first warm-up: the graphs exist, so this only runs them and chooses again with the spare."""
        if self._graph is not None:
            for b, blocks in self._warm_up_pairs():
                self._run_padded(*self._dummy(b, blocks))
            self._choose_batch1(tp)
            return self.stats
        start = time.perf_counter()
        torch._dynamo.config.cache_size_limit = max(64, torch._dynamo.config.cache_size_limit)
        self._graph = self._compile()
        before = _graph_count()
        for b, blocks in self._warm_up_pairs():
            self._run_padded(*self._dummy(b, blocks))
            self.stats.buckets.append((b, blocks))
        self.stats.graphs = _graph_count() - before
        self._choose_batch1(tp)
        self.stats.warmup_seconds = time.perf_counter() - start
        log.info(
            "compiled decode: %d graphs for %s in %.1f s",
            self.stats.graphs,
            self.describe_buckets(),
            self.stats.warmup_seconds,
        )
        return self.stats

    def _choose_batch1(self, tp: TPRank) -> None:
        """Whether batch 1 runs its own graph (reductions) or the next bucket's, padded (CompileOptions.batch1).
        "measure" alternates the two a few times; TP ranks sum their times, so every rank takes the same
        graph (the other ranks' collectives must match)."""
        if not (self.symbolic and self.batch_buckets[0] == 1 and len(self.batch_buckets) > 1):
            return
        choice = self.options.batch1
        if choice == "measure":
            few = self.block_buckets[0]
            paths = (self._dummy(1, few), self._dummy(self.batch_buckets[1], few))
            seconds = torch.zeros(2, dtype=torch.float64)
            for _ in range(BATCH1_TRIALS):
                for i, args in enumerate(paths):
                    start = time.perf_counter()
                    self._run_padded(*args)
                    seconds[i] += time.perf_counter() - start
            if tp.size > 1:
                tp.all_reduce(seconds)
            choice = "padded" if seconds[1] < seconds[0] else "sums"
        self.pad_batch1 = choice == "padded"
        self.stats.batch1 = choice

    def _warm_up_pairs(self) -> list[tuple[int, int]]:
        """Every (batch, blocks) pair for CUDA graphs, which capture each shape. The CPU graphs are symbolic
        in the key length, the larger one also in batch: every batch bucket at the fewest blocks and every
        block bucket at the two smallest batches (batch 1's own graph, when 1 is a bucket, and the symbolic
        one) reach every value of each size (a 64 x 4096-key step alone would take seconds to warm up)."""
        if not self.symbolic:
            return [(b, k) for b in self.batch_buckets for k in self.block_buckets]
        few = self.block_buckets[0]
        smallest = self.batch_buckets[:2]
        return [(b, few) for b in self.batch_buckets] + [(b, k) for b in smallest for k in self.block_buckets[1:]]

    def _compile(self):
        from torch._inductor import config as inductor

        register_realize_op()
        step = types.MethodType(_own_code(DecodeStep.forward), self._step)
        if self.device.type == "cuda":
            return torch.compile(step, mode="reduce-overhead", fullgraph=False, dynamic=False)
        inductor.freezing = self.options.freezing
        return torch.compile(step, fullgraph=False, dynamic=None)

    def _dummy(self, b: int, blocks: int):
        ids = torch.zeros(b, dtype=torch.long, device=self.device)
        tokens = ids if self.model.has_embedding else self._hidden(b)
        scratch = self.scratch_block * self.block_size
        positions = torch.zeros(b, dtype=torch.long, device=self.device)
        slots = torch.full((b,), scratch, dtype=torch.long, device=self.device)
        keys = torch.full((b, blocks * self.block_size), scratch, dtype=torch.long, device=self.device)
        return b, tokens, positions, slots, keys

    def _hidden(self, n: int) -> torch.Tensor:
        dtype = next(self.model.parameters()).dtype
        return torch.zeros(n, self.model.config.hidden_size, dtype=dtype, device=self.device)

    def __call__(self, batch: StepBatch, input_ids: torch.Tensor | None, hidden: torch.Tensor | None):
        """The decode step of `batch` (decode-only, within the buckets): logits (B, V) or hidden (B, D)."""
        n = batch.num_tokens
        b = self.batch_buckets[bisect_left(self.batch_buckets, n) + (n == 1 and self.pad_batch1)]
        width = batch.decode_slots.shape[1] // self.block_size
        blocks = self.block_buckets[bisect_left(self.block_buckets, width)]
        scratch = self.scratch_block * self.block_size
        # Fresh inputs every step (inference tensors, as at warm-up: dynamo guards on that too).
        if self.model.has_embedding:
            tokens = torch.zeros(b, dtype=torch.long, device=self.device)
            tokens[:n] = input_ids
        else:
            tokens = self._hidden(b)
            tokens[:n] = hidden
        positions = torch.zeros(b, dtype=torch.long, device=self.device)
        positions[:n] = batch.positions
        slots = torch.full((b,), scratch, dtype=torch.long, device=self.device)
        slots[:n] = batch.slot_mapping
        keys = torch.full((b, blocks * self.block_size), scratch, dtype=torch.long, device=self.device)
        keys[:n] = 0  # masked: past every row's position
        keys[:n, : batch.decode_slots.shape[1]] = batch.decode_slots
        out = self._run_padded(b, tokens, positions, slots, keys)
        self.stats.compiled_steps += 1
        if self.model.has_head:
            return out[batch.logits_indices]  # (S, V): decode rows are rows 0..n-1 in chunk order
        return out[:n]

    def _run_padded(self, b: int, tokens, positions, slots, keys) -> torch.Tensor:
        if self.symbolic:
            for t in (tokens, positions, slots, keys):
                torch._dynamo.maybe_mark_dynamic(t, 0)
            torch._dynamo.maybe_mark_dynamic(keys, 1)
        return self._graph(tokens, positions, slots, keys)


def _collectives_between_graphs() -> None:
    """CUDA: TP collectives run eagerly between the graphs (dynamo breaks its graph at each; idempotent), so
    no NCCL call is captured in a CUDA graph. On CPU they are custom ops inside the graph (models.tp)."""
    for name in ("all_reduce", "all_gather"):
        method = getattr(TPRank, name)
        if not getattr(method, "_torchdynamo_disable", False):
            setattr(TPRank, name, torch.compiler.disable(method))


def _own_code(fn):
    """A copy of `fn` with a code object of its own. Dynamo keeps graphs per code object, and freezing bakes
    one model's weights into them: each CompiledDecode's graphs must never serve another model."""
    code = fn.__code__.replace(co_name=f"{fn.__name__}_{next(_INSTANCES)}")
    return types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)


_INSTANCES = itertools.count()


def _graph_count() -> int:
    """Graphs dynamo has produced in this process (each piece between graph breaks counts)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])
