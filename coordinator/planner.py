"""The cost model behind `coordctl plan`: for every (tp, pp, ep) layout of a model on a set of GPUs, the
weights and KV cache each GPU holds, what one decode token costs in communication, the decode latency and
throughput that follow, and the recommendation. Pure functions over dataclasses, no I/O; every constant
it assumes is a field of `Assumptions` (docs/planning.md explains each).

Decode is modelled as memory-bound (FLOPs are not counted): a step of a micro-batch of b sequences costs,
on each stage, its weights streamed once from HBM, its KV cache read at the given context, its TP
collectives (ring all-reduce: 2(tp-1) steps moving 2(tp-1)/tp x the bytes), and host messages (gRPC hops
between stages and to expert workers, the gloo step broadcast to TP peers).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from stagemesh.coordinator.model_shape import LayoutShards, ModelShape, distinct_owners, shard
from stagemesh.errors import InvalidArgument, PlanError

OBJECTIVES = ("throughput", "latency")


@dataclass(frozen=True)
class Hardware:
    """The GPUs a plan may use; GPU i sits on node i // gpus_per_node."""

    gpus: int
    gpu_memory: float  # bytes per GPU
    gpus_per_node: int = 8
    hbm_bandwidth: float = 3.35e12  # bytes/s per GPU (H100 SXM)
    intra_bw: float = 450e9  # bytes/s per GPU inside a node (NVLink 4, one direction)
    inter_bw: float = 100e9  # bytes/s per GPU between nodes
    allow_cross_node_tp: bool = False

    def node(self, gpu: int) -> int:
        return gpu // self.gpus_per_node


@dataclass(frozen=True)
class Workload:
    dtype_bytes: int = 2  # weights, KV cache and activations
    batch: int = 1  # sequences decoding together
    context: int = 4096  # tokens of KV per sequence; every sequence is taken as full (the worst case)


@dataclass(frozen=True)
class Assumptions:
    """Constants of the model; each is stated and justified in docs/planning.md."""

    memory_reserve: float = 0.10  # of GPU memory kept for activations, CUDA context, NCCL buffers
    collective_base_s: float = 5e-6  # launch + synchronisation of one NCCL collective
    ring_step_intra_s: float = 0.5e-6  # latency of one ring step over NVLink
    ring_step_inter_s: float = 5e-6  # latency of one ring step over the network
    message_s: float = 100e-6  # one host message: a gRPC hop, an expert call, the gloo step broadcast


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    ep: int = 0

    def describe(self) -> str:
        return f"tp={self.tp} pp={self.pp}" + (f" ep={self.ep}" if self.ep else "")


@dataclass(frozen=True)
class Infeasible:
    layout: Layout
    reason: str


@dataclass(frozen=True)
class LayoutEstimate:
    """What one feasible layout costs. Bytes are per GPU unless said; per-token volumes are at batch 1."""

    layout: Layout
    weights_even: float  # bytes: all weights / GPUs (the M / (tp*pp) of a dense model)
    weights_max: float  # bytes on the fullest GPU (embedding / head stages, replicated norms and KV heads)
    fullest: str  # the worker holding weights_max
    kv_bytes_per_token: float  # KV one token adds on the GPU whose KV fills first
    kv_tokens: int  # tokens of KV every stage has room for
    kv_sequences: int  # sequences of `context` tokens
    allreduces_per_token: int  # layer all-reduces: 2 per layer (1 when expert workers hold the MLP)
    allgathers_per_token: int  # with expert workers and tp > 1: 1 per MoE layer (combined rows)
    allreduce_bytes_per_token: float  # sent by each GPU for those layer collectives
    edge_bytes_per_token: float  # sent by each GPU for the embedding all-reduce and the logits all-gather
    hop_bytes_per_token: float  # activations crossing the pp - 1 stage boundaries
    all_to_all_per_token: int  # expert exchanges: dispatch + combine per MoE layer
    all_to_all_bytes_per_token: float  # both ways, all MoE layers
    batch: int  # sequences decoding: --batch, capped by the KV capacity
    micro_batches: int  # in flight at once: min(pp, batch)
    latency_s: float  # between two tokens of one sequence
    throughput: float  # tokens/s over the batch
    breakdown: dict[str, float] = field(default_factory=dict)  # seconds on one micro-batch's path, by part


