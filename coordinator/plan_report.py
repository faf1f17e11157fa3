"""`coordctl plan` around the cost model: turns the command's options (or a running cluster's workers)
into planner inputs, the PlanResult into one JSON-able dict, and that dict into rich tables."""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass

from stagemesh.coordinator.model_presets import resolve_model
from stagemesh.coordinator.model_shape import ModelShape, shard
from stagemesh.coordinator.planner import (
    Assumptions,
    Hardware,
    LayoutCost,
    LayoutEstimate,
    PlanResult,
    Workload,
    estimate,
    plan,
)
from stagemesh.errors import FailedPrecondition, InvalidArgument
from stagemesh.models.dtypes import PLANNING_DTYPES, lookup
from stagemesh.models.plan import MeshPlan
from stagemesh.units import format_bytes, parse_bandwidth, parse_bytes

DEFAULT_CONTEXT = 4096  # tokens, capped at the model's positions


@dataclass(frozen=True)
class PlanRequest:
    """The options of `coordctl plan`, as typed."""

    model: str | None = None  # checkpoint dir, preset or bare size; with --from-cluster: the dir on this host
    from_cluster: str | None = None  # coordinator HOST:PORT
    gpus: int | None = None
    gpus_per_node: int | None = None  # default 8 (from a cluster: workers per hostname)
    gpu_memory: str | None = None  # default from a cluster: the smallest worker memory
    hbm_bandwidth: str = "3.35TB/s"
    intra_bw: str = "450GB/s"
    inter_bw: str = "100GB/s"
    dtype: str | None = None  # default bf16 (from a cluster: the mesh's)
    batch: int = 1
    context: int | None = None
    objective: str = "throughput"
    allow_cross_node_tp: bool = False
    timeout: float = 5.0  # seconds to wait for the coordinator


def build_report(req: PlanRequest) -> dict:
    """The plan as one JSON-able dict; with --from-cluster also the running layout checked against it."""
    if req.from_cluster:
        return _cluster_report(req)
    if req.model is None:
        raise InvalidArgument("give --model DIR|PRESET|SIZE or --from-cluster HOST:PORT")
    if req.gpus is None or req.gpu_memory is None:
        raise InvalidArgument("--model needs --gpus N and --gpu-memory SIZE (e.g. --gpus 8 --gpu-memory 80GB)")
    shape = resolve_model(req.model)
    per_node = 8 if req.gpus_per_node is None else req.gpus_per_node
    hw = _hardware(req, req.gpus, parse_bytes(req.gpu_memory, "--gpu-memory"), per_node)
    return result_dict(plan(shape, hw, _workload(req, shape, req.dtype or "bf16"), req.objective))


def _hardware(req: PlanRequest, gpus: int, memory: float, per_node: int) -> Hardware:
    return Hardware(
        gpus=gpus,
        gpu_memory=memory,
        gpus_per_node=per_node,
        hbm_bandwidth=parse_bandwidth(req.hbm_bandwidth, "--hbm-bandwidth"),
        intra_bw=parse_bandwidth(req.intra_bw, "--intra-bw"),
        inter_bw=parse_bandwidth(req.inter_bw, "--inter-bw"),
        allow_cross_node_tp=req.allow_cross_node_tp,
    )


def _workload(req: PlanRequest, shape: ModelShape, dtype: str) -> Workload:
    if dtype.lower() not in PLANNING_DTYPES:
        raise InvalidArgument(f"--dtype {dtype!r}: choose one of {', '.join(PLANNING_DTYPES)}")
    context = req.context if req.context is not None else min(DEFAULT_CONTEXT, shape.max_context)
    return Workload(dtype_bytes=lookup(dtype).bytes, batch=req.batch, context=context)


# ---- a running cluster ----


def _cluster_report(req: PlanRequest) -> dict:
    """Plans for the registered workers (their count, memory, hosts) and the mesh's own model and dtype."""
    from stagemesh.coordinator.client import cluster_status
    from stagemesh.coordinator.wire import plan_from_message

    if req.gpus is not None:
        raise InvalidArgument("--from-cluster counts the registered workers; leave out --gpus")
    status = cluster_status(req.from_cluster, req.timeout)
    workers, mesh = list(status.workers), plan_from_message(status.topology.plan)
    if not workers:
        raise FailedPrecondition(f"no workers are registered at {req.from_cluster}")
    shape = resolve_model(req.model or mesh.spec.model_dir)
    memory = parse_bytes(req.gpu_memory, "--gpu-memory") if req.gpu_memory else min(w.memory_bytes for w in workers)
    per_host = max(Counter(w.hostname for w in workers).values())
    per_node = per_host if req.gpus_per_node is None else req.gpus_per_node
    hw, wl = _hardware(req, len(workers), memory, per_node), _workload(req, shape, req.dtype or mesh.spec.dtype)
    report = result_dict(plan(shape, hw, wl, req.objective))
    report["cluster"] = cluster_check(shape, hw, wl, mesh, workers)
    return report


def cluster_check(shape: ModelShape, hw: Hardware, wl: Workload, mesh: MeshPlan, workers) -> dict:
    """The running layout's estimate and, per worker, predicted parameter bytes against what it loaded."""
    p = mesh.parallel
    ranges = [(s.first_layer, s.end_layer) for s in p.stages]
    shards = shard(shape, p.tp, p.pp, p.ep, ranges, p.expert_groups or None)
    size = lookup(mesh.spec.dtype).bytes
    rows = []
    for w in sorted(workers, key=lambda w: (w.kind != "stage", w.stage, w.tp_rank, w.expert_index)):
        if w.kind == "stage":
            held = shards.stage_params[w.stage][w.tp_rank]
        else:
            held = shards.expert_worker_params[w.expert_index]
        rows.append(
            {
                "role": w.role,
                "kind": w.kind,
                "device": w.device,
                "hostname": w.hostname,
                "memory_bytes": w.memory_bytes,
                "measured_param_bytes": w.param_bytes,
                "predicted_param_bytes": held * size,
                "error": held * size / w.param_bytes - 1 if w.param_bytes else None,
            }
        )
    current = estimate(LayoutCost(shape, hw, dataclasses.replace(wl, dtype_bytes=size), Assumptions(), shards))
    return {
        "layout": {"tp": p.tp, "pp": p.pp, "ep": p.ep},
        "dtype": mesh.spec.dtype,
        "workers": rows,
        "current": estimate_dict(current) if isinstance(current, LayoutEstimate) else {"reason": current.reason},
    }


# ---- dict form ----


def estimate_dict(e: LayoutEstimate) -> dict:
    data = dataclasses.asdict(e)
    return {**data.pop("layout"), **data}


def result_dict(result: PlanResult) -> dict:
    s = result.shape
    model = {
        "name": s.name,
        "params": s.total_params,
        "weights_bytes": s.total_params * result.workload.dtype_bytes,
        "layers": s.layers,
        "hidden": s.hidden,
        "heads": s.heads,
        "kv_heads": s.kv_heads,
        "head_dim": s.head_dim,
        "intermediate": s.intermediate,
        "mlp_matrices": s.mlp_matrices,
        "vocab": s.vocab,
        "experts": s.experts,
        "experts_per_token": s.experts_per_token,
        "borrowed_from": s.borrowed_from,
        "scale": s.scale,
    }
    return {
        "model": model,
        "hardware": dataclasses.asdict(result.hardware),
        "workload": dataclasses.asdict(result.workload),
        "assumptions": dataclasses.asdict(result.assumptions),
        "objective": result.objective,
        "recommended": estimate_dict(result.recommended),
        "reason": result.reason,
        "layouts": [estimate_dict(e) for e in result.estimates],
        "infeasible": [{**dataclasses.asdict(i.layout), "reason": i.reason} for i in result.infeasible],
    }


# ---- tables ----


def _layout(row: dict) -> str:
    return f"tp={row['tp']} pp={row['pp']}" + (f" ep={row['ep']}" if row["ep"] else "")


def _rate(bps: float) -> str:
    return format_bytes(bps) + "/s"


