"""Talking to the coordinator: registration and heartbeats for workers, the topology feed for the gateway
and workers, status for coordctl. Turns gRPC failures into errors a person can act on."""

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
        self._channel = aio_channel(address)
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

    async def register(self, request: pb.RegisterRequest, timeout: float | None) -> Assignment:
        """A spare's call returns only when it is given a role: timeout None waits as long as it takes."""
        request.hostname = request.hostname or socket.gethostname()
        a = await self.call("Register", request, timeout=timeout)
        plan = plan_from_message(a.plan)
        return Assignment(a.worker_id, a.kind, a.stage, a.tp_rank, a.expert_index, plan, a.epoch)

    async def join_group(self, worker_id: str, failed_epoch: int) -> pb.GroupAssignment:
        """Returns when every rank of this worker's stage meets at one group epoch: as long as it takes for
        a spare to take a lost rank's role."""
        return await self.call("JoinGroup", pb.JoinGroupRequest(worker_id=worker_id, failed_epoch=failed_epoch), None)

    async def heartbeats(
        self,
        worker_id: str,
        stats: Callable[[], pb.WorkerStats],
        on_reply: Callable[[pb.HeartbeatReply], None] = lambda reply: None,
        interval: float = 0.5,
    ):
        """Runs forever; NOT_FOUND (the coordinator forgot us) or FAILED_PRECONDITION (we were declared dead
        and lost our role) ends it with an error: the process exits and may be restarted as a spare."""
        while True:
            try:
                reply = await self.call("Heartbeat", pb.HeartbeatRequest(worker_id=worker_id, stats=stats()), 5.0)
                on_reply(reply)
            except (NotFound, FailedPrecondition):  # forgotten, or declared dead: leave
                raise
            except StagemeshError as e:
                log.warning("heartbeat: %s", e)
            await asyncio.sleep(interval)

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
