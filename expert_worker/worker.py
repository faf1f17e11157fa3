"""An expert worker process: register with the coordinator, load only its experts of every MoE layer,
serve `Experts.Compute`, and report tokens per expert per layer in its heartbeats (which also rejoin a
restarted coordinator, and end the process when it is drained: coordinator.client.Membership)."""

from __future__ import annotations

import asyncio
import logging

import torch
from stagemesh.coordinator.client import CoordinatorClient, Membership
from stagemesh.expert_worker.engine import ExpertEngine
from stagemesh.expert_worker.server import SERVICE, ExpertsServicer
from stagemesh.models.config import ModelConfig
from stagemesh.models.dtypes import serving_dtype
from stagemesh.models.loader import load_experts
from stagemesh.proto import coordinator_pb2 as cpb
from stagemesh.proto import expert_pb2_grpc
from stagemesh.proto.rpc import advertised_host, bind, create_server, enable_reflection, run_service, set_serving
from stagemesh.telemetry import serve_metrics, worker_registry
from stagemesh.workers import ExpertWorkerOptions, device_memory

log = logging.getLogger("stagemesh.experts")


def expert_stats(engine: ExpertEngine | None) -> cpb.WorkerStats:
    if engine is None:
        return cpb.WorkerStats()
    load = [
        cpb.ExpertLoad(layer=layer, tokens=row.tolist(), expert_ids=engine.expert_ids)
        for layer, row in enumerate(engine.tokens)
    ]
    return cpb.WorkerStats(steps=engine.calls, busy_seconds=engine.busy_seconds, expert_load=load)


def _param_bytes(engine: ExpertEngine) -> int:
    return sum(p.numel() * p.element_size() for p in engine.layers.parameters())


def _held(engine: ExpertEngine | None) -> cpb.Rejoin:
    """What this worker holds, for a coordinator that restarted (Membership rejoins with it)."""
    if engine is None:
        return cpb.Rejoin(state="registered")
    return cpb.Rejoin(state="ready", param_bytes=_param_bytes(engine))


async def run_expert_worker(opts: ExpertWorkerOptions) -> None:
    device = torch.device(opts.device)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    servicer = ExpertsServicer()
    server, health = create_server()
    expert_pb2_grpc.add_ExpertsServicer_to_server(servicer, server)
    enable_reflection(server, [SERVICE])
    address = f"{advertised_host(opts.host, opts.advertise)}:{bind(server, opts.host, opts.port)}"
    await server.start()
    await set_serving(health, [SERVICE], False)

    client = CoordinatorClient(opts.coordinator)
    await client.connect(opts.connect_timeout)
    request = cpb.RegisterRequest(
        kind="expert", address=address, device=str(device), memory_bytes=device_memory(device)
    )
    if opts.expert_worker_index is not None:
        request.expert_index = opts.expert_worker_index
    assignment = await client.register(request, timeout=None, patience=opts.connect_timeout)  # spares wait here
    plan, spec = assignment.plan, assignment.plan.spec
    expert_ids = list(plan.parallel.expert_groups[assignment.expert_index])
    log.info("assigned expert worker %d: experts %s", assignment.expert_index, expert_ids)
    stats = lambda: expert_stats(servicer.engine)  # noqa: E731
    membership = Membership(client, request, assignment, lambda: _held(servicer.engine))
    heartbeat = asyncio.ensure_future(membership.heartbeats(stats))
    if opts.metrics_port is not None:
        role = {"expert_worker": str(assignment.expert_index)}
        log.info("metrics on port %d", serve_metrics(worker_registry(stats, role), opts.host, opts.metrics_port))

    def load() -> ExpertEngine:
        model_dir = opts.model_dir or spec.model_dir
        layers, _ = load_experts(model_dir, expert_ids, serving_dtype(spec.dtype), device)
        return ExpertEngine(layers, ModelConfig.from_dir(model_dir).num_local_experts, plan.hidden_size)

    engine = await asyncio.get_running_loop().run_in_executor(servicer.executor, load)
    servicer.engine = engine
    await client.call("ReportReady", cpb.ReadyRequest(worker_id=membership.worker_id, param_bytes=_param_bytes(engine)))
    await set_serving(health, [SERVICE], True)
    name = f"expert-worker index={assignment.expert_index}"
    await run_service(name, address, server, [heartbeat], before_stop=servicer.end_streams)
