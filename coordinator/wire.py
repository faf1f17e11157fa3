"""The coordinator's messages <-> domain objects, each crossing once: the coordinator writes its MeshPlan and
Topology as messages, and coordinator.client reads them back into the same objects for workers and the
gateway (and Assignment messages into client.Assignment)."""

from __future__ import annotations

from stagemesh.coordinator.roster import Topology
from stagemesh.models.plan import MeshPlan, ParallelPlan, ServingSpec, StageSpec
from stagemesh.proto import coordinator_pb2 as pb


def plan_message(plan: MeshPlan) -> pb.Plan:
    p, spec = plan.parallel, plan.spec
    return pb.Plan(
        model_dir=spec.model_dir,
        model_type=plan.model_type,
        tp=p.tp,
        pp=p.pp,
        ep=p.ep,
        stages=[pb.LayerRange(first=s.first_layer, end=s.end_layer) for s in p.stages],
        expert_groups=[pb.ExpertGroup(expert_ids=g) for g in p.expert_groups],
        dtype=spec.dtype,
        block_size=spec.block_size,
        max_model_len=spec.max_model_len,
        vocab_size=plan.vocab_size,
        hidden_size=plan.hidden_size,
        num_layers=plan.num_layers,
    )


def plan_from_message(msg: pb.Plan) -> MeshPlan:
    last = len(msg.stages) - 1
    stages = tuple(
        StageSpec(i, r.first, r.end, has_embedding=i == 0, has_head=i == last) for i, r in enumerate(msg.stages)
    )
    groups = tuple(tuple(g.expert_ids) for g in msg.expert_groups)
    parallel = ParallelPlan(tp=msg.tp, pp=msg.pp, ep=msg.ep, stages=stages, expert_groups=groups)
    spec = ServingSpec(msg.model_dir, msg.dtype, msg.block_size, msg.max_model_len)
    return MeshPlan(parallel, spec, msg.model_type, msg.vocab_size, msg.hidden_size, msg.num_layers)


def topology_message(t: Topology) -> pb.Topology:
    return pb.Topology(
        epoch=t.epoch,
        ready=t.ready,
        reason=t.reason,
        plan=plan_message(t.plan),
        stage_addresses=t.stage_addresses,
        expert_addresses=t.expert_addresses,
        kv_blocks=t.kv_blocks,
        pipeline_epoch=t.pipeline_epoch,
        expert_alive=t.expert_alive,
        recovering=t.recovering,
        restoring=t.restoring,
    )


def topology_from_message(msg: pb.Topology) -> Topology:
    return Topology(
        epoch=msg.epoch,
        ready=msg.ready,
        reason=msg.reason,
        stage_addresses=tuple(msg.stage_addresses),
        kv_blocks=msg.kv_blocks,
        expert_addresses=tuple(msg.expert_addresses),
        expert_alive=tuple(msg.expert_alive),
        pipeline_epoch=msg.pipeline_epoch,
        plan=plan_from_message(msg.plan),
        recovering=msg.recovering,
        restoring=msg.restoring,
    )
