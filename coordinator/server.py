"""The coordinator's gRPC service: a thin layer between protobuf and the Roster."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from stagemesh.coordinator.roster import EXPERT, STAGE, SWEEP_SECONDS, HeldRole, NoFreeRole, Roster, Spare, Worker
from stagemesh.coordinator.wire import plan_message, topology_message
from stagemesh.models.config import ModelConfig
from stagemesh.models.plan import LayoutOptions, ServingSpec
from stagemesh.proto import coordinator_pb2 as pb
from stagemesh.proto import coordinator_pb2_grpc as pb_grpc
from stagemesh.proto.rpc import bind, create_server, enable_reflection, maps_errors, run_service, set_serving

log = logging.getLogger("stagemesh.coordinator")
SERVICE = pb.DESCRIPTOR.services_by_name["Coordinator"].full_name


class ChangeFeed:
    """Wakes every waiter once per change. A loop takes `since()` before it reads the state and waits on it
    after: a change in between (e.g. while a streamed message was being sent) is not missed."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def notify(self) -> None:
        self._event.set()
        self._event = asyncio.Event()

    def since(self) -> asyncio.Event:
        return self._event

    async def wait(self, timeout: float, since: asyncio.Event | None = None) -> None:
        try:
            await asyncio.wait_for((since or self._event).wait(), timeout)
        except asyncio.TimeoutError:
            pass


class CoordinatorServicer(pb_grpc.CoordinatorServicer):
    def __init__(self, roster: Roster, feed: ChangeFeed) -> None:
        self.roster = roster
        self.feed = feed
        self.gateway: pb.GatewayReport | None = None
        self.gateway_seen = 0.0

    @maps_errors
    async def Register(self, request: pb.RegisterRequest, context) -> pb.Assignment:
        """Assigns a role; with every role of its kind held, the caller waits here as a spare (for as long
        as its call stays open) until a role is lost. A rejoin gets its role back at once, or is refused."""
        if request.HasField("rejoin"):
            worker = self._rejoin(request)
            log.info("%s rejoined as %s", worker.address, self.roster.describe(worker))
        else:
            worker = await self._register_or_wait(request)
            log.info("registered %s as %s", worker.address, self.roster.describe(worker))
        return pb.Assignment(
            worker_id=worker.worker_id,
            kind=worker.kind,
            stage=worker.stage,
            tp_rank=worker.tp_rank,
            expert_index=worker.expert_index,
            plan=plan_message(self.roster.mesh_plan),
            epoch=self.roster.topology.pipeline_epoch,
        )

    async def _register_or_wait(self, request: pb.RegisterRequest) -> Worker:
        r, spare = request, None
        try:
            while True:
                since = self.feed.since()
                try:
                    return self.roster.register(
                        r.kind,
                        r.address,
                        r.device,
                        r.hostname,
                        r.memory_bytes,
                        stage=r.stage if r.HasField("stage") else None,
                        tp_rank=r.tp_rank if r.HasField("tp_rank") else None,
                        expert_index=r.expert_index if r.HasField("expert_index") else None,
                    )
                except NoFreeRole:
                    if spare is None:
                        spare = self.roster.add_spare(r.kind, r.address, r.device, r.hostname)
                        log.info("%s waits as a %s spare", r.address, r.kind)
                    await self.feed.wait(1.0, since)
        finally:
            if spare is not None:
                self.roster.remove_spare(spare)

    def _rejoin(self, r: pb.RegisterRequest) -> Worker:
        j = r.rejoin
        held = HeldRole(
            j.state, j.param_bytes, j.kv_blocks, j.kv_bytes_per_block, j.group_epoch, j.pipeline_epoch, j.worker_id
        )
        role = (STAGE, r.stage, r.tp_rank) if r.kind == STAGE else (EXPERT, r.expert_index)
        return self.roster.rejoin(r.kind, r.address, r.device, r.hostname, r.memory_bytes, role, held)

    @maps_errors
    async def JoinGroup(self, request: pb.JoinGroupRequest, context) -> pb.GroupAssignment:
        """Waits (within the caller's deadline) until every rank of the stage asks for the same epoch and,
        for ranks > 0, until that epoch's rank 0 has published its store."""
        is_leader = self.roster.get(request.worker_id).tp_rank == 0
        while True:
            since = self.feed.since()
            epoch, complete, rendezvous = self.roster.join_group(request.worker_id, request.failed_epoch)
            if complete and (is_leader or rendezvous):
                return pb.GroupAssignment(group_epoch=epoch, rendezvous="" if is_leader else rendezvous)
            await self.feed.wait(1.0, since)

    @maps_errors
    async def SetRendezvous(self, request: pb.RendezvousRequest, context) -> pb.Empty:
        self.roster.set_rendezvous(request.worker_id, request.address, request.group_epoch)
        return pb.Empty()

    @maps_errors
    async def ReportReady(self, request: pb.ReadyRequest, context) -> pb.Empty:
        r = request
        self.roster.mark_ready(r.worker_id, r.param_bytes, r.kv_blocks, r.kv_bytes_per_block, r.group_epoch)
        worker = self.roster.get(request.worker_id)
        log.info("ready: %s (%d parameter bytes)", self.roster.describe(worker), request.param_bytes)
        if self.roster.topology.ready:
            log.info("mesh ready at epoch %d", self.roster.topology.epoch)
        return pb.Empty()

    @maps_errors
    async def Heartbeat(self, request: pb.HeartbeatRequest, context) -> pb.HeartbeatReply:
        s = request.stats
        stats = {
            "kv_blocks_used": s.kv_blocks_used,
            "steps": s.steps,
            "busy_seconds": s.busy_seconds,
            "expert_load": list(s.expert_load),
            "compile": s.compile if s.HasField("compile") else None,
        }
        epoch, group_epoch, leave = self.roster.heartbeat(request.worker_id, stats)
        return pb.HeartbeatReply(epoch=epoch, group_epoch=group_epoch, leave=leave)

    @maps_errors
    async def ReportGateway(self, request: pb.GatewayReport, context) -> pb.Empty:
        self.gateway, self.gateway_seen = request, time.monotonic()
        return pb.Empty()

    async def WatchTopology(self, request: pb.WatchRequest, context) -> AsyncIterator[pb.Topology]:
        sent = -1
        while True:
            since = self.feed.since()
            topology = self.roster.topology
            if topology.epoch != sent:
                sent = topology.epoch
                yield topology_message(topology)  # a change while this is sent wakes `since`
            await self.feed.wait(5.0, since)

    @maps_errors
    async def Events(self, request: pb.EventsRequest, context) -> pb.EventList:
        return pb.EventList(
            events=[pb.Event(time=e.time, epoch=e.epoch, kind=e.kind, detail=e.detail) for e in self.roster.events]
        )

    @maps_errors
    async def Drain(self, request: pb.DrainRequest, context) -> pb.DrainReply:
        worker = self.roster.drain(request.worker)
        log.info("drained %s at %s", self.roster.describe(worker), worker.address)
        return pb.DrainReply(worker_id=worker.worker_id, role=self.roster.describe(worker), address=worker.address)

    @maps_errors
    async def Status(self, request: pb.StatusRequest, context) -> pb.ClusterStatus:
        now = self.roster.clock()
        workers = [worker_status(self.roster, w, now) for w in self.roster.workers.values()]
        workers.sort(key=lambda w: (w.kind != STAGE, w.stage, w.tp_rank, w.expert_index))
        age = time.monotonic() - self.gateway_seen if self.gateway is not None else -1.0
        return pb.ClusterStatus(
            topology=topology_message(self.roster.topology),
            workers=workers,
            gateway=self.gateway or pb.GatewayReport(),
            gateway_report_age=age,
            spares=[spare_status(s, now) for s in self.roster.spares.values()],
        )


