"""gRPC plumbing every service shares: servers with health checking and reflection, channels with
explicit message limits, and the one place domain errors become gRPC statuses."""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import signal

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from stagemesh.errors import StagemeshError

log = logging.getLogger(__name__)

DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024  # activations of a long prefill chunk fit with room to spare


def message_options(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    ]


def status_code(error: StagemeshError) -> grpc.StatusCode:
    return getattr(grpc.StatusCode, error.code, grpc.StatusCode.INTERNAL)


def maps_errors(method):
    """Servicer methods raise StagemeshError; this turns it into the status it names, with its message."""
    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def stream(self, request, context):
            try:
                async for item in method(self, request, context):
                    yield item
            except StagemeshError as e:
                await context.abort(status_code(e), str(e))

        return stream

    @functools.wraps(method)
    async def unary(self, request, context):
        try:
            return await method(self, request, context)
        except StagemeshError as e:
            await context.abort(status_code(e), str(e))

    return unary


def create_server(
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, interceptors=()
) -> tuple[grpc.aio.Server, health.aio.HealthServicer]:
    server = grpc.aio.server(options=message_options(max_message_bytes), interceptors=list(interceptors))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    return server, health_servicer


def enable_reflection(server: grpc.aio.Server, service_names: list[str]) -> None:
    names = [*service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME]
    reflection.enable_server_reflection(names, server)


async def set_serving(health_servicer, service_names: list[str], serving: bool) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ["", *service_names]:
        await health_servicer.set(name, status)


def advertised_host(host: str, advertise: str | None) -> str:
    """The host others should dial: --advertise, else the bind host, else (wildcard bind) this hostname."""
    import socket

    return advertise or (socket.gethostname() if host in ("0.0.0.0", "::", "") else host)


def bind(server: grpc.aio.Server, host: str, port: int) -> int:
    """Binds host:port (0 = a free port) and returns the port actually bound."""
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot listen on {host}:{port}")
    return bound


def aio_channel(address: str, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(address, options=message_options(max_message_bytes))


def channel(address: str, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> grpc.Channel:
    return grpc.insecure_channel(address, options=message_options(max_message_bytes))


async def run_service(name: str, address: str, server: grpc.aio.Server, background=(), grace: float = 2.0) -> None:
    """Announces `ready <name> address=HOST:PORT` on stdout (launchers wait for that line), then serves
    until SIGINT/SIGTERM or until a background task fails, and stops gracefully."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    tasks = [asyncio.ensure_future(c) for c in background]
    print(f"ready {name} address={address}", flush=True)
    stopper = asyncio.ensure_future(stop.wait())
    done, _ = await asyncio.wait([stopper, *tasks], return_when=asyncio.FIRST_COMPLETED)
    for t in [stopper, *tasks]:
        t.cancel()
    await server.stop(grace)
    for t in done:
        if t is not stopper and not t.cancelled() and t.exception() is not None:
            raise t.exception()


def check_health(address: str, service: str = "", timeout: float = 5.0) -> bool:
    """True when the server at `address` answers grpc.health.v1 Check with SERVING."""
    with channel(address) as ch:
        try:
            reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING
