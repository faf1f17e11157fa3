"""gRPC plumbing every service shares: servers with health checking and reflection, channels with
explicit message limits, and the one place each way between domain errors and gRPC statuses
(`maps_errors` on the serving side, `error_from_rpc` on the calling side)."""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import os
import signal

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from stagemesh.errors import InvalidArgument, StagemeshError, error_for_code
from stagemesh.proto import security

log = logging.getLogger(__name__)

# Every channel and server sends and receives messages up to this size (not gRPC's 4 MiB default): the
# activations of a long prefill chunk fit with room to spare. STAGEMESH_MAX_MESSAGE_BYTES changes it.
DEFAULT_MAX_MESSAGE_BYTES = int(os.environ.get("STAGEMESH_MAX_MESSAGE_BYTES", 256 * 1024 * 1024))


def message_options(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    ]


def status_code(error: StagemeshError) -> grpc.StatusCode:
    return getattr(grpc.StatusCode, error.code, grpc.StatusCode.INTERNAL)


def error_from_rpc(e: grpc.RpcError, where: str) -> StagemeshError:
    """A failed call as the errors.py class its status names; `where` says who failed ("stage 1 at
    host:port", "coordinator at host:port") and leads the message."""
    return error_for_code(e.code().name, f"{where}: {e.details()}")


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


class _Malformed:
    """What a request that did not parse becomes, so the handler can refuse it with INVALID_ARGUMENT."""

    def __init__(self, error: DecodeError) -> None:
        self.message = f"the request is not a valid protobuf message: {error}"


class MalformedRequests(grpc.aio.ServerInterceptor):
    """Bytes that do not parse as the method's request type get INVALID_ARGUMENT with the parser's reason
    (left to gRPC they end as UNKNOWN, or in a stream as whatever the handler makes of the exception).
    A malformed message inside a request stream raises InvalidArgument from the stream's iterator."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        parse = handler.request_deserializer

        def deserialize(data: bytes):
            try:
                return parse(data)
            except DecodeError as e:
                return _Malformed(e)

        kind = (
            ("stream" if handler.request_streaming else "unary")
            + "_"
            + ("stream" if handler.response_streaming else "unary")
        )
        behaviour = getattr(handler, kind)
        return handler._replace(
            request_deserializer=deserialize, **{kind: _refusing_malformed(behaviour, handler.request_streaming)}
        )


def _refusing_malformed(behaviour, request_streaming: bool):
    if request_streaming:

        async def requests(iterator):
            async for request in iterator:
                if isinstance(request, _Malformed):
                    raise InvalidArgument(request.message)
                yield request

        if inspect.isasyncgenfunction(behaviour):

            async def stream_in_gen(iterator, context):
                async for item in behaviour(requests(iterator), context):
                    yield item

            return stream_in_gen

        async def stream_in(iterator, context):
            return await behaviour(requests(iterator), context)

        return stream_in
    if inspect.isasyncgenfunction(behaviour):

        async def unary_in_gen(request, context):
            if isinstance(request, _Malformed):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
            async for item in behaviour(request, context):
                yield item

        return unary_in_gen

    async def unary_in(request, context):
        if isinstance(request, _Malformed):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        return await behaviour(request, context)

    return unary_in


def create_server(
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, public: bool = False
) -> tuple[grpc.aio.Server, health.aio.HealthServicer]:
    """A server with health checking and, when tokens are configured, the token check (public = the
    gateway's API, which wants the client token; every other server wants the cluster token)."""
    check = security.server_token_check(security.current(), public)
    interceptors = [check, MalformedRequests()] if check else [MalformedRequests()]
    # SO_REUSEPORT off (gRPC sets it on Linux): a second process asking for a port in use is refused instead
    # of sharing it; SO_REUSEADDR (always set) still lets a restarted process bind its predecessor's port.
    options = [*message_options(max_message_bytes), ("grpc.so_reuseport", 0)]
    server = grpc.aio.server(options=options, interceptors=interceptors)
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


def bind(server: grpc.aio.Server, host: str, port: int, public: bool = False) -> int:
    """Binds host:port (0 = a free port) with TLS when configured; returns the port actually bound.
    Refuses a non-loopback address that neither TLS nor a token protects, unless --insecure."""
    sec = security.current()
    sec.check_listen(host, protected_by_token=bool(sec.client_token if public else sec.cluster_token))
    address = f"{host}:{port}"
    bound = (
        server.add_secure_port(address, security.server_credentials(sec))
        if sec.tls
        else (server.add_insecure_port(address))
    )
    if bound == 0:
        raise OSError(f"cannot listen on {address}")
    return bound


def aio_channel(
    address: str,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    public: bool = False,
    token: str | None = None,
    options: tuple[tuple[str, int], ...] = (),
):
    """An asyncio channel with TLS and the cluster token (or, public, the client token) when configured;
    `token` overrides the configured one; `options` are more gRPC channel arguments."""
    sec = security.current()
    token = token or (sec.client_token if public else sec.cluster_token)
    interceptors = security.aio_token_interceptors(token) if token else None
    options = message_options(max_message_bytes) + list(options)
    if sec.tls:
        return grpc.aio.secure_channel(address, security.channel_credentials(sec), options, interceptors=interceptors)
    return grpc.aio.insecure_channel(address, options, interceptors=interceptors)


def channel(
    address: str, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, public: bool = False, token: str | None = None
) -> grpc.Channel:
    """A blocking channel, configured like aio_channel; `token` overrides the configured one."""
    sec = security.current()
    token = token or (sec.client_token if public else sec.cluster_token)
    options = message_options(max_message_bytes)
    ch = (
        grpc.secure_channel(address, security.channel_credentials(sec), options)
        if sec.tls
        else grpc.insecure_channel(address, options)
    )
    return grpc.intercept_channel(ch, security.AddToken(token)) if token else ch


async def run_service(
    name: str, address: str, server: grpc.aio.Server, background=(), grace: float = 2.0, before_stop=lambda: None
) -> None:
    """Announces `ready <name> address=HOST:PORT` on stdout (launchers wait for that line), then serves
    until SIGINT/SIGTERM or until a background task fails, and stops gracefully (`before_stop()` first)."""
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
    before_stop()
    await server.stop(grace)
    for t in done:
        if t is not stopper and not t.cancelled() and t.exception() is not None:
            raise t.exception()


def check_health(address: str, service: str = "", timeout: float = 5.0) -> bool:
    """True when the server at `address` answers grpc.health.v1 Check with SERVING."""
    with channel(address) as ch:
        try:
            reply = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING
