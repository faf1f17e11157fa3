"""The coordinator's state: the plan, the registered workers and their roles, the spares waiting for a
role, liveness, the topology (with an epoch that grows on every change) derived from them, and the log of
membership events. No gRPC here: the servicer drives it.

A worker silent for `heartbeat_timeout` is dead: it loses its role at once (its id is remembered, so a
process that comes back after a partition is refused its old role and must register again, as a spare).
Time the coordinator itself did not run (sweeps `stall` seconds or more apart: an overloaded host) is not
counted as anyone's silence: heartbeats that arrived meanwhile wait in its queue, and without this rule the
first sweep after the stall could run before them and declare every worker dead.
The first spare of the right kind takes a lost role; until one does the topology says why it is not ready.

A tp>1 stage's ranks form their group under a group epoch (StageGroup). When one of them is lost (or
reports that its group failed) the stage moves to a new epoch: the survivors and the spare that takes the
lost role meet there (join_group) and the stage serves again once every rank is formed in it.

A coordinator that restarts starts with an empty roster; the workers it does not know re-register with the
role and state they hold (`rejoin`). For its first `grace` seconds (the heartbeat timeout by default) the
roster is *restoring*: roles go only to rejoining workers or to workers that name their role, role-less
workers (spares) wait, and the topology says `restoring` so that followers keep serving on the topology
they had. The window closes early once every role is held. If any worker rejoined, the roles nobody took
back by then are lost (a spare takes them). Epochs never go backwards: they start above the highest
pipeline epoch a rejoining worker reports, and when every stage comes back ready at one and the same
pipeline epoch, the pipeline is the one it was and keeps that epoch (steps in flight stay valid).
"""

from __future__ import annotations

import itertools
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from stagemesh.errors import FailedPrecondition, InvalidArgument, NotFound
from stagemesh.models.config import ModelConfig
from stagemesh.models.dtypes import lookup
from stagemesh.models.plan import MeshPlan, ParallelPlan, ServingSpec

STAGE, EXPERT = "stage", "expert"


class NoFreeRole(FailedPrecondition):
    """Every role of this kind is held by a live worker: the registering process waits as a spare."""


@dataclass
class Spare:
    kind: str
    address: str
    device: str
    hostname: str
    since: float


SWEEP_SECONDS = 0.25  # how often the coordinator looks for silent workers (Roster.sweep)


@dataclass(frozen=True)
class Event:
    time: float  # unix seconds
    epoch: int
    kind: str  # registered, spare, takeover, dead, ready, regroup, rejoined, drained, stalled
    detail: str


@dataclass(frozen=True)
class HeldRole:
    """What a rejoining worker reports it holds (see Roster.rejoin)."""

    state: str  # ready | registered (still loading)
    param_bytes: int = 0
    kv_blocks: int = 0
    kv_bytes_per_block: int = 0
    group_epoch: int = 0  # a tp>1 stage's rank: the TP group epoch it is formed in
    pipeline_epoch: int = 0  # the last one it knows
    worker_id: str = ""  # its id under the previous coordinator


@dataclass
class StageGroup:
    """A tp>1 stage's tensor-parallel group at its current epoch."""

    epoch: int = 0
    joining: set[str] = field(default_factory=set)  # ids of the workers asking to form this epoch
    rendezvous: str = ""  # this epoch's store (host:port), published by its rank 0


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
    group_epoch: int = -1  # the TP group epoch this rank reported being formed in
    last_heartbeat: float = 0.0
    param_bytes: int = 0
    kv_blocks: int = 0
    kv_bytes_per_block: int = 0
    stats: dict = field(default_factory=dict)  # kv_blocks_used, steps, busy_seconds, expert_load
    rejoined_epoch: int | None = None  # a rejoined worker's last pipeline epoch under the previous coordinator

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
    recovering: bool = False  # not ready only while spares take over lost roles
    restoring: bool = False  # the coordinator (re)started moments ago: followers keep their last topology
    plan: MeshPlan | None = None  # the same for every epoch; carried so followers get it with the topology

    def pipeline(self) -> tuple:
        """What steps depend on: a change here invalidates steps in flight."""
        return self.ready, self.stage_addresses, self.kv_blocks

    def same_as(self, other: Topology) -> bool:
        mine = (self.pipeline(), self.reason, self.expert_addresses, self.expert_alive, self.recovering)
        theirs = (other.pipeline(), other.reason, other.expert_addresses, other.expert_alive, other.recovering)
        return mine == theirs and self.restoring == other.restoring


