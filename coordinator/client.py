"""Talking to the coordinator: registration and heartbeats for workers (Membership: rejoining a restarted
coordinator, leaving when drained), the topology feed for the gateway and workers, status, events and drain
for coordctl. Turns gRPC failures into errors a person can act on."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import grpc
from stagemesh.coordinator.roster import Topology
from stagemesh.coordinator.wire import plan_from_message, topology_from_message
from stagemesh.errors import FailedPrecondition, NotFound, StagemeshError, Unavailable
from stagemesh.models.plan import MeshPlan
from stagemesh.proto import coordinator_pb2 as pb
from stagemesh.proto import coordinator_pb2_grpc as pb_grpc
from stagemesh.proto.rpc import aio_channel, channel, error_from_rpc

log = logging.getLogger("stagemesh.coordinator.client")

# A coordinator that went away is redialled at least once a second (gRPC's default backoff grows to 120 s):
# workers rejoin a restarted coordinator within its restoring window.
RECONNECT = (("grpc.initial_reconnect_backoff_ms", 250), ("grpc.max_reconnect_backoff_ms", 1000))


@dataclass(frozen=True)
class Assignment:
    """A worker's role, as the coordinator assigned it."""

    worker_id: str
    kind: str
    stage: int
    tp_rank: int
    expert_index: int
    plan: MeshPlan
    epoch: int


class CoordinatorClient:
    """asyncio client used by workers and the gateway."""

    def __init__(self, address: str) -> None:
        self.address = address
        self._channel = aio_channel(address, options=RECONNECT)
        self.stub = pb_grpc.CoordinatorStub(self._channel)

    async def connect(self, timeout: float) -> None:
        """Waits for the coordinator to answer; Unavailable after `timeout` seconds."""
        try:
            await asyncio.wait_for(self._channel.channel_ready(), timeout)
        except asyncio.TimeoutError:
            raise Unavailable(f"coordinator at {self.address} is unreachable (no answer in {timeout:.0f}s)") from None

    async def call(self, method: str, request, timeout: float = 30.0):
        try:
            return await getattr(self.stub, method)(request, timeout=timeout)
        except grpc.aio.AioRpcError as e:
            raise error_from_rpc(e, f"coordinator at {self.address}") from None

    async def register(self, request: pb.RegisterRequest, timeout: float | None, patience: float = 30.0) -> Assignment:
        """A spare's call returns only when it is given a role: timeout None waits as long as it takes. A
        coordinator that goes away meanwhile (a restart) is waited for up to `patience` seconds."""
        request.hostname = request.hostname or socket.gethostname()
        while True:
            try:
                a = await self.call("Register", request, timeout=timeout)
                break
            except Unavailable as e:
                log.warning("register: %s; waiting for the coordinator to come back", e)
                await asyncio.sleep(0.5)
                await self.connect(patience)
        plan = plan_from_message(a.plan)
        return Assignment(a.worker_id, a.kind, a.stage, a.tp_rank, a.expert_index, plan, a.epoch)

    async def topologies(self) -> AsyncIterator[Topology]:
        """Every topology the coordinator publishes; reconnects when the stream breaks."""
        while True:
            try:
                async for topology in self.stub.WatchTopology(pb.WatchRequest()):
                    yield topology_from_message(topology)
            except grpc.aio.AioRpcError as e:
                log.warning("topology watch: %s", error_from_rpc(e, f"coordinator at {self.address}"))
            await asyncio.sleep(1.0)

    async def close(self) -> None:
        await self._channel.close()


class Membership:
    """A worker's place in the mesh as the coordinator knows it: its role, and the worker id that names it.

    Heartbeats keep it. A coordinator that answers NOT_FOUND does not know the id (it restarted): the worker
    re-registers with the role and the state it holds (`state()`, a pb.Rejoin) and goes on under a new id,
    weights and serving untouched. A reply that says `leave` (a drain) ends the heartbeats normally: the
    process stops cleanly. FAILED_PRECONDITION (declared dead, or the role is now held by another process)
    ends them with that error: the process exits and may be restarted as a spare."""

    def __init__(
        self, client: CoordinatorClient, request: pb.RegisterRequest, assignment: Assignment, state: Callable
    ) -> None:
        self.client, self.request, self.assignment, self.state = client, request, assignment, state
        self.worker_id = assignment.worker_id
        self.pipeline_epoch = assignment.epoch  # the largest one heard of

    async def heartbeats(
        self,
        stats: Callable[[], pb.WorkerStats],
        on_reply: Callable[[pb.HeartbeatReply], None] = lambda reply: None,
        interval: float = 0.5,
    ) -> str:
        """Runs until the coordinator says leave; returns why. `on_reply` sees every other reply (epochs)."""
        failing = False
        while True:
            try:
                leave = await self._beat(stats, on_reply)
                if leave:
                    log.warning("the coordinator asks this worker to leave: %s", leave)
                    return leave
                failing = False
            except FailedPrecondition:  # declared dead, or the role is held by another process
                raise
            except StagemeshError as e:  # the coordinator is away (restarting): keep serving, keep trying
                if not failing:
                    log.warning("heartbeat: %s (serving on, retrying every %.1fs)", e, interval)
                failing = True
            await asyncio.sleep(interval)

    async def _beat(self, stats, on_reply) -> str:
        request = pb.HeartbeatRequest(worker_id=self.worker_id, stats=stats())
        try:
            reply = await self.client.call("Heartbeat", request, 5.0)
        except NotFound:  # a coordinator that never heard of this worker: it restarted
            await self._rejoin()
            return ""
        if not reply.leave:
            self.pipeline_epoch = max(self.pipeline_epoch, reply.epoch)
            on_reply(reply)
        return reply.leave

    async def join_group(self, failed_epoch: int) -> pb.GroupAssignment:
        """A TP rank's JoinGroup (stage_worker.group_formation): returns when every rank of the stage meets at
        one group epoch, as long as it takes for a spare to take a lost rank's role."""
        request = pb.JoinGroupRequest(worker_id=self.worker_id, failed_epoch=failed_epoch)
        return await self.client.call("JoinGroup", request, None)

    async def _rejoin(self) -> None:
        a, request = self.assignment, pb.RegisterRequest()
        request.CopyFrom(self.request)
        if a.kind == "stage":
            request.stage, request.tp_rank = a.stage, a.tp_rank
        else:
            request.expert_index = a.expert_index
        request.rejoin.CopyFrom(self.state())
        request.rejoin.worker_id = self.worker_id
        request.rejoin.pipeline_epoch = max(request.rejoin.pipeline_epoch, self.pipeline_epoch)
        reply = await self.client.call("Register", request, timeout=10.0)
        log.warning("the coordinator restarted: rejoined as %s (was %s)", reply.worker_id, self.worker_id)
        self.worker_id = reply.worker_id


def cluster_status(address: str, timeout: float = 5.0) -> pb.ClusterStatus:
    """Blocking Status call for coordctl."""
    with channel(address) as ch:
        try:
            return pb_grpc.CoordinatorStub(ch).Status(pb.StatusRequest(), timeout=timeout)
        except grpc.RpcError as e:
            raise error_from_rpc(e, f"coordinator at {address}") from None


def cluster_events(address: str, timeout: float = 5.0) -> list[dict]:
    """Blocking Events call for coordctl: oldest first, times as ISO 8601 (UTC)."""
    from datetime import datetime, timezone

    with channel(address) as ch:
        try:
            reply = pb_grpc.CoordinatorStub(ch).Events(pb.EventsRequest(), timeout=timeout)
        except grpc.RpcError as e:
            raise error_from_rpc(e, f"coordinator at {address}") from None
    return [
        {
            "time": datetime.fromtimestamp(e.time, timezone.utc).isoformat(timespec="milliseconds"),
            "epoch": e.epoch,
            "kind": e.kind,
            "detail": e.detail,
        }
        for e in reply.events
    ]


def drain_worker(address: str, worker: str, timeout: float = 10.0) -> dict:
    """Blocking Drain call for coordctl: the drained worker's id, role and address."""
    with channel(address) as ch:
        try:
            reply = pb_grpc.CoordinatorStub(ch).Drain(pb.DrainRequest(worker=worker), timeout=timeout)
        except grpc.RpcError as e:
            raise error_from_rpc(e, f"coordinator at {address}") from None
    return {"worker_id": reply.worker_id, "role": reply.role, "address": reply.address}
