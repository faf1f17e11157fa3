"""The parallel plan: tp, pp, ep, the layer range of each stage and the experts of each expert worker.

One validated dataclass used by the coordinator, the planner, the loader and the workers alike. It also
owns the shard arithmetic (which rows/columns/heads a TP rank holds) and the parameter count each worker
must end up holding, so a test can check what a worker loaded against a formula, not against itself.
Imports no torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from stagemesh.errors import PlanError
from stagemesh.models.config import ModelConfig

PLACEMENTS = ("contiguous", "round-robin")


@dataclass(frozen=True)
class LayoutOptions:
    """The choices that lay a model out over a mesh, as `stagemesh coordinator`, `stagemesh up` and the
    cluster description take them (ParallelPlan.build validates them against the model)."""

    model_dir: str
    tp: int = 1
    pp: int = 1
    ep: int = 0  # expert workers (MoE); 0 keeps the experts in the stages
    layers: str | None = None  # inclusive ranges per stage, "0-9,10-31", or "balanced"; None = an even split
    expert_placement: str = PLACEMENTS[0]
    expert_replicas: str | None = None  # "EXPERT=COPIES,..." or "all=COPIES"
    dtype: str = "float32"  # weights and activations on every worker (SERVING_DTYPES)

    def parallel_plan(self, config: ModelConfig) -> ParallelPlan:
        return ParallelPlan.build(
            config, self.tp, self.pp, self.ep, self.layers, self.expert_placement, self.expert_replicas
        )


@dataclass(frozen=True)
class ServingSpec:
    """What every worker of the mesh must agree on besides the plan."""

    model_dir: str
    dtype: str = "float32"
    block_size: int = 16
    max_model_len: int = 0  # 0 = the model's max_position_embeddings


@dataclass(frozen=True)
class MeshPlan:
    """What the coordinator tells every worker and the gateway: the parallel plan, the serving spec, and the
    model shapes both were checked against. It crosses the wire once each way (coordinator.wire)."""

    parallel: ParallelPlan
    spec: ServingSpec  # its max_model_len resolved: never 0
    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int

    @classmethod
    def of(cls, parallel: ParallelPlan, spec: ServingSpec, config: ModelConfig) -> MeshPlan:
        resolved = replace(spec, max_model_len=spec.max_model_len or config.max_position_embeddings)
        return cls(
            parallel, resolved, config.model_type, config.vocab_size, config.hidden_size, config.num_hidden_layers
        )


@dataclass(frozen=True)
class StageSpec:
    """One pipeline stage: layers [first_layer, end_layer) plus the embedding (first) or head (last)."""

    index: int
    first_layer: int
    end_layer: int
    has_embedding: bool
    has_head: bool

    @property
    def layers(self) -> range:
        return range(self.first_layer, self.end_layer)

    def describe(self) -> str:
        return f"{self.first_layer}-{self.end_layer - 1}"


@dataclass(frozen=True)
class ParallelPlan:
    """tp ranks per stage x pp stages, plus ep expert workers (0 keeps experts inside the stages)."""

    tp: int
    pp: int
    ep: int
    stages: tuple[StageSpec, ...]
    # expert_groups[w] = the expert ids expert worker w holds (the same ids in every MoE layer).
    expert_groups: tuple[tuple[int, ...], ...] = ()

    @classmethod
    def build(
        cls,
        config: ModelConfig,
        tp: int = 1,
        pp: int = 1,
        ep: int = 0,
        layers: str | list[tuple[int, int]] | None = None,
        placement: str = "contiguous",
        replicas: str | dict[int, int] | None = None,
    ) -> ParallelPlan:
        """Validates the layout against the model; raises PlanError naming the number that does not fit."""
        _check_degrees(config, tp, pp, ep)
        if layers == "balanced":
            ranges = balanced_split(config, tp, pp, ep)
        else:
            ranges = parse_layer_ranges(layers) if isinstance(layers, str) else layers
            ranges = _check_ranges(config, pp, ranges) if ranges else even_split(config.num_hidden_layers, pp)
        stages = tuple(
            StageSpec(i, a, b, has_embedding=i == 0, has_head=i == pp - 1) for i, (a, b) in enumerate(ranges)
        )
        groups: tuple[tuple[int, ...], ...] = ()
        if ep:
            copies = parse_replicas(replicas, config.num_local_experts) if isinstance(replicas, str) else replicas
            groups = place_experts(config.num_local_experts, ep, placement, copies or {})
        return cls(tp=tp, pp=pp, ep=ep, stages=stages, expert_groups=groups)

    def describe(self) -> str:
        text = f"tp={self.tp} pp={self.pp} layers={','.join(s.describe() for s in self.stages)}"
        if self.ep:
            text += f" ep={self.ep} experts=" + "|".join(",".join(map(str, g)) for g in self.expert_groups)
        return text

    def expert_owners(self, expert: int) -> list[int]:
        """The expert workers holding `expert`, in preference order."""
        return [w for w, group in enumerate(self.expert_groups) if expert in group]

    # ---- parameters each worker holds (the formula tests check loaded bytes against) ----

    def stage_param_count(self, config: ModelConfig, stage: int, rank: int) -> int:
        """Parameters held by TP rank `rank` of stage `stage`."""
        spec = self.stages[stage]
        count = len(spec.layers) * self._layer_param_count(config, rank)
        vocab_rows = len(range(*vocab_range(config.vocab_size, self.tp, rank)))
        if spec.has_embedding:
            count += vocab_rows * config.hidden_size
        if spec.has_head:
            count += config.hidden_size  # final norm
            shares_embedding = spec.has_embedding and config.tie_word_embeddings
            count += 0 if shares_embedding else vocab_rows * config.hidden_size
        return count

    def replicated_param_count(self, config: ModelConfig, stage: int) -> int:
        """Parameters every TP rank of a stage holds in full (norms, router, row-parallel biases)."""
        spec = self.stages[stage]
        per_layer = 2 * config.hidden_size + config.num_local_experts * config.hidden_size
        per_layer += config.hidden_size * (config.o_bias + config.mlp_bias)
        return len(spec.layers) * per_layer + (config.hidden_size if spec.has_head else 0)

    def expert_param_count(self, config: ModelConfig, worker: int) -> int:
        """Parameters expert worker `worker` holds: its experts' w1/w2/w3 in every layer."""
        per_expert = 3 * config.hidden_size * config.intermediate_size
        return len(self.expert_groups[worker]) * per_expert * config.num_hidden_layers

    def _layer_param_count(self, config: ModelConfig, rank: int) -> int:
        return layer_param_count(config, self.tp, self.ep)