def spare_status(s: Spare, now: float) -> pb.SpareStatus:
    return pb.SpareStatus(
        kind=s.kind, address=s.address, device=s.device, hostname=s.hostname, waiting_seconds=now - s.since
    )


def worker_status(roster: Roster, w: Worker, now: float) -> pb.WorkerStatus:
    return pb.WorkerStatus(
        worker_id=w.worker_id,
        kind=w.kind,
        stage=w.stage,
        tp_rank=w.tp_rank,
        expert_index=w.expert_index,
        role=roster.describe(w),
        address=w.address,
        device=w.device,
        hostname=w.hostname,
        state=w.state,
        last_heartbeat_age=now - w.last_heartbeat,
        param_bytes=w.param_bytes,
        predicted_param_bytes=roster.predicted_param_bytes(w),
        kv_blocks_used=w.stats.get("kv_blocks_used", 0),
        kv_blocks=w.kv_blocks,
        steps=w.stats.get("steps", 0),
        busy_seconds=w.stats.get("busy_seconds", 0.0),
        memory_bytes=w.memory_bytes,
        expert_load=w.stats.get("expert_load", []),
        compile=w.stats.get("compile"),
    )


@dataclass(frozen=True)
class CoordinatorOptions(LayoutOptions):
    block_size: int = 16
    max_model_len: int = 0
    host: str = "127.0.0.1"
    port: int = 0
    heartbeat_timeout: float = 3.0  # seconds of silence before a worker is declared dead


def build_roster(opts: CoordinatorOptions, on_change=lambda: None) -> Roster:
    """Validates the plan against the checkpoint's config before anything listens."""
    config = ModelConfig.from_dir(opts.model_dir)
    plan = opts.parallel_plan(config)
    spec = ServingSpec(opts.model_dir, opts.dtype, opts.block_size, opts.max_model_len)
    return Roster(config, plan, spec, heartbeat_timeout=opts.heartbeat_timeout, on_change=on_change)


async def serve(opts: CoordinatorOptions) -> None:
    feed = ChangeFeed()
    roster = build_roster(opts, on_change=feed.notify)
    server, health = create_server()
    pb_grpc.add_CoordinatorServicer_to_server(CoordinatorServicer(roster, feed), server)
    enable_reflection(server, [SERVICE])
    port = bind(server, opts.host, opts.port)
    await server.start()
    await set_serving(health, [SERVICE], True)
    log.info("plan: %s", roster.plan.describe())

    async def sweep() -> None:
        while True:
            await asyncio.sleep(SWEEP_SECONDS)
            roster.sweep()

    await run_service("coordinator", f"{opts.host}:{port}", server, background=[sweep()])