def render(report: dict, console) -> None:
    from rich.markup import escape

    m, hw, wl = report["model"], report["hardware"], report["workload"]
    borrowed = f" (shape of {m['borrowed_from']} x{m['scale']:.4f})" if m["borrowed_from"] else ""
    moe = f", {m['experts']} experts top-{m['experts_per_token']}" if m["experts"] else ""
    console.print(
        f"[bold]{escape(m['name'])}[/]: {_count(m['params'])} parameters{borrowed}, "
        f"{format_bytes(m['weights_bytes'])} at {wl['dtype_bytes']} bytes each; {m['layers']} layers, "
        f"hidden {m['hidden']}, {m['heads']} heads ({m['kv_heads']} KV) of {m['head_dim']}{moe}",
        soft_wrap=True,
    )
    console.print(
        f"{hw['gpus']} GPUs of {format_bytes(hw['gpu_memory'])} ({hw['gpus_per_node']} per node), HBM "
        f"{_rate(hw['hbm_bandwidth'])}, intra-node {_rate(hw['intra_bw'])}, "
        f"inter-node {_rate(hw['inter_bw'])}; "
        f"batch {wl['batch']}, context {wl['context']}",
        soft_wrap=True,
    )
    console.print(_layouts_table(report))
    console.print(f"[bold]recommended[/]: {escape(report['reason'])}", soft_wrap=True)
    for row in report["infeasible"]:
        console.print(f"  cannot run {_layout(row)}: {escape(row['reason'])}", soft_wrap=True)
    _render_assumptions(report["assumptions"], console)
    if "cluster" in report:
        _render_cluster(report["cluster"], console)


def _layouts_table(report: dict):
    from rich import box
    from rich.table import Table

    moe = any(e["ep"] for e in report["layouts"])
    table = Table(title=f"feasible layouts, best {report['objective']} first", box=box.SIMPLE_HEAD)
    cols = ["layout", "weights/GPU", "fullest GPU", "KV tokens", "seqs", "all-reduces", "AR bytes/GPU"]
    for col in cols + (["all-to-alls"] if moe else []) + ["ms/token", "tokens/s"]:
        table.add_column(col, justify="left" if col == "layout" else "right")
    for e in report["layouts"]:
        collectives = e["allreduces_per_token"] + e["allgathers_per_token"]
        capped = e["batch"] != report["workload"]["batch"]
        tokens_s = f"{e['throughput']:.1f}" + (f" (b={e['batch']})" if capped else "")
        table.add_row(
            _layout(e),
            format_bytes(e["weights_even"]),
            f"{format_bytes(e['weights_max'])} {_short(e['fullest'])}",
            str(e["kv_tokens"]),
            str(e["kv_sequences"]),
            str(collectives),
            format_bytes(e["allreduce_bytes_per_token"]),
            *([str(e["all_to_all_per_token"])] if moe else []),
            f"{e['latency_s'] * 1e3:.2f}",
            tokens_s,
        )
    table.caption = (
        "weights/GPU = all weights / GPUs; fullest GPU = the most any GPU holds (s = stage, r = rank, "
        "e = expert worker); per-token counts and bytes at batch 1"
    )
    return table


def _short(worker: str) -> str:
    """'stage 0 rank 1' -> 's0r1', 'expert worker 2' -> 'e2'."""
    words = worker.split()
    return f"s{words[1]}r{words[3]}" if words[0] == "stage" else f"e{words[-1]}"


def _render_assumptions(a: dict, console) -> None:
    console.print(
        f"assumed: {a['memory_reserve']:.0%} of GPU memory reserved; a collective costs "
        f"{a['collective_base_s'] * 1e6:g} us + {a['ring_step_intra_s'] * 1e6:g} us per ring step in a node "
        f"({a['ring_step_inter_s'] * 1e6:g} us across nodes); "
        f"a gRPC/gloo message {a['message_s'] * 1e6:g} us; "
        f"decode is memory-bound (FLOPs not counted); KV read at the full context",
        soft_wrap=True,
    )


def _count(n: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}"


def _render_cluster(cluster: dict, console) -> None:
    from rich import box
    from rich.table import Table

    title = f"running layout {_layout(cluster['layout'])} ({cluster['dtype']}): parameter memory per worker"
    table = Table(title=title, box=box.SIMPLE_HEAD)
    for col in ("worker", "device", "memory", "measured", "predicted", "error"):
        table.add_column(col)
    for w in cluster["workers"]:
        error = "-" if w["error"] is None else f"{w['error']:+.2%}"
        table.add_row(
            w["role"],
            w["device"],
            format_bytes(w["memory_bytes"]),
            format_bytes(w["measured_param_bytes"]),
            format_bytes(w["predicted_param_bytes"]),
            error,
        )
    console.print(table)
    now = cluster["current"]
    if "reason" in now:
        console.print(f"the running layout would not be planned: {now['reason']}", soft_wrap=True)
    else:
        console.print(
            f"running layout estimate: {now['latency_s'] * 1e3:.2f} ms per token, "
            f"{now['throughput']:.1f} tokens/s at batch {now['batch']}",
            soft_wrap=True,
        )