def layer_param_count(config: ModelConfig, tp: int, ep: int) -> int:
    """Parameters of one decoder layer on one TP rank (experts excluded when expert workers hold them)."""
    h = config.hidden_size
    q_local = config.q_size // tp
    kv_local = kv_heads_per_rank(config, tp) * config.head_dim
    attn = h * (q_local + 2 * kv_local) + q_local * h
    attn += (q_local + 2 * kv_local) * config.qkv_bias + h * config.o_bias
    norms = 2 * h
    if not config.is_moe:
        inter = config.intermediate_size // tp
        return attn + norms + 3 * h * inter + (2 * inter + h) * config.mlp_bias
    router = config.num_local_experts * h
    experts = 0 if ep else config.num_local_experts * 3 * h * (config.intermediate_size // tp)
    return attn + norms + router + experts


# ---- shard arithmetic shared by the TP plan, the loader and the formula above ----


def shard_range(size: int, tp: int, rank: int) -> tuple[int, int]:
    """The [start, end) slice of a dimension of `size` that TP rank `rank` holds (size % tp == 0)."""
    step = size // tp
    return rank * step, (rank + 1) * step


def vocab_range(vocab: int, tp: int, rank: int) -> tuple[int, int]:
    """Vocabulary rows of a vocab-parallel embedding / LM head; ranks get ceil(V/tp), the last fewer."""
    step = math.ceil(vocab / tp)
    return min(vocab, rank * step), min(vocab, (rank + 1) * step)


def kv_heads_per_rank(config: ModelConfig, tp: int) -> int:
    """KV heads per rank: split when tp <= kv heads, else one head replicated over tp/kv ranks (vLLM)."""
    return max(1, config.num_key_value_heads // tp)


def kv_head_range(config: ModelConfig, tp: int, rank: int) -> tuple[int, int]:
    kv = config.num_key_value_heads
    if tp <= kv:
        return shard_range(kv, tp, rank)
    head = rank // (tp // kv)
    return head, head + 1


# ---- validation and parsing ----


def _check_degrees(config: ModelConfig, tp: int, pp: int, ep: int) -> None:
    if tp < 1 or pp < 1 or ep < 0:
        raise PlanError(f"degrees must be positive: tp={tp} pp={pp} ep={ep}")
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    if heads % tp:
        raise PlanError(f"num_attention_heads={heads} is not divisible by tp={tp}")
    if tp <= kv and kv % tp:
        raise PlanError(f"num_key_value_heads={kv} is not divisible by tp={tp}")
    if tp > kv and tp % kv:
        raise PlanError(f"tp={tp} is not a multiple of num_key_value_heads={kv} (KV heads are replicated only whole)")
    if config.intermediate_size % tp:
        raise PlanError(f"intermediate_size={config.intermediate_size} is not divisible by tp={tp}")
    if pp > config.num_hidden_layers:
        raise PlanError(f"pp={pp} exceeds num_hidden_layers={config.num_hidden_layers}: every stage needs a layer")
    if ep and not config.is_moe:
        raise PlanError(f"ep={ep} needs a mixture-of-experts checkpoint; this {config.model_type} has no experts")
    if ep > config.num_local_experts:
        raise PlanError(f"ep={ep} exceeds num_local_experts={config.num_local_experts}: a worker would hold none")


def even_split(layers: int, pp: int) -> list[tuple[int, int]]:
    """Contiguous ranges; the first layers % pp stages get one extra (the last stage also holds the head)."""
    base, extra = divmod(layers, pp)
    ranges, start = [], 0
    for s in range(pp):
        end = start + base + (s < extra)
        ranges.append((start, end))
        start = end
    return ranges


def balanced_split(config: ModelConfig, tp: int, pp: int, ep: int) -> list[tuple[int, int]]:
    """Contiguous ranges that minimise the largest stage's weights, the last stage's including the LM head
    it streams every step: it gets fewer layers. The other stages split the rest evenly."""
    layers, per_layer = config.num_hidden_layers, layer_param_count(config, tp, ep)
    head = config.vocab_size * config.hidden_size // tp
    best: tuple | None = None
    for last in range(1, layers - pp + 2):
        ranges = [*even_split(layers - last, pp - 1), (layers - last, layers)] if pp > 1 else [(0, layers)]
        largest = max((b - a) * per_layer + head * (i == pp - 1) for i, (a, b) in enumerate(ranges))
        key = (largest, abs(last - layers / pp))  # ties: the split closest to even
        if best is None or key < best[0]:
            best = (key, ranges)
    return best[1]


def parse_layer_ranges(text: str) -> list[tuple[int, int]]:
    """'0-9,10-31' (inclusive layer indices per stage) -> [(0, 10), (10, 32)]."""
    ranges = []
    for part in text.split(","):
        try:
            a, _, b = part.strip().partition("-")
            first, last = int(a), int(b or a)
        except ValueError:
            raise PlanError(f"--layers: {part!r} is not a range like 0-9") from None
        ranges.append((first, last + 1))
    return ranges


def _check_ranges(config: ModelConfig, pp: int, ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    if len(ranges) != pp:
        raise PlanError(f"--layers gives {len(ranges)} ranges for pp={pp}")
    expected = 0
    for a, b in ranges:
        if a != expected or b <= a:
            raise PlanError(f"--layers must be contiguous non-empty ranges from 0; {a}-{b - 1} breaks at {expected}")
        expected = b
    if expected != config.num_hidden_layers:
        raise PlanError(f"--layers covers {expected} layers; the model has {config.num_hidden_layers}")
    return ranges


def parse_replicas(text: str | None, num_experts: int) -> dict[int, int]:
    """'0=2,5=3' (expert=copies) or 'all=2' -> {expert: copies}."""
    copies: dict[int, int] = {}
    for part in (text or "").split(","):
        if not part.strip():
            continue
        name, _, count = part.partition("=")
        try:
            n = int(count)
            experts = range(num_experts) if name.strip() == "all" else [int(name)]
        except ValueError:
            raise PlanError(f"--expert-replicas: {part!r} is not EXPERT=COPIES or all=COPIES") from None
        for e in experts:
            if not 0 <= e < num_experts or n < 1:
                raise PlanError(f"--expert-replicas: expert {e} with {n} copies (experts 0-{num_experts - 1})")
            copies[e] = n
    return copies


def place_experts(num_experts: int, ep: int, placement: str, copies: dict[int, int]) -> tuple[tuple[int, ...], ...]:
    """Primary copy by contiguous blocks or round-robin; extra copies on the following workers."""
    if placement not in PLACEMENTS:
        raise PlanError(f"expert placement {placement!r}: choose one of {', '.join(PLACEMENTS)}")
    if placement == "contiguous":
        owner = [w for w, (a, b) in enumerate(even_split(num_experts, ep)) for _ in range(a, b)]
    else:
        owner = [e % ep for e in range(num_experts)]
    groups: list[set[int]] = [set() for _ in range(ep)]
    for expert, first in enumerate(owner):
        n = copies.get(expert, 1)
        if n > ep:
            raise PlanError(f"--expert-replicas: expert {expert} with {n} copies needs ep >= {n} (ep={ep})")
        for k in range(n):
            groups[(first + k) % ep].add(expert)
    return tuple(tuple(sorted(g)) for g in groups)
