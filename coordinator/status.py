"""`coordctl status`: the cluster as a dict (for --json) and as rich tables (for people)."""

from __future__ import annotations

from google.protobuf.json_format import MessageToDict
from stagemesh.proto import coordinator_pb2 as pb
from stagemesh.units import format_bytes

GATEWAY_STALE_SECONDS = 5.0


def status_dict(status: pb.ClusterStatus) -> dict:
    t = status.topology
    workers = []
    for w in status.workers:
        workers.append(
            {
                "worker_id": w.worker_id,
                "kind": w.kind,
                "role": w.role,
                "stage": w.stage,
                "tp_rank": w.tp_rank,
                "expert_index": w.expert_index,
                "address": w.address,
                "device": w.device,
                "hostname": w.hostname,
                "state": w.state,
                "last_heartbeat_age": round(w.last_heartbeat_age, 3),
                "param_bytes": w.param_bytes,
                "predicted_param_bytes": w.predicted_param_bytes,
                "kv_blocks_used": w.kv_blocks_used,
                "kv_blocks": w.kv_blocks,
                "steps": w.steps,
                "busy_seconds": round(w.busy_seconds, 3),
                "memory_bytes": w.memory_bytes,
                "expert_load": [
                    {"layer": l.layer, "expert_ids": list(l.expert_ids), "tokens": list(l.tokens)}
                    for l in w.expert_load
                ],
                "compile": _compile_dict(w) if w.HasField("compile") else None,
            }
        )
    gateway = None
    if status.gateway_report_age >= 0:
        g = status.gateway
        gateway = {
            "address": g.address,
            "queued": g.queued,
            "running": g.running,
            "tokens_per_second": round(g.tokens_per_second, 2),
            "kv_blocks_used": g.kv_blocks_used,
            "kv_blocks_total": g.kv_blocks_total,
            "requests_total": g.requests_total,
            "report_age": round(status.gateway_report_age, 3),
        }
    serving = t.ready and gateway is not None and gateway["report_age"] < GATEWAY_STALE_SECONDS
    plan = MessageToDict(t.plan, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    return {
        "serving": serving,
        "epoch": t.epoch,
        "pipeline_epoch": t.pipeline_epoch,
        "ready": t.ready,
        "reason": t.reason,
        "plan": plan,
        "stage_addresses": list(t.stage_addresses),
        "expert_addresses": list(t.expert_addresses),
        "kv_blocks": t.kv_blocks,
        "workers": workers,
        "spares": [
            {"kind": x.kind, "address": x.address, "device": x.device, "waiting_seconds": round(x.waiting_seconds, 1)}
            for x in status.spares
        ],
        "recovering": t.recovering,
        "restoring": t.restoring,
        "gateway": gateway,
    }


def _compile_dict(w: pb.WorkerStatus) -> dict:
    c = w.compile
    return {
        "graphs": c.graphs,
        "warmup_seconds": round(c.warmup_seconds, 2),
        "compiled_steps": c.compiled_steps,
        "eager_steps": c.eager_steps,
        "buckets": c.buckets,
    }


def _compiled_cell(c: dict | None) -> str:
    """'3 graphs, 41.2 s warm-up, 120/8 steps' (compiled / eager steps), or '-' for an eager worker."""
    if not c:
        return "-"
    return f"{c['graphs']} graphs, {c['warmup_seconds']:.1f} s warm-up, {c['compiled_steps']}/{c['eager_steps']} steps"


def expert_imbalance(load: list[dict]) -> float | None:
    """max / mean of tokens per expert, summed over layers (1.0 = perfectly even)."""
    totals: dict[int, int] = {}
    for layer in load:
        for expert, tokens in zip(layer.get("expert_ids", []), layer.get("tokens", [])):
            totals[expert] = totals.get(expert, 0) + int(tokens)
    if not totals or not sum(totals.values()):
        return None
    mean = sum(totals.values()) / len(totals)
    return max(totals.values()) / mean


def render(data: dict, console) -> None:
    from rich.table import Table

    plan = data["plan"]
    layers = ",".join(f"{s['first']}-{s['end'] - 1}" for s in plan.get("stages", []))
    state = "SERVING" if data["serving"] else f"NOT SERVING ({data['reason'] or 'no gateway report'})"
    console.print(
        f"[bold]{plan.get('model_dir')}[/] {plan.get('model_type')} tp={plan.get('tp')} pp={plan.get('pp')} "
        f"ep={plan.get('ep')} layers={layers} dtype={plan.get('dtype')} epoch={data['epoch']}: {state}"
    )
    table = Table(show_lines=False)
    for col in (
        "role",
        "address",
        "device",
        "state",
        "heartbeat",
        "params measured / predicted",
        "KV used / cap",
        "steps",
        "busy s",
        "compiled",
    ):
        table.add_column(col)
    all_load = []
    for w in data["workers"]:
        kv = f"{w['kv_blocks_used']} / {w['kv_blocks']}" if w["kind"] == "stage" else "-"
        params = f"{format_bytes(w['param_bytes'])} / {format_bytes(w['predicted_param_bytes'])}"
        table.add_row(
            w["role"],
            w["address"],
            w["device"],
            w["state"],
            f"{w['last_heartbeat_age']:.1f}s ago",
            params,
            kv,
            str(w["steps"]),
            f"{w['busy_seconds']:.2f}",
            _compiled_cell(w.get("compile")),
        )
        all_load += w["expert_load"]
    for x in data["spares"]:
        table.add_row(f"spare ({x['kind']})", x["address"], x["device"], "spare", "-", "-", "-", "-", "-")
    console.print(table)
    imbalance = expert_imbalance(all_load)
    if imbalance is not None:
        console.print(f"expert load imbalance (max / mean tokens per expert): {imbalance:.2f}")
    g = data["gateway"]
    if g is None:
        console.print("gateway: no report yet")
    else:
        console.print(
            f"gateway {g['address']}: queued {g['queued']}, running {g['running']}, "
            f"{g['tokens_per_second']:.1f} tokens/s, KV {g['kv_blocks_used']}/{g['kv_blocks_total']} blocks, "
            f"{g['requests_total']} requests"
        )