class Roster:
    def __init__(
        self,
        config: ModelConfig,
        plan: ParallelPlan,
        spec: ServingSpec,
        heartbeat_timeout: float = 3.0,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[], None] = lambda: None,
        grace: float | None = None,
        stall: float = 4 * SWEEP_SECONDS,  # sweeps this far apart: the coordinator itself was stalled
    ) -> None:
        self.config, self.plan, self.spec = config, plan, spec
        self.heartbeat_timeout = heartbeat_timeout
        self.grace = heartbeat_timeout if grace is None else grace  # the restoring window (module docstring)
        self.clock = clock
        self.stall = stall
        self.on_change = on_change
        self.workers: dict[str, Worker] = {}
        self.groups = {s: StageGroup() for s in range(plan.pp)} if plan.tp > 1 else {}
        self.spares: dict[int, Spare] = {}
        self.lost: dict[tuple, str] = {}  # role -> who held it when it died, until a worker takes it
        self.taking_over: set[tuple] = set()  # lost roles a spare holds but has not loaded yet
        self.dead: set[str] = set()  # ids of workers declared dead: never given a role again
        self.left: dict[str, str] = {}  # drained worker id -> why: its next heartbeat tells it to leave
        self.events: list[Event] = []
        self.started = self._last_sweep = clock()
        self.restoring = True
        self.rejoins = 0
        self._epoch_floor = 0  # the highest pipeline epoch a rejoining worker reported
        self._resumable = True  # no membership change yet but rejoins: the old pipeline epoch may be kept
        self._boot = secrets.token_hex(2)  # worker ids differ from a previous coordinator's
        self._ids = itertools.count()
        self._spare_ids = itertools.count()
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
        if self._holder(role) is not None:
            raise NoFreeRole(f"role {_describe_role(role)} is held by {self._holder(role).address}")
        named = stage is not None or tp_rank is not None or expert_index is not None
        if self.restoring and not named:
            raise NoFreeRole(f"the coordinator started {self.clock() - self.started:.1f}s ago: {self._restoring()}")
        took_over = self.lost.pop(role, None)
        if took_over:
            self.taking_over.add(role)
        worker = self._add(role, address, device, hostname, memory_bytes)
        self._resumable = False
        self._refresh()
        cause = f", taking over from {took_over}" if took_over else ""
        self.log("takeover" if took_over else "registered", f"{address} is {_describe_role(role)}{cause}")
        return worker

    def rejoin(
        self, kind: str, address: str, device: str, hostname: str, memory_bytes: int, role: tuple, held: HeldRole
    ) -> Worker:
        """A worker the coordinator does not know (it restarted) asks for the role it holds back, with the
        state it holds. Refused while another process holds that role: two processes never hold one."""
        if kind == STAGE:
            role = self._choose_role(kind, role[1], role[2], None)  # validated against the plan
        else:
            role = self._choose_role(kind, None, None, role[1])
        holder = self._holder(role)
        if holder is not None and holder.address != address:  # the same address: its earlier rejoin
            raise FailedPrecondition(
                f"role {_describe_role(role)} is held by {holder.address}: restart this worker to wait as a spare"
            )
        if holder is not None:
            del self.workers[holder.worker_id]
        self.lost.pop(role, None)
        worker = self._add(role, address, device, hostname, memory_bytes)
        worker.state = "ready" if held.state == "ready" else "registered"
        worker.param_bytes, worker.kv_blocks = held.param_bytes, held.kv_blocks
        worker.kv_bytes_per_block = held.kv_bytes_per_block
        worker.rejoined_epoch = held.pipeline_epoch
        if kind == STAGE and worker.stage in self.groups:  # the group goes on at the epoch it is formed in
            group = self.groups[worker.stage]
            group.epoch, worker.group_epoch = max(group.epoch, held.group_epoch), held.group_epoch
        self.rejoins += 1
        self._epoch_floor = max(self._epoch_floor, held.pipeline_epoch)
        self._refresh()
        self.log(
            "rejoined",
            f"{address} is {_describe_role(role)} again ({worker.state}; it was {held.worker_id or '?'} "
            f"at pipeline epoch {held.pipeline_epoch} under the previous coordinator)",
        )
        return worker

    def _add(self, role: tuple, address: str, device: str, hostname: str, memory_bytes: int) -> Worker:
        worker_id = f"w{next(self._ids)}-{self._boot}"
        worker = Worker(worker_id, role[0], address, device, hostname, memory_bytes, last_heartbeat=self.clock())
        if role[0] == STAGE:
            worker.stage, worker.tp_rank = role[1], role[2]
        else:
            worker.expert_index = role[1]
        self.workers[worker_id] = worker
        return worker

    def add_spare(self, kind: str, address: str, device: str, hostname: str) -> int:
        key = next(self._spare_ids)
        self.spares[key] = Spare(kind, address, device, hostname, self.clock())
        self._refresh()
        self.log("spare", f"{address} waits as a {kind} spare")
        return key

    def remove_spare(self, key: int) -> None:
        if self.spares.pop(key, None) is not None:
            self._refresh()

    def log(self, kind: str, detail: str) -> None:
        self.events.append(Event(time.time(), self.topology.epoch, kind, detail))
        del self.events[:-1000]

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
            free = [r for r in own if self._holder(r) is None]
            if not free:
                raise NoFreeRole(f"every {kind} role of the plan ({self.plan.describe()}) is taken")
            return sorted(free, key=lambda r: r not in self.lost)[0]  # lost roles first
        if role not in self.roles():
            raise InvalidArgument(f"role {_describe_role(role)} does not exist in the plan ({self.plan.describe()})")
        return role

    def _holder(self, role: tuple) -> Worker | None:
        return next((w for w in self.workers.values() if w.role == role), None)

    def get(self, worker_id: str) -> Worker:
        worker = self.workers.get(worker_id)
        if worker_id in self.dead:
            raise FailedPrecondition(f"worker {worker_id} was declared dead and lost its role: restart it as a spare")
        if worker is None:
            raise NotFound(f"unknown worker {worker_id!r}: register first")
        return worker

    # ---- lifecycle ----

    def join_group(self, worker_id: str, failed_epoch: int) -> tuple[int, bool, str]:
        """A rank asks to form its stage's group; `failed_epoch` is the epoch that failed on it (-1: none).
        Returns (epoch, whether every rank of the stage asks for it, the epoch's rendezvous so far)."""
        worker = self._group_member(worker_id)
        group = self.groups[worker.stage]
        if failed_epoch >= group.epoch:
            self._new_group_epoch(
                worker.stage, f"rank {worker.tp_rank} reports its group at epoch {failed_epoch} failed"
            )
        if worker_id not in group.joining:
            group.joining.add(worker_id)
            self.on_change()  # wakes the other ranks' JoinGroup calls
        ranks = [self._holder((STAGE, worker.stage, r)) for r in range(self.plan.tp)]
        return group.epoch, all(w is not None and w.worker_id in group.joining for w in ranks), group.rendezvous

    def set_rendezvous(self, worker_id: str, address: str, group_epoch: int) -> None:
        worker = self._group_member(worker_id)
        group = self.groups[worker.stage]
        if worker.tp_rank != 0:
            raise FailedPrecondition("only a stage's TP rank 0 publishes its rendezvous")
        if group_epoch != group.epoch:
            raise FailedPrecondition(f"stage {worker.stage} is at group epoch {group.epoch}, not {group_epoch}")
        group.rendezvous = address
        self.on_change()

    def _group_member(self, worker_id: str) -> Worker:
        worker = self.get(worker_id)
        if worker.kind != STAGE or worker.stage not in self.groups:
            raise FailedPrecondition(f"{_describe_role(worker.role)} is in no tensor-parallel group (tp=1)")
        return worker

    def _new_group_epoch(self, stage: int, cause: str) -> None:
        """The stage's group is gone: its ranks (survivors and whoever takes a lost role) meet at the next
        epoch; the stage serves again once each reports ready in it."""
        group = self.groups[stage]
        group.epoch, group.joining, group.rendezvous = group.epoch + 1, set(), ""
        self._refresh()
        self.log("regroup", f"stage {stage} forms its tensor-parallel group at epoch {group.epoch}: {cause}")

    def mark_ready(
        self, worker_id: str, param_bytes: int, kv_blocks: int, kv_bytes_per_block: int, group_epoch: int = 0
    ) -> None:
        worker = self.get(worker_id)
        worker.state, worker.param_bytes, worker.group_epoch = "ready", param_bytes, group_epoch
        self.taking_over.discard(worker.role)
        worker.kv_blocks, worker.kv_bytes_per_block = kv_blocks, kv_bytes_per_block
        worker.last_heartbeat = self.clock()
        self._refresh()
        self.log("ready", f"{self.describe(worker)} at {worker.address}")

    def heartbeat(self, worker_id: str, stats: dict) -> tuple[int, int, str]:
        """(the pipeline epoch, the worker's stage's TP group epoch or 0, why it must leave: "" unless drained)."""
        if worker_id in self.left:
            return self.topology.pipeline_epoch, 0, self.left[worker_id]
        worker = self.get(worker_id)
        worker.last_heartbeat = self.clock()
        worker.stats = stats
        group = self.groups.get(worker.stage) if worker.kind == STAGE else None
        return self.topology.pipeline_epoch, group.epoch if group else 0, ""

    def sweep(self) -> None:
        """Declares workers silent for longer than the heartbeat timeout dead: each loses its role. Closes
        the restoring window when it is over."""
        now = self.clock()
        stalled, self._last_sweep = now - self._last_sweep, now
        if stalled >= self.stall:  # this process did not run: the silence it saw meanwhile is its own
            for w in self.workers.values():
                w.last_heartbeat = min(now, w.last_heartbeat + stalled)
            self.log("stalled", f"the coordinator did not run for {stalled:.1f}s; no worker is judged on that time")
        silent = [w for w in self.workers.values() if now - w.last_heartbeat > self.heartbeat_timeout]
        for w in silent:
            self.remove(w, f"no heartbeat for {now - w.last_heartbeat:.1f}s")
        if self.restoring and now - self.started >= self.grace:
            self._end_restoring()

    def _end_restoring(self) -> None:
        """After a restart (some worker rejoined), the roles nobody took back are lost: spares take them."""
        self.restoring = False
        if self.rejoins:
            for role in self.roles():
                if self._holder(role) is None and role not in self.lost:
                    self.lost[role] = "its holder under the previous coordinator"
                    self.log("dead", f"{_describe_role(role)}: not re-registered {self.grace:.1f}s after the restart")
                    self._resumable = False
        self._refresh()

    def remove(self, worker: Worker, cause: str, kind: str = "dead") -> None:
        """The worker's role becomes free (a spare takes it); the process is never given a role again."""
        del self.workers[worker.worker_id]
        self.taking_over.discard(worker.role)
        self.dead.add(worker.worker_id)
        self.lost[worker.role] = worker.address
        self._resumable = False
        self._refresh()
        self.log(kind, f"{_describe_role(worker.role)} at {worker.address}: {cause}")
        if worker.kind == STAGE and worker.stage in self.groups:
            self._new_group_epoch(worker.stage, f"{_describe_role(worker.role)} is lost")

    def drain(self, target: str) -> Worker:
        """Takes a worker's role away on purpose: a waiting spare of its kind takes it, the worker is told
        to leave through its heartbeat reply. Refused when no spare of that kind waits."""
        worker = self.find(target)
        role = _describe_role(worker.role)
        if not any(s.kind == worker.kind for s in self.spares.values()):
            raise FailedPrecondition(
                f"no {worker.kind} spare waits to take {role}: start a {worker.kind} worker without a role "
                "(it waits as a spare, `coordctl status` lists it) and drain again"
            )
        self.left[worker.worker_id] = f"drained: {role} moves to a spare"
        self.remove(worker, "drained, a spare takes its role", kind="drained")
        return worker

    def find(self, target: str) -> Worker:
        """A worker by id, address or role ("stage 1 rank 0", "expert worker 0")."""
        wanted = " ".join(target.lower().split())
        for w in self.workers.values():
            if wanted in (w.worker_id, w.address.lower(), _describe_role(w.role)):
                return w
        held = ", ".join(f"{_describe_role(w.role)} ({w.worker_id} at {w.address})" for w in self.workers.values())
        raise NotFound(f"no worker {target!r}: name one by id, address or role; the roster holds {held or 'none'}")

    # ---- topology ----

    def _refresh(self) -> None:
        if self.restoring and all(self._holder(r) is not None for r in self.roles()):
            self.restoring = False  # every role is held: nothing left to keep for rejoining workers
        candidate = self._derive_topology()
        if not candidate.same_as(self.topology):
            old = self.topology
            epoch = max(old.epoch, self._epoch_floor) + 1
            pipeline_epoch = old.pipeline_epoch
            if candidate.pipeline() != old.pipeline():
                pipeline_epoch = self._resumed_epoch(candidate) or epoch
            self.topology = replace(candidate, epoch=epoch, pipeline_epoch=pipeline_epoch)
            self._resumable = self._resumable and not candidate.ready  # only the first ready pipeline may resume
            self.on_change()

    def _resumed_epoch(self, candidate: Topology) -> int | None:
        """After a restart: when every stage came back ready at one pipeline epoch with nothing changed
        since, the pipeline is the one of that epoch (same leaders, same KV): it keeps its number."""
        if not (candidate.ready and self._resumable and self.rejoins):
            return None
        stages = [w for w in self.workers.values() if w.kind == STAGE]
        epochs = {w.rejoined_epoch for w in stages}
        return epochs.pop() if len(epochs) == 1 and None not in epochs else None

    def _derive_topology(self) -> Topology:
        holders = {role: self._holder(role) for role in self.roles()}
        experts = [holders[(EXPERT, e)] for e in range(self.plan.ep)]
        alive = tuple(w is not None and w.state == "ready" for w in experts)
        uncovered = [
            x
            for x in range(self.config.num_local_experts)
            if self.plan.ep and not any(alive[w] for w in self.plan.expert_owners(x))
        ]
        replaced = {r for r in self.lost if r[0] == EXPERT and not uncovered}  # live replicas cover them
        unfilled = [r for r, h in holders.items() if (h is None or h.state == "registered") and r not in replaced]
        reforming = sorted(
            {r[1] for r, h in holders.items() if r[0] == STAGE and h and h.state == "ready" and not self._formed(h)}
        )
        waiting = [r for r in unfilled if r not in self.lost and r not in self.taking_over]
        waiting = [_describe_role(r) for r in waiting]
        lost = [r for r in self.roles() if r in self.lost and (r[0] == STAGE or uncovered)]  # replicas cover the rest
        spare_kinds = [s.kind for s in self.spares.values()]
        uncovered_lost = [r for r in lost if spare_kinds.count(r[0]) < sum(x[0] == r[0] for x in lost)]
        ready = not unfilled and not lost and not uncovered and not reforming
        reason, recovering = "", False
        if waiting:
            reason = f"waiting for {', '.join(waiting)}"
        elif lost:
            recovering = not uncovered_lost
            spare = "a spare is taking over" if recovering else "no spare"
            reason = f"{', '.join(map(_describe_role, lost))} {'is' if len(lost) == 1 else 'are'} down, {spare}"
        elif unfilled:
            loading = [_describe_role(r) for r, h in holders.items() if h is not None and h.state == "registered"]
            recovering, reason = True, f"a spare is loading {', '.join(loading)}"
        elif reforming:
            stages = ", ".join(f"stage {s}" for s in reforming)
            recovering, reason = True, f"{stages} re-forming the tensor-parallel group"
        if uncovered and not waiting and not ready:
            reason += f" (experts {','.join(map(str, uncovered))} have no live worker)"
        restoring = self.restoring and not ready
        if restoring:
            reason = self._restoring()
        stages = [w for r, w in holders.items() if r[0] == STAGE and w is not None and w.state == "ready"]
        return Topology(
            epoch=0,  # set by _refresh
            ready=ready,
            reason=reason,
            stage_addresses=tuple(holders[(STAGE, s, 0)].address for s in range(self.plan.pp)) if ready else (),
            kv_blocks=min(w.kv_blocks for w in stages) if ready else 0,
            expert_addresses=tuple(w.address if w else "" for w in experts),
            expert_alive=alive,
            recovering=recovering and not restoring,
            restoring=restoring,
            plan=self.mesh_plan,
        )

    def _formed(self, worker: Worker) -> bool:
        group = self.groups.get(worker.stage)
        return group is None or worker.group_epoch == group.epoch

    def _restoring(self) -> str:
        held = sum(self._holder(r) is not None for r in self.roles())
        return (
            f"restoring the roster: roles go to re-registering workers first for {self.grace:.1f}s "
            f"({held} of {len(self.roles())} roles held)"
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
