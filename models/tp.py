"""Tensor parallelism as a plan applied to a built model (gpt-fast's tp.py habit).

`TP_PLAN` says which projections are column-parallel (split by output rows) and which are row-parallel
(split by input columns, then one all-reduce), and which checkpoint tensors each fused projection is
made of. `apply_tensor_parallel` reshapes a (meta-device) model to one rank's shards and adds the
collectives; `models.loader` fills those shards from the checkpoint with the same arithmetic.
Per layer that is 2 all-reduces (after o_proj and after the MLP or MoE block); the embedding adds one
all-reduce and the vocab-split LM head one all-gather per step.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.distributed as dist
import torch.nn.functional as F
from stagemesh.errors import CollectiveError
from stagemesh.models.config import ModelConfig, hf_shape
from stagemesh.models.layers import Experts
from stagemesh.models.plan import kv_head_range, kv_heads_per_rank, shard_range, vocab_range
from stagemesh.models.transformer import Transformer
from torch import nn

COLWISE, ROWWISE = "colwise", "rowwise"

# Module path inside a decoder layer -> (style, checkpoint tensors it is made of, concatenated by rows).
TP_PLAN: dict[str, tuple[str, tuple[str, ...]]] = {
    "self_attn.qkv_proj": (COLWISE, ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    "self_attn.o_proj": (ROWWISE, ("self_attn.o_proj",)),
    "mlp.gate_up_proj": (COLWISE, ("mlp.gate_proj", "mlp.up_proj")),
    "mlp.down_proj": (ROWWISE, ("mlp.down_proj",)),
}
# Mixtral experts: w13 = [w1; w3] column-parallel per expert, w2 row-parallel, all-reduce after the block.
MOE_TP_PLAN: dict[str, tuple[str, tuple[str, ...]]] = {
    "mlp.experts.w13": (COLWISE, ("w1", "w3")),
    "mlp.experts.w2": (ROWWISE, ("w2",)),
}


class Collectives(Protocol):
    """How a TP group's tensors travel: stage_worker.tp_group.TPGroup (shared memory or a process group,
    re-formed in place when a rank is replaced) or ProcessGroupCollectives (plain torch.distributed)."""

    def all_reduce(self, t: torch.Tensor) -> None: ...

    def all_gather(self, t: torch.Tensor) -> list[torch.Tensor]: ...  # new tensors, one per rank


@dataclass(frozen=True)
class TPRank:
    """Where this process sits in its stage's TP group; its collectives go through `comm` (None at size 1).
    Every rank of a group makes the same calls in the same order. Eagerly they call `comm` directly; traced
    by torch.compile they become the custom ops `stagemesh::all_reduce` / `all_gather`, which name `comm` by
    a number, so a compiled decode step is one graph with the collectives inside (vLLM's habit)."""

    rank: int = 0
    size: int = 1
    comm: Collectives | None = None
    group: int = field(default=-1, init=False, compare=False)  # comm's number in _GROUPS

    def __post_init__(self) -> None:
        if self.comm is not None:
            object.__setattr__(self, "group", _register(self.comm))

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """The sum over the group of `t`: eagerly `t` itself, summed in place."""
        if torch.compiler.is_compiling():
            return torch.ops.stagemesh.all_reduce(t, self.group)
        self.comm.all_reduce(t)
        return t

    def all_gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        if torch.compiler.is_compiling():
            return torch.ops.stagemesh.all_gather(t, self.group, self.size)
        return self.comm.all_gather(t)


_GROUPS: list[Collectives] = []  # a compiled graph names a group by its index here


def _register(comm: Collectives) -> int:
    for i, known in enumerate(_GROUPS):
        if known is comm:
            return i
    _GROUPS.append(comm)
    return len(_GROUPS) - 1


@torch.library.custom_op("stagemesh::all_reduce", mutates_args=())
def _all_reduce_op(t: torch.Tensor, group: int) -> torch.Tensor:
    out = t.clone()  # functional: inductor may reuse `t` elsewhere in the graph
    _GROUPS[group].all_reduce(out)
    return out


@_all_reduce_op.register_fake
def _(t: torch.Tensor, group: int) -> torch.Tensor:
    return torch.empty_like(t)


@torch.library.custom_op("stagemesh::all_gather", mutates_args=())
def _all_gather_op(t: torch.Tensor, group: int, size: int) -> list[torch.Tensor]:
    return _GROUPS[group].all_gather(t)


@_all_gather_op.register_fake
def _(t: torch.Tensor, group: int, size: int) -> list[torch.Tensor]:
    return [torch.empty_like(t) for _ in range(size)]


class ProcessGroupCollectives:
    """torch.distributed on `group` (None: the default group), for ranks set up outside a stage worker."""

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        self.group = group

    def all_reduce(self, t: torch.Tensor) -> None:
        with collective("all-reduce"):
            dist.all_reduce(t, group=self.group)

    def all_gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        parts = [torch.empty_like(t) for _ in range(dist.get_world_size(self.group))]
        with collective("all-gather"):
            dist.all_gather(parts, t, group=self.group)
        return parts


@contextlib.contextmanager
def collective(name: str):
    """Around one torch.distributed call: whatever it raises (gloo's RuntimeError, NCCL's DistBackendError)
    means the group is gone, and becomes CollectiveError; nothing else is caught."""
    try:
        yield
    except RuntimeError as e:
        raise CollectiveError(f"{name} failed: {e}") from e


def part_rows(config: ModelConfig, part: str, tp: int, rank: int) -> tuple[int, int]:
    """Output rows of checkpoint tensor `part` (a column-parallel piece) that `rank` holds: whole KV heads
    (replicated when tp exceeds them), else an even split of the tensor's rows."""
    if part.endswith(("k_proj", "v_proj")):
        first, last = kv_head_range(config, tp, rank)
        return first * config.head_dim, last * config.head_dim
    return shard_range(hf_shape(config, f"{part}.weight")[0], tp, rank)


def row_parallel_cols(config: ModelConfig, part: str, tp: int, rank: int) -> tuple[int, int]:
    """Input columns of row-parallel checkpoint tensor `part` that `rank` holds (whole heads for o_proj)."""
    return shard_range(hf_shape(config, f"{part}.weight")[1], tp, rank)


def _width(span: tuple[int, int]) -> int:
    return span[1] - span[0]


def apply_tensor_parallel(model: Transformer, tp: TPRank) -> None:
    """Reshapes `model` to rank tp.rank's shards (values are filled by the loader) and adds collectives:
    every module TP_PLAN names is made column- or row-parallel from its checkpoint parts, nothing else."""
    if tp.size == 1:
        return
    config = model.config
    for layer in model.layers.values():
        for path, (style, parts) in TP_PLAN.items():
            module = _submodule(layer, path)
            if module is None:  # e.g. mlp.gate_up_proj in a MoE layer
                continue
            if style == COLWISE:
                _resize_linear(module, out_features=sum(_width(part_rows(config, p, tp.size, tp.rank)) for p in parts))
            else:
                _make_row_parallel(module, _width(row_parallel_cols(config, parts[0], tp.size, tp.rank)), tp)
        attn = layer.self_attn
        attn.n_heads //= tp.size
        attn.n_kv_heads = kv_heads_per_rank(config, tp.size)
        if config.is_moe and isinstance(layer.mlp.experts, Experts):  # remote experts gather their own results
            _shard_experts(layer.mlp, config, tp)
    if model.has_embedding:
        embed = VocabParallelEmbedding(config.vocab_size, config.hidden_size, tp)
        model.embed_tokens = embed
    if model.has_head:
        head = VocabParallelHead(config.vocab_size, config.hidden_size, tp)
        if model.has_embedding and config.tie_word_embeddings:
            head.weight = model.embed_tokens.weight
        model.lm_head = head


def _submodule(layer: nn.Module, path: str) -> nn.Module | None:
    try:
        return layer.get_submodule(path)
    except AttributeError:
        return None


def _shard_experts(mlp: nn.Module, config: ModelConfig, tp: TPRank) -> None:
    """MOE_TP_PLAN per expert: w13 = [w1; w3] column-parallel, w2 row-parallel, one all-reduce after the block."""
    experts, held = mlp.experts, len(mlp.experts.expert_ids)
    for path, (style, parts) in MOE_TP_PLAN.items():
        name = path.rsplit(".", 1)[1]
        if style == COLWISE:
            rows = sum(_width(part_rows(config, p, tp.size, tp.rank)) for p in parts)
            shape = (held, rows, config.hidden_size)
        else:
            shape = (held, config.hidden_size, _width(row_parallel_cols(config, parts[0], tp.size, tp.rank)))
        setattr(experts, name, nn.Parameter(torch.empty(shape)))
    mlp.register_forward_hook(_all_reduce_hook(tp))


def _resize_linear(linear: nn.Linear, out_features: int | None = None, in_features: int | None = None) -> None:
    out_features = out_features or linear.out_features
    in_features = in_features or linear.in_features
    linear.weight = nn.Parameter(torch.empty(out_features, in_features))
    if linear.bias is not None:
        linear.bias = nn.Parameter(torch.empty(out_features))
    linear.out_features, linear.in_features = out_features, in_features


def _make_row_parallel(linear: nn.Linear, in_features: int, tp: TPRank) -> None:
    """Split by input columns; partial outputs are summed by one all-reduce, then the bias is added once."""
    has_bias = linear.bias is not None
    linear.bias = None
    _resize_linear(linear, in_features=in_features)
    if has_bias:
        linear.row_bias = nn.Parameter(torch.empty(linear.out_features))
    linear.register_forward_hook(_all_reduce_hook(tp, with_bias=has_bias))


def _all_reduce_hook(tp: TPRank, with_bias: bool = False):
    def hook(module: nn.Module, _inputs, output: torch.Tensor) -> torch.Tensor:
        output = tp.all_reduce(output)
        return output + module.row_bias if with_bias else output

    return hook


class VocabParallelEmbedding(nn.Module):
    """Each rank holds vocab rows [start, end); ids outside contribute zeros; one all-reduce sums them."""

    def __init__(self, vocab: int, hidden: int, tp: TPRank) -> None:
        super().__init__()
        self.start, self.end = vocab_range(vocab, tp.size, tp.rank)
        self.weight = nn.Parameter(torch.empty(self.end - self.start, hidden))
        self.tp = tp

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start  # (N,)
        outside = (local < 0) | (local >= self.end - self.start)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)  # (N, D)
        out.masked_fill_(outside[:, None], 0)
        return self.tp.all_reduce(out)


class VocabParallelHead(nn.Module):
    """LM head split by vocab rows; the logits are all-gathered so every rank ends with (S, V)."""

    def __init__(self, vocab: int, hidden: int, tp: TPRank) -> None:
        super().__init__()
        self.vocab = vocab
        self.rows_per_rank = vocab_range(vocab, tp.size, 0)[1]
        start, end = vocab_range(vocab, tp.size, tp.rank)
        self.weight = nn.Parameter(torch.empty(end - start, hidden))
        self.tp = tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        local = F.linear(x, self.weight)  # (S, V_local)
        local = F.pad(local, (0, self.rows_per_rank - local.shape[1])).contiguous()  # (S, ceil(V/tp))
        return torch.cat(self.tp.all_gather(local), dim=-1)[:, : self.vocab]  # (S, V)
