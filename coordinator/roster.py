"""The coordinator's state: the plan, the registered workers and their roles, liveness, and the topology
(with an epoch that grows on every change) derived from them. No gRPC here: the servicer drives it.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from stagemesh.errors import FailedPrecondition, InvalidArgument, NotFound
from stagemesh.models.config import ModelConfig
from stagemesh.models.dtypes import lookup
from stagemesh.models.plan import MeshPlan, ParallelPlan, ServingSpec

STAGE, EXPERT = "stage", "expert"


@dataclass
class Worker:
    worker_id: str
    kind: str
    address: str
    device: str
    hostname: str
    memory_bytes: int
    stage: int = 0
    tp_rank: int = 0
    expert_index: int = 0
    state: str = "registered"  # registered -> ready; down while silent
    last_heartbeat: float = 0.0
    param_bytes: int = 0
    kv_blocks: int = 0
    kv_bytes_per_block: int = 0
    stats: dict = field(default_factory=dict)  # kv_blocks_used, steps, busy_seconds, expert_load

    @property
    def role(self) -> tuple:
        return (STAGE, self.stage, self.tp_rank) if self.kind == STAGE else (EXPERT, self.expert_index)


@dataclass(frozen=True)
class Topology:
    epoch: int
    ready: bool
    reason: str
    stage_addresses: tuple[str, ...]
    kv_blocks: int
    expert_addresses: tuple[str, ...] = ()
    expert_alive: tuple[bool, ...] = ()
    pipeline_epoch: int = 0
    plan: MeshPlan | None = None  # the same for every epoch; carried so followers get it with the topology

    def pipeline(self) -> tuple:
        """What steps depend on: a change here invalidates steps in flight."""
        return self.ready, self.stage_addresses, self.kv_blocks

    def same_as(self, other: Topology) -> bool:
        return (self.pipeline(), self.reason, self.expert_addresses, self.expert_alive) == (
            other.pipeline(),
            other.reason,
            other.expert_addresses,
            other.expert_alive,
        )


class Roster:
    def __init__(
        self,
        config: ModelConfig,
        plan: ParallelPlan,
        spec: ServingSpec,
        heartbeat_timeout: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[], None] = lambda: None,
    ) -> None:
        self.config, self.plan, self.spec = config, plan, spec
        self.heartbeat_timeout = heartbeat_timeout
        self.clock = clock
        self.on_change = on_change
        self.workers: dict[str, Worker] = {}
        self.rendezvous: dict[int, str] = {}
        self._ids = itertools.count()
        self.topology = Topology(0, False, "waiting for workers", (), 0)
        self._refresh()

    # ---- roles ----

    def roles(self) -> list[tuple]:
        stages = [(STAGE, s, r) for s in range(self.plan.pp) for r in range(self.plan.tp)]
        return stages + [(EXPERT, e) for e in range(self.plan.ep)]

    def register(
        self,
        kind: str,
        address: str,
        device: str = "cpu",
        hostname: str = "",
        memory_bytes: int = 0,
        stage: int | None = None,
        tp_rank: int | None = None,
        expert_index: int | None = None,
    ) -> Worker:
        role = self._choose_role(kind, stage, tp_rank, expert_index)
        holder = self._holder(role)
        if holder is not None:
            if holder.state != "down":
                raise FailedPrecondition(f"role {_describe_role(role)} is already held by {holder.address}")
            del self.workers[holder.worker_id]  # a restarted worker takes its dead predecessor's role
            if role[0] == STAGE and role[2] == 0:
                self.rendezvous.pop(role[1], None)
        worker = Worker(
            f"w{next(self._ids)}", kind, address, device, hostname, memory_bytes, last_heartbeat=self.clock()
        )
        if kind == STAGE:
            worker.stage, worker.tp_rank = role[1], role[2]
        else:
            worker.expert_index = role[1]
        self.workers[worker.worker_id] = worker
        self._refresh()
        return worker

    def _choose_role(self, kind: str, stage, tp_rank, expert_index) -> tuple:
        if kind not in (STAGE, EXPERT):
            raise InvalidArgument(f"worker kind {kind!r}: expected 'stage' or 'expert'")
        if kind == EXPERT and not self.plan.ep:
            raise FailedPrecondition("this mesh has no expert workers (the coordinator runs with ep=0)")
        if kind == STAGE and (stage is not None or tp_rank is not None):
            role = (STAGE, stage or 0, tp_rank or 0)
        elif kind == EXPERT and expert_index is not None:
            role = (EXPERT, expert_index)
        else:
            own = [r for r in self.roles() if r[0] == kind]
            free = [r for r in own if self._holder(r) is None] or [r for r in own if self._holder(r).state == "down"]
            if not free:
                raise FailedPrecondition(f"every {kind} role of the plan ({self.plan.describe()}) is taken")
            return free[0]
        if role not in self.roles():
            raise InvalidArgument(f"role {_describe_role(role)} does not exist in the plan ({self.plan.describe()})")
        return role

    def _holder(self, role: tuple) -> Worker | None:
        return next((w for w in self.workers.values() if w.role == role), None)

    def get(self, worker_id: str) -> Worker:
        worker = self.workers.get(worker_id)
        if worker is None:
            raise NotFound(f"unknown worker {worker_id!r}: register first")
        return worker

    # ---- lifecycle ----

    def set_rendezvous(self, worker_id: str, address: str) -> None:
        worker = self.get(worker_id)
        if worker.kind != STAGE or worker.tp_rank != 0:
            raise FailedPrecondition("only a stage's TP rank 0 publishes its rendezvous")
        self.rendezvous[worker.stage] = address
        self.on_change()

    def mark_ready(self, worker_id: str, param_bytes: int, kv_blocks: int, kv_bytes_per_block: int) -> None:
        worker = self.get(worker_id)
        worker.state, worker.param_bytes = "ready", param_bytes
        worker.kv_blocks, worker.kv_bytes_per_block = kv_blocks, kv_bytes_per_block
        worker.last_heartbeat = self.clock()
        self._refresh()

    def heartbeat(self, worker_id: str, stats: dict) -> int:
        worker = self.get(worker_id)
        worker.last_heartbeat = self.clock()
        worker.stats = stats
        if worker.state == "down":
            worker.state = "ready" if worker.param_bytes else "registered"
            self._refresh()
        return self.topology.pipeline_epoch

    def sweep(self) -> None:
        """Marks workers silent for longer than the heartbeat timeout as down."""
        now = self.clock()
        silent = [
            w for w in self.workers.values() if w.state != "down" and now - w.last_heartbeat > self.heartbeat_timeout
        ]
        for w in silent:
            w.state = "down"
        if silent:
            self._refresh()

    # ---- topology ----

    def _refresh(self) -> None:
        candidate = self._derive_topology()
        if not candidate.same_as(self.topology):
            old = self.topology
            epoch = old.epoch + 1
            pipeline_epoch = epoch if candidate.pipeline() != old.pipeline() else old.pipeline_epoch
            self.topology = replace(candidate, epoch=epoch, pipeline_epoch=pipeline_epoch)
            self.on_change()

    def _derive_topology(self) -> Topology:
        holders = {role: self._holder(role) for role in self.roles()}
        waiting = [_describe_role(r) for r, h in holders.items() if h is None or h.state == "registered"]
        down = [
            f"{_describe_role(r)} at {h.address}" for r, h in holders.items() if h is not None and h.state == "down"
        ]
        stage_down = [r for r, h in holders.items() if r[0] == STAGE and h is not None and h.state == "down"]
        experts = [holders[(EXPERT, e)] for e in range(self.plan.ep)]
        alive = tuple(w is not None and w.state == "ready" for w in experts)
        uncovered = [
            x
            for x in range(self.config.num_local_experts)
            if self.plan.ep and not any(alive[w] for w in self.plan.expert_owners(x))
        ]
        ready = not waiting and not stage_down and not uncovered
        reason = ""
        if not ready:
            reason = f"waiting for {', '.join(waiting)}" if waiting else f"down: {', '.join(down)}"
            if uncovered and not waiting:
                reason += f" (experts {','.join(map(str, uncovered))} have no live worker)"
        stages = [w for r, w in holders.items() if r[0] == STAGE and w is not None and w.state == "ready"]
        return Topology(
            epoch=0,  # set by _refresh
            ready=ready,
            reason=reason,
            stage_addresses=tuple(holders[(STAGE, s, 0)].address for s in range(self.plan.pp)) if ready else (),
            kv_blocks=min(w.kv_blocks for w in stages) if ready else 0,
            expert_addresses=tuple(w.address if w else "" for w in experts),
            expert_alive=alive,
            plan=self.mesh_plan,
        )

    @property
    def mesh_plan(self) -> MeshPlan:
        return MeshPlan.of(self.plan, self.spec, self.config)

    def predicted_param_bytes(self, worker: Worker) -> int:
        size = lookup(self.spec.dtype).bytes
        if worker.kind == EXPERT:
            return self.plan.expert_param_count(self.config, worker.expert_index) * size
        return self.plan.stage_param_count(self.config, worker.stage, worker.tp_rank) * size

    def describe(self, worker: Worker) -> str:
        if worker.kind == EXPERT:
            ids = self.plan.expert_groups[worker.expert_index]
            return f"expert worker {worker.expert_index}: experts {','.join(map(str, ids))}"
        stage = self.plan.stages[worker.stage]
        return f"stage {worker.stage} rank {worker.tp_rank}: layers {stage.describe()}"


def _describe_role(role: tuple) -> str:
    return f"stage {role[1]} rank {role[2]}" if role[0] == STAGE else f"expert worker {role[1]}"
