"""The planner's view of a model: the sizes of its matrices (ModelShape) and the parameters each worker of
one layout holds (LayoutShards).

A served architecture (Llama, Mistral, Qwen2, Mixtral) is counted by `ParallelPlan` itself, so a prediction
is exactly what a worker loads. Other shapes (GPT-3: GELU MLP of two matrices, biases everywhere, learned
positions) are counted by a formula that follows the same sharding rules. Imports no torch.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from stagemesh.errors import PlanError
from stagemesh.models.config import ModelConfig
from stagemesh.models.plan import ParallelPlan, even_split, vocab_range


@dataclass(frozen=True)
class ModelShape:
    """Matrix sizes of a decoder-only transformer; counts are parameters, not bytes."""

    name: str
    layers: int
    hidden: int  # d_model
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int  # MLP width (of one expert for MoE)
    vocab: int
    max_context: int  # positions the model was trained for
    mlp_matrices: int = 3  # 3 = SwiGLU (gate, up, down); 2 = GELU (fc1, fc2)
    learned_positions: bool = False  # GPT: a (max_context, hidden) table beside the embedding
    biases: bool = False  # GPT: every linear and every LayerNorm has a bias
    experts: int = 0  # experts per MoE layer (0 = dense)
    experts_per_token: int = 0  # top-k
    tied: bool = False  # LM head shares the embedding (a copy on the last stage when pp > 1)
    config: ModelConfig | None = None  # a served architecture: counted by ParallelPlan
    scale: float = 1.0  # a bare size: every count scaled from the borrowed shape to the asked total
    borrowed_from: str = ""  # the published shape a bare size borrows

    @classmethod
    def from_config(cls, config: ModelConfig, name: str) -> ModelShape:
        return cls(
            name=name,
            layers=config.num_hidden_layers,
            hidden=config.hidden_size,
            heads=config.num_attention_heads,
            kv_heads=config.num_key_value_heads,
            head_dim=config.head_dim,
            intermediate=config.intermediate_size,
            vocab=config.vocab_size,
            max_context=config.max_position_embeddings,
            experts=config.num_local_experts,
            experts_per_token=config.num_experts_per_tok,
            tied=config.tie_word_embeddings,
            config=config,
        )

    @property
    def is_moe(self) -> bool:
        return self.experts > 0

    @property
    def total_params(self) -> float:
        """Every parameter once (experts included)."""
        return shard(self, 1, 1, 0).stage_params[0][0]

    @property
    def expert_params(self) -> int:
        """One expert of one layer."""
        return self.mlp_matrices * self.hidden * self.intermediate

    def kv_heads_per_rank(self, tp: int) -> int:
        """Split when tp <= KV heads, else one head replicated over tp / KV ranks (vLLM's rule)."""
        return max(1, self.kv_heads // tp)

    def kv_params_per_token(self, layers: int, tp: int) -> int:
        """K and V elements one token adds to one TP rank holding `layers` layers."""
        return layers * 2 * self.kv_heads_per_rank(tp) * self.head_dim

    def scaled_to(self, params: float, name: str) -> ModelShape:
        """This shape standing in for a model of exactly `params` parameters."""
        return dataclasses.replace(self, name=name, scale=params / self.total_params, borrowed_from=self.name)


@dataclass(frozen=True)
class LayoutShards:
    """Parameters (already scaled) each worker of a tp x pp (+ ep expert workers) layout holds."""

    tp: int
    pp: int
    ep: int
    stage_layers: tuple[int, ...]  # layers of each stage
    stage_params: tuple[tuple[float, ...], ...]  # [stage][rank] parameters held
    lookup_params: tuple[float, ...]  # [stage] tables only looked up (embedding rows, positions) on rank 0
    stage_expert_params: tuple[float, ...]  # [stage] expert weights per rank kept in the stage (ep=0)
    expert_groups: tuple[tuple[int, ...], ...]  # experts of each expert worker
    expert_worker_params: tuple[float, ...]  # [expert worker] parameters held


def shard(
    shape: ModelShape,
    tp: int,
    pp: int,
    ep: int = 0,
    ranges: list[tuple[int, int]] | None = None,
    expert_groups: tuple[tuple[int, ...], ...] | None = None,
) -> LayoutShards:
    """Validates the layout (PlanError names what does not divide) and counts every worker's parameters."""
    if shape.config is not None:
        return _shard_served(shape, tp, pp, ep, ranges, expert_groups)
    _check_degrees(shape, tp, pp, ep)
    ranges = ranges or even_split(shape.layers, pp)
    params = tuple(tuple(_stage_params(shape, tp, ranges, s, r) * shape.scale for r in range(tp)) for s in range(pp))
    return _shards(shape, tp, pp, ep, ranges, params, (), ())


def _shard_served(shape, tp, pp, ep, ranges, expert_groups) -> LayoutShards:
    config = shape.config
    plan = ParallelPlan.build(config, tp, pp, ep, layers=ranges)
    if expert_groups is not None:
        plan = dataclasses.replace(plan, expert_groups=tuple(expert_groups))
    params = tuple(tuple(plan.stage_param_count(config, s, r) * shape.scale for r in range(tp)) for s in range(pp))
    workers = tuple(plan.expert_param_count(config, w) * shape.scale for w in range(len(plan.expert_groups)))
    stage_ranges = [(s.first_layer, s.end_layer) for s in plan.stages]
    return _shards(shape, tp, pp, ep, stage_ranges, params, plan.expert_groups, workers)


def _shards(shape, tp, pp, ep, ranges, params, groups, workers) -> LayoutShards:
    layers = tuple(b - a for a, b in ranges)
    in_stage = 0 if ep else shape.experts * shape.expert_params // tp
    return LayoutShards(
        tp=tp,
        pp=pp,
        ep=ep,
        stage_layers=layers,
        stage_params=params,
        lookup_params=tuple(_lookup_params(shape, tp, pp) if s == 0 else 0.0 for s in range(pp)),
        stage_expert_params=tuple(n * in_stage * shape.scale for n in layers),
        expert_groups=tuple(groups),
        expert_worker_params=workers,
    )


def _lookup_params(shape: ModelShape, tp: int, pp: int) -> float:
    """Rank 0 of stage 0 reads only a batch's rows of these tables, unless the tied head also lives there."""
    rows = len(range(*vocab_range(shape.vocab, tp, 0)))
    embedding = 0 if shape.tied and pp == 1 else rows * shape.hidden
    positions = shape.max_context * shape.hidden if shape.learned_positions else 0
    return (embedding + positions) * shape.scale


# ---- the same sharding rules for dense shapes no worker serves (GPT-3) ----


def _layer_params(shape: ModelShape, tp: int) -> int:
    """One layer on one TP rank: q/k/v and fc1 (gate/up) split by columns, o and fc2 (down) by rows;
    row-parallel biases and the norms are whole on every rank."""
    h, bias = shape.hidden, int(shape.biases)
    q = shape.heads // tp * shape.head_dim
    kv = shape.kv_heads_per_rank(tp) * shape.head_dim
    attn = h * (q + 2 * kv) + q * h + bias * (q + 2 * kv + h)
    inter = shape.intermediate // tp
    mlp = shape.mlp_matrices * h * inter + bias * ((shape.mlp_matrices - 1) * inter + h)
    norms = 2 * h * (1 + bias)
    return attn + mlp + norms


def _stage_params(shape: ModelShape, tp: int, ranges: list[tuple[int, int]], stage: int, rank: int) -> int:
    first, last = stage == 0, stage == len(ranges) - 1
    a, b = ranges[stage]
    count = (b - a) * _layer_params(shape, tp)
    rows = len(range(*vocab_range(shape.vocab, tp, rank))) * shape.hidden
    if first:
        count += rows + (shape.max_context * shape.hidden if shape.learned_positions else 0)
    if last:
        count += shape.hidden * (1 + shape.biases)  # final norm
        count += 0 if shape.tied and first else rows
    return count


def _check_degrees(shape: ModelShape, tp: int, pp: int, ep: int) -> None:
    """The rules ParallelPlan applies to a served model, for a shape given by numbers."""
    if tp < 1 or pp < 1 or ep < 0:
        raise PlanError(f"degrees must be positive: tp={tp} pp={pp} ep={ep}")
    if shape.heads % tp:
        raise PlanError(f"num_attention_heads={shape.heads} is not divisible by tp={tp}")
    kv = shape.kv_heads
    if (tp <= kv and kv % tp) or (tp > kv and tp % kv):
        raise PlanError(f"num_key_value_heads={kv} and tp={tp}: neither divides the other")
    if shape.intermediate % tp:
        raise PlanError(f"intermediate_size={shape.intermediate} is not divisible by tp={tp}")
    if pp > shape.layers:
        raise PlanError(f"pp={pp} exceeds num_hidden_layers={shape.layers}: every stage needs a layer")
    if ep or shape.is_moe:
        raise PlanError(f"{shape.name}: a mixture-of-experts shape is counted from its config.json only")


def distinct_owners(groups: tuple[tuple[int, ...], ...], experts: int, top_k: int) -> float:
    """Expected expert workers one token's top-k experts fall on (uniform routing, no replicas)."""
    if not groups or not top_k:
        return 0.0
    miss = [math.comb(experts - len(g), top_k) / math.comb(experts, top_k) for g in groups]
    return sum(1 - m for m in miss)