@dataclass(frozen=True)
class PlanResult:
    shape: ModelShape
    hardware: Hardware
    workload: Workload
    assumptions: Assumptions
    objective: str
    estimates: tuple[LayoutEstimate, ...]  # feasible layouts, best first
    infeasible: tuple[Infeasible, ...]
    reason: str  # why estimates[0] is recommended

    @property
    def recommended(self) -> LayoutEstimate:
        return self.estimates[0]


# ---- enumerating and ranking layouts ----


def candidate_layouts(shape: ModelShape, gpus: int) -> list[Layout]:
    """Every way to use all `gpus`: tp x pp stage GPUs plus ep expert workers (MoE only)."""
    layouts = []
    for ep in range(0, min(shape.experts, gpus - 1) + 1):
        stage_gpus = gpus - ep
        layouts += [Layout(tp, stage_gpus // tp, ep) for tp in range(stage_gpus, 0, -1) if stage_gpus % tp == 0]
    return layouts


def plan(
    shape: ModelShape, hw: Hardware, wl: Workload, objective: str = "throughput", a: Assumptions = Assumptions()
) -> PlanResult:
    """Estimates every layout; PlanError when none can run."""
    check_inputs(shape, hw, wl, objective)
    results = [evaluate(shape, hw, wl, layout, a) for layout in candidate_layouts(shape, hw.gpus)]
    feasible = sorted((r for r in results if isinstance(r, LayoutEstimate)), key=_rank_key(objective))
    infeasible = tuple(r for r in results if isinstance(r, Infeasible))
    if not feasible:
        raise PlanError(_nothing_runs(shape, hw, infeasible))
    return PlanResult(
        shape, hw, wl, a, objective, tuple(feasible), infeasible, recommendation_reason(feasible, objective, wl)
    )


def check_inputs(shape: ModelShape, hw: Hardware, wl: Workload, objective: str) -> None:
    if hw.gpus < 1:
        raise InvalidArgument(f"--gpus must be at least 1 (got {hw.gpus})")
    if hw.gpus_per_node < 1:
        raise InvalidArgument(f"--gpus-per-node must be at least 1 (got {hw.gpus_per_node})")
    for name, value in (
        ("--gpu-memory", hw.gpu_memory),
        ("--hbm-bandwidth", hw.hbm_bandwidth),
        ("--intra-bw", hw.intra_bw),
        ("--inter-bw", hw.inter_bw),
    ):
        if value <= 0:
            raise InvalidArgument(f"{name} must be positive (got {value:g})")
    if wl.batch < 1:
        raise InvalidArgument(f"--batch must be at least 1 (got {wl.batch})")
    if not 1 <= wl.context <= shape.max_context:
        raise InvalidArgument(f"--context {wl.context} is outside 1..{shape.max_context}, {shape.name}'s positions")
    if objective not in OBJECTIVES:
        raise InvalidArgument(f"objective {objective!r}: choose one of {', '.join(OBJECTIVES)}")


def _rank_key(objective: str):
    if objective == "latency":
        return lambda e: (e.latency_s, -e.throughput, e.weights_max)
    return lambda e: (-e.throughput, e.latency_s, e.weights_max)


def _nothing_runs(shape: ModelShape, hw: Hardware, infeasible: tuple[Infeasible, ...]) -> str:
    shown = "; ".join(f"{i.layout.describe()}: {i.reason}" for i in infeasible[:4])
    more = f"; and {len(infeasible) - 4} more" if len(infeasible) > 4 else ""
    return f"no layout of {shape.name} can use {hw.gpus} GPU(s) of {hw.gpu_memory / 1e9:.2f} GB: {shown}{more}"


def recommendation_reason(ranked: list[LayoutEstimate], objective: str, wl: Workload) -> str:
    best = ranked[0]
    text = (
        f"{best.layout.describe()} has the {'lowest' if objective == 'latency' else 'highest'} estimated "
        f"{objective} at batch {wl.batch}: {best.throughput:.1f} tokens/s, {best.latency_s * 1e3:.2f} ms per token"
    )
    if len(ranked) > 1:
        other = ranked[1]
        ratio = other.latency_s / best.latency_s if objective == "latency" else best.throughput / other.throughput
        text += f" ({ratio:.2f}x the next best, {other.layout.describe()}: {other.throughput:.1f} tokens/s)"
    parts = ", ".join(f"{name} {seconds * 1e3:.2f} ms" for name, seconds in best.breakdown.items() if seconds > 0)
    return f"{text}; one step of a micro-batch spends {parts}"


# ---- one layout ----


def evaluate(
    shape: ModelShape, hw: Hardware, wl: Workload, layout: Layout, a: Assumptions
) -> LayoutEstimate | Infeasible:
    """The estimate of one layout, or why it cannot run."""
    try:
        shards = shard(shape, layout.tp, layout.pp, layout.ep)
    except PlanError as e:
        return Infeasible(layout, str(e))
    return estimate(LayoutCost(shape, hw, wl, a, shards))


def estimate(cost: LayoutCost) -> LayoutEstimate | Infeasible:
    """Memory, KV room, communication and time of one validated layout, or why the hardware cannot run it."""
    problem = cost.problem()
    if problem:
        return Infeasible(cost.layout, problem)
    tokens, limiting = cost.kv_capacity()
    wl, sh = cost.wl, cost.shards
    batch = min(wl.batch, tokens // wl.context)
    m = min(sh.pp, batch)
    b = math.ceil(batch / m)
    latency = cost.round_time(m, b)
    fullest, weights_max = cost.fullest()
    return LayoutEstimate(
        layout=cost.layout,
        weights_even=cost.shape.total_params * wl.dtype_bytes / cost.hw.gpus,
        weights_max=weights_max,
        fullest=fullest,
        kv_bytes_per_token=cost.kv_bytes_per_token(limiting),
        kv_tokens=tokens,
        kv_sequences=tokens // wl.context,
        **cost.volumes_per_token(),
        batch=batch,
        micro_batches=m,
        latency_s=latency,
        throughput=batch / latency,
        breakdown=cost.breakdown(b),
    )


@dataclass(frozen=True)
class LayoutCost:
    """One layout on given hardware. Stage s, rank r runs on GPU s*tp + r; expert worker w on tp*pp + w."""

    shape: ModelShape
    hw: Hardware
    wl: Workload
    a: Assumptions
    shards: LayoutShards

    @property
    def layout(self) -> Layout:
        return Layout(self.shards.tp, self.shards.pp, self.shards.ep)

    # ---- memory ----

    @property
    def usable_memory(self) -> float:
        return self.hw.gpu_memory * (1 - self.a.memory_reserve)

    def stage_weights(self, s: int) -> float:
        """Bytes on the fullest rank of stage s."""
        return max(self.shards.stage_params[s]) * self.wl.dtype_bytes

    def workers(self) -> list[tuple[str, float]]:
        """(worker, weight bytes) for every GPU of the layout."""
        dt, sh = self.wl.dtype_bytes, self.shards
        stages = [
            (f"stage {s} rank {r}", p * dt) for s, ranks in enumerate(sh.stage_params) for r, p in enumerate(ranks)
        ]
        return stages + [(f"expert worker {w}", p * dt) for w, p in enumerate(sh.expert_worker_params)]

    def fullest(self) -> tuple[str, float]:
        return max(self.workers(), key=lambda w: w[1])

    def kv_bytes_per_token(self, s: int) -> float:
        return self.shape.kv_params_per_token(self.shards.stage_layers[s], self.shards.tp) * self.wl.dtype_bytes

    def kv_capacity(self) -> tuple[int, int]:
        """(tokens of KV every stage has room for, the stage that limits it)."""
        stages = range(self.shards.pp)
        room = [(self.usable_memory - self.stage_weights(s)) / self.kv_bytes_per_token(s) for s in stages]
        limiting = min(range(len(room)), key=room.__getitem__)
        return max(0, math.floor(room[limiting])), limiting

    def problem(self) -> str:
        """Why this layout cannot run on the hardware ("" when it can)."""
        tp, hw = self.shards.tp, self.hw
        if not hw.allow_cross_node_tp and any(self._tp_crosses_nodes(s) for s in range(self.shards.pp)):
            return f"tp={tp} spans nodes of {hw.gpus_per_node} GPUs (--allow-cross-node-tp to consider it)"
        name, weights = self.fullest()
        if weights > self.usable_memory:
            return (
                f"does not fit: {name} needs {weights / 1e9:.2f} GB of weights > {self.usable_memory / 1e9:.2f} GB "
                f"usable ({hw.gpu_memory / 1e9:.2f} GB less the {self.a.memory_reserve:.0%} reserve)"
            )
        tokens, s = self.kv_capacity()
        if tokens < self.wl.context:
            need = self.wl.context * self.kv_bytes_per_token(s)
            left = self.usable_memory - self.stage_weights(s)
            return (
                f"no room for one sequence: stage {s} has {left / 1e9:.2f} GB left for KV, "
                f"{self.wl.context} tokens need {need / 1e9:.2f} GB"
            )
        return ""

    # ---- placement ----

    def _leader_gpu(self, s: int) -> int:
        return s * self.shards.tp

    def _tp_crosses_nodes(self, s: int) -> bool:
        first = self._leader_gpu(s)
        return self.hw.node(first) != self.hw.node(first + self.shards.tp - 1)

    def _link(self, crosses: bool) -> tuple[float, float]:
        """(bytes/s, ring-step latency in s) of the intra- or inter-node link."""
        if crosses:
            return self.hw.inter_bw, self.a.ring_step_inter_s
        return self.hw.intra_bw, self.a.ring_step_intra_s

    def _experts_cross_nodes(self, s: int) -> bool:
        first = self.shards.tp * self.shards.pp
        leader = self.hw.node(self._leader_gpu(s))
        return any(self.hw.node(first + w) != leader for w in range(self.shards.ep))

    # ---- communication ----

    def layer_collectives(self, s: int, b: int) -> list[tuple[str, int, float]]:
        """(kind, count, bytes each) of stage s's per-layer TP collectives for a micro-batch of b."""
        if self.shards.tp == 1:
            return []
        n, act = self.shards.stage_layers[s], b * self.shape.hidden * self.wl.dtype_bytes
        if self.shards.ep:  # attention all-reduce; the MoE output is all-gathered (each rank dispatched rows)
            return [("all-reduce", n, act), ("all-gather", n, act)]
        return [("all-reduce", 2 * n, act)]

    def edge_collectives(self, s: int, b: int) -> list[tuple[str, int, float]]:
        """The vocab-parallel embedding's all-reduce (stage 0) and the logits all-gather (last stage)."""
        tp, dt, sh = self.shards.tp, self.wl.dtype_bytes, self.shape
        if tp == 1:
            return []
        edges = [("all-reduce", 1, b * sh.hidden * dt)] if s == 0 else []
        if s == self.shards.pp - 1:
            edges.append(("all-gather", 1, b * math.ceil(sh.vocab / tp) * tp * dt))
        return edges

    def collective_time(self, kind: str, nbytes: float, s: int) -> float:
        tp = self.shards.tp
        bw, step = self._link(self._tp_crosses_nodes(s))
        steps, share = (2 * (tp - 1), 2 * (tp - 1) / tp) if kind == "all-reduce" else (tp - 1, (tp - 1) / tp)
        return self.a.collective_base_s + steps * step + share * nbytes / bw

    def collective_volume(self, kind: str, nbytes: float) -> float:
        """Bytes one GPU sends: a ring all-reduce 2(tp-1)/tp x, an all-gather (tp-1)/tp x the full size."""
        tp = self.shards.tp
        return (2 if kind == "all-reduce" else 1) * (tp - 1) / tp * nbytes

    def owners_per_token(self) -> float:
        return distinct_owners(self.shards.expert_groups, self.shape.experts, self.shape.experts_per_token)

    def volumes_per_token(self) -> dict:
        """Counts and bytes of one token's communication (batch 1), by kind."""
        sh, pp = self.shards, self.shards.pp
        layer = [c for s in range(pp) for c in self.layer_collectives(s, 1)]
        edges = [c for s in range(pp) for c in self.edge_collectives(s, 1)]
        act = self.shape.hidden * self.wl.dtype_bytes
        exchanges = 2 * self.shape.layers if sh.ep else 0
        return dict(
            allreduces_per_token=sum(n for kind, n, _ in layer if kind == "all-reduce"),
            allgathers_per_token=sum(n for kind, n, _ in layer if kind == "all-gather"),
            allreduce_bytes_per_token=sum(n * self.collective_volume(k, x) for k, n, x in layer),
            edge_bytes_per_token=sum(n * self.collective_volume(k, x) for k, n, x in edges),
            hop_bytes_per_token=(pp - 1) * act,
            all_to_all_per_token=exchanges,
            all_to_all_bytes_per_token=exchanges * self.owners_per_token() * act,
        )

    # ---- time ----

    def touched(self, b: int) -> float:
        """Expected fraction of one layer's experts that b tokens route to (uniform top-k routing)."""
        if not self.shape.is_moe:
            return 1.0
        return 1 - (1 - self.shape.experts_per_token / self.shape.experts) ** b

    def expert_layer_time(self, b: int) -> float:
        """One MoE layer on the busiest expert worker: the experts b tokens touch, streamed from HBM."""
        per_expert = self.shape.expert_params * self.shape.scale * self.wl.dtype_bytes
        most = max((len(g) for g in self.shards.expert_groups), default=0)
        return most * self.touched(b) * per_expert / self.hw.hbm_bandwidth

    def stage_parts(self, s: int, b: int) -> dict[str, float]:
        """Seconds stage s spends on one step of a micro-batch of b sequences, by part."""
        sh, dt, hbm, a = self.shards, self.wl.dtype_bytes, self.hw.hbm_bandwidth, self.a
        untouched = sh.stage_expert_params[s] * (1 - self.touched(b))
        streamed = (max(sh.stage_params[s]) - sh.lookup_params[s] - untouched) * dt
        kv = b * self.wl.context * self.kv_bytes_per_token(s)
        collectives = self.layer_collectives(s, b) + self.edge_collectives(s, b)
        tp_time = sum(n * self.collective_time(kind, x, s) for kind, n, x in collectives)
        if sh.tp > 1:  # the leader's gloo broadcast of the step to its peers
            tp_time += a.message_s + b * self.shape.hidden * dt / self._link(self._tp_crosses_nodes(s))[0]
        return {"weights": streamed / hbm, "kv": kv / hbm, "tp": tp_time, "experts": self._expert_time(s, b)}

    def _expert_time(self, s: int, b: int) -> float:
        """Dispatch + combine to the expert workers and their compute, for every MoE layer of stage s."""
        if not self.shards.ep:
            return 0.0
        bw = self._link(self._experts_cross_nodes(s))[0]
        dt, tp = self.wl.dtype_bytes, self.shards.tp
        exchange = self.a.message_s + b * self.owners_per_token() * self.shape.hidden * dt / tp / bw
        return self.shards.stage_layers[s] * (2 * exchange + self.expert_layer_time(b))

    def hop_time(self, s: int, b: int) -> float:
        """Stage s's leader sends b activations to stage s + 1's leader over gRPC."""
        crosses = self.hw.node(self._leader_gpu(s)) != self.hw.node(self._leader_gpu(s + 1))
        return self.a.message_s + b * self.shape.hidden * self.wl.dtype_bytes / self._link(crosses)[0]

    def breakdown(self, b: int) -> dict[str, float]:
        """One micro-batch's path through every stage, by part; "messages" = stage hops + the gateway's 2."""
        parts = {"weights": 0.0, "kv": 0.0, "tp": 0.0, "experts": 0.0}
        for s in range(self.shards.pp):
            for name, seconds in self.stage_parts(s, b).items():
                parts[name] += seconds
        hops = sum(self.hop_time(s, b) for s in range(self.shards.pp - 1))
        return {**parts, "messages": hops + 2 * self.a.message_s}

    def round_time(self, m: int, b: int) -> float:
        """Seconds between two tokens of a sequence with m micro-batches of b in flight: the longest of one
        micro-batch's path, the busiest stage serving all m, and the expert workers serving all m."""
        path = sum(self.breakdown(b).values())
        busiest = max(sum(self.stage_parts(s, b).values()) for s in range(self.shards.pp))
        experts = self.shape.layers * self.expert_layer_time(b) if self.shards.ep else 0.0
        return max(path, m * busiest, m * experts)
