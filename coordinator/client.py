"""Talking to the coordinator: registration and heartbeats for workers, the topology feed for the gateway
and workers, status for coordctl. Turns gRPC failures into errors a person can act on."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import grpc
from stagemesh.errors import StagemeshError, Unavailable
from stagemesh.proto import coordinator_pb2 as pb
from stagemesh.proto import coordinator_pb2_grpc as pb_grpc
from stagemesh.proto.rpc import aio_channel, channel

log = logging.getLogger("stagemesh.coordinator.client")


@dataclass(frozen=True)
class WorkerOptions:
    """What every worker process (stage or expert) needs to join a mesh: its coordinator, where it listens
    and is reached, its device and threads, and where this host sees the checkpoint."""

    coordinator: str
    device: str = "cpu"
    host: str = "127.0.0.1"
    port: int = 0  # 0 = a free one
    advertise: str | None = None  # the host others dial; default: --host
    threads: int | None = None  # torch threads; None = torch's default
    model_dir: str | None = None  # where this host sees the checkpoint, if not where the coordinator does
    connect_timeout: float = 30.0
    metrics_port: int | None = None  # Prometheus /metrics (0 = a free one); None = off


def _describe(address: str, e: grpc.RpcError) -> StagemeshError:
    if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return Unavailable(f"coordinator at {address} is unreachable: {e.details()}")
    error = StagemeshError(f"coordinator at {address}: {e.details()}")
    error.code = e.code().name
    return error


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
            raise _describe(self.address, e) from None

    async def register(self, request: pb.RegisterRequest, timeout: float | None) -> pb.Assignment:
        """A spare's call returns only when it is given a role: timeout None waits as long as it takes."""
        request.hostname = request.hostname or socket.gethostname()
        return await self.call("Register", request, timeout=timeout)

    async def heartbeats(self, worker_id: str, stats: Callable[[], pb.WorkerStats], on_epoch, interval: float = 0.5):
        """Runs forever; NOT_FOUND (the coordinator forgot us) or FAILED_PRECONDITION (we were declared dead
        and lost our role) ends it with an error: the process exits and may be restarted as a spare."""
        while True:
            try:
                reply = await self.call("Heartbeat", pb.HeartbeatRequest(worker_id=worker_id, stats=stats()), 5.0)
                on_epoch(reply.epoch)
            except Unavailable as e:
                log.warning("%s", e)
            except StagemeshError as e:
                if e.code in ("NOT_FOUND", "FAILED_PRECONDITION"):
                    raise
                log.warning("heartbeat: %s", e)
            await asyncio.sleep(interval)

    async def topologies(self) -> AsyncIterator[pb.Topology]:
        """Every topology the coordinator publishes; reconnects when the stream breaks."""
        while True:
            try:
                async for topology in self.stub.WatchTopology(pb.WatchRequest()):
                    yield topology
            except grpc.aio.AioRpcError as e:
                log.warning("topology watch: %s", _describe(self.address, e))
            await asyncio.sleep(1.0)

    async def close(self) -> None:
        await self._channel.close()


def cluster_status(address: str, timeout: float = 5.0) -> pb.ClusterStatus:
    """Blocking Status call for coordctl."""
    with channel(address) as ch:
        try:
            return pb_grpc.CoordinatorStub(ch).Status(pb.StatusRequest(), timeout=timeout)
        except grpc.RpcError as e:
            raise _describe(address, e) from None


def cluster_events(address: str, timeout: float = 5.0) -> list[dict]:
    """Blocking Events call for coordctl: oldest first, times as ISO 8601 (UTC)."""
    from datetime import datetime, timezone

    with channel(address) as ch:
        try:
            reply = pb_grpc.CoordinatorStub(ch).Events(pb.EventsRequest(), timeout=timeout)
        except grpc.RpcError as e:
            raise _describe(address, e) from None
    return [
        {
            "time": datetime.fromtimestamp(e.time, timezone.utc).isoformat(timespec="milliseconds"),
            "epoch": e.epoch,
            "kind": e.kind,
            "detail": e.detail,
        }
        for e in reply.events
    ]
