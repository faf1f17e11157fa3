"""`coordctl`: administer a running mesh (status, events, drain) and plan layouts before deploying one (plan)."""

from __future__ import annotations

import json
import sys

import click
from stagemesh.options import StagemeshGroup, security_options


@click.group(cls=StagemeshGroup)
def main() -> None:
    """coordctl: inspect a stagemesh cluster and plan TP/PP/EP layouts."""


@main.command("status")
@click.option("--coordinator", required=True, help="HOST:PORT of the coordinator.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object for scripts.")
@click.option("--timeout", type=float, default=5.0, show_default=True, help="Seconds to wait for the coordinator.")
@security_options
def status_command(coordinator, as_json, timeout) -> None:
    """Show the plan, every worker and the gateway; exit 1 when the mesh is not fully serving."""
    from rich.console import Console
    from stagemesh.coordinator.client import cluster_status
    from stagemesh.coordinator.status import render, status_dict

    data = status_dict(cluster_status(coordinator, timeout))
    if as_json:
        click.echo(json.dumps(data, indent=2))
    else:
        render(data, Console(width=None if sys.stdout.isatty() else 160))
    sys.exit(0 if data["serving"] else 1)


@main.command("events")
@click.option("--coordinator", required=True, help="HOST:PORT of the coordinator.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object for scripts.")
@click.option("--timeout", type=float, default=5.0, show_default=True, help="Seconds to wait for the coordinator.")
@security_options
def events_command(coordinator, as_json, timeout) -> None:
    """List membership and epoch changes (registered, spare, dead, takeover, regroup, ready, rejoined, drained) with
    times and causes."""
    from stagemesh.coordinator.client import cluster_events

    events = cluster_events(coordinator, timeout)
    if as_json:
        click.echo(json.dumps(events, indent=2))
    for e in [] if as_json else events:
        click.echo(f"{e['time']}  epoch {e['epoch']:>3}  {e['kind']:<10} {e['detail']}")


@main.command("drain")
@click.argument("worker")
@click.option("--coordinator", required=True, help="HOST:PORT of the coordinator.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object for scripts.")
@click.option("--timeout", type=float, default=10.0, show_default=True, help="Seconds to wait for the coordinator.")
@security_options
def drain_command(worker, coordinator, as_json, timeout) -> None:
    """Move WORKER's role (a worker id, its address, or a role: "stage 1 rank 0", "expert worker 0") to a
    waiting spare; the worker leaves, in-flight requests are replayed on the new pipeline. Refused
    (exit 2) when no spare of its kind waits."""
    from stagemesh.coordinator.client import drain_worker

    drained = drain_worker(coordinator, worker, timeout)
    if as_json:
        click.echo(json.dumps(drained, indent=2))
    else:
        click.echo(f"drained {drained['role']} ({drained['worker_id']} at {drained['address']}): a spare takes it")


@main.command("plan")
@click.option(
    "--model",
    help="Checkpoint directory, preset (Llama-2-70B, Llama-3-405B, GPT-3-175B, Mixtral-8x7B, "
    "Mixtral-8x22B, ...) or bare size (175B: a dense model of that many parameters).",
)
@click.option("--from-cluster", help="HOST:PORT of a coordinator: plan for its registered workers and model.")
@click.option("--gpus", type=int, help="GPUs to spread the model over (every layout uses all of them).")
@click.option("--gpus-per-node", type=int, help="GPUs per node; TP stays inside one.  [default: 8]")
@click.option("--gpu-memory", help="Memory per GPU, e.g. 80GB (default with --from-cluster: the workers').")
@click.option("--hbm-bandwidth", default="3.35TB/s", show_default=True, help="GPU memory bandwidth.")
@click.option("--intra-bw", default="450GB/s", show_default=True, help="Per-GPU bandwidth inside a node (NVLink).")
@click.option("--inter-bw", default="100GB/s", show_default=True, help="Per-GPU bandwidth between nodes.")
@click.option(
    "--dtype",
    type=click.Choice(["bf16", "fp16", "fp32", "fp8", "bfloat16", "float16", "float32"], case_sensitive=False),
    help="Weights, KV and activations dtype.  [default: bf16, or the cluster's]",
)
@click.option("--batch", type=int, default=1, show_default=True, help="Sequences decoding together.")
@click.option("--context", type=int, help="Tokens of KV per sequence.  [default: 4096, at most the model's]")
@click.option(
    "--optimize",
    "objective",
    type=click.Choice(["throughput", "latency"]),
    default="throughput",
    show_default=True,
    help="What the recommendation maximises.",
)
@click.option("--allow-cross-node-tp", is_flag=True, help="Consider TP groups that span nodes.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object for scripts.")
@click.option("--timeout", type=float, default=5.0, show_default=True, help="Seconds to wait for the coordinator.")
@security_options
def plan_command(
    model,
    from_cluster,
    gpus,
    gpus_per_node,
    gpu_memory,
    hbm_bandwidth,
    intra_bw,
    inter_bw,
    dtype,
    batch,
    context,
    objective,
    allow_cross_node_tp,
    as_json,
    timeout,
) -> None:
    """Choose tp, pp (and ep) for a model on given GPUs: memory, KV room, communication, latency, throughput."""
    from rich.console import Console
    from stagemesh.coordinator.plan_report import PlanRequest, build_report, render

    report = build_report(
        PlanRequest(
            model,
            from_cluster,
            gpus,
            gpus_per_node,
            gpu_memory,
            hbm_bandwidth,
            intra_bw,
            inter_bw,
            dtype,
            batch,
            context,
            objective,
            allow_cross_node_tp,
            timeout,
        )
    )
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        render(report, Console(width=None if sys.stdout.isatty() else 160))


if __name__ == "__main__":
    main()
