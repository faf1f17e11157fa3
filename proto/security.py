"""Who may talk to a stagemesh process: optional mutual TLS between all components (certificates from
files) and bearer tokens — a client token on the gateway's public API, a cluster token on every internal
service. One process-wide setting, read from STAGEMESH_* environment variables (the CLI flags set them,
so `stagemesh up` hands them to its children).

torch.distributed traffic inside a stage (the TCPStore rendezvous, gloo, NCCL) is not covered: keep it on
a private network (docs/deploy.md).
"""

from __future__ import annotations

import hmac
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

import grpc
from stagemesh.errors import FailedPrecondition

ENV = {
    "tls_cert": "STAGEMESH_TLS_CERT",
    "tls_key": "STAGEMESH_TLS_KEY",
    "tls_ca": "STAGEMESH_TLS_CA",
    "cluster_token": "STAGEMESH_CLUSTER_TOKEN",
    "client_token": "STAGEMESH_CLIENT_TOKEN",
    "insecure": "STAGEMESH_INSECURE",
}
HEALTH_CHECK = "/grpc.health.v1.Health/Check"  # probes need no token (they still need TLS when it is on)


@dataclass(frozen=True)
class Security:
    tls_cert: str | None = None  # this component's certificate chain (PEM)
    tls_key: str | None = None
    tls_ca: str | None = None  # the cluster CA: peers must present certificates it signed
    cluster_token: str | None = None  # required on internal services, sent by every component
    client_token: str | None = None  # required on the gateway's public API, sent by clients
    insecure: bool = False  # the operator's explicit opt-in to listen beyond loopback without protection

    @classmethod
    def from_env(cls) -> Security:
        values = {field: os.environ.get(name) or None for field, name in ENV.items()}
        values["insecure"] = (values["insecure"] or "").lower() in ("1", "true", "yes")
        security = cls(**values)
        security.check_files()
        return security

    def to_env(self) -> dict[str, str]:
        env = {ENV[f]: getattr(self, f) for f in ENV if f != "insecure" and getattr(self, f)}
        return env | ({ENV["insecure"]: "1"} if self.insecure else {})

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    def check_files(self) -> None:
        given = [self.tls_cert, self.tls_key, self.tls_ca]
        if any(given) and not all(given):
            raise FailedPrecondition("mutual TLS needs all three of --tls-cert, --tls-key and --tls-ca")
        for path in filter(None, given):
            if not Path(path).is_file():
                raise FailedPrecondition(f"TLS file {path} does not exist")

    def check_listen(self, host: str, protected_by_token: bool) -> None:
        """Refuses to listen beyond loopback with neither TLS nor a token, unless opted in."""
        if self.tls or protected_by_token or self.insecure or _is_loopback(host):
            return
        raise FailedPrecondition(
            f"refusing to listen on {host} without TLS or a token: set --tls-cert/--tls-key/--tls-ca or a token, "
            "or pass --insecure (STAGEMESH_INSECURE=1) to accept unauthenticated connections"
        )

    def read(self, path: str | None) -> bytes | None:
        return Path(path).read_bytes() if path else None


def _is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


_current: Security | None = None


def current() -> Security:
    global _current
    if _current is None:
        _current = Security.from_env()
    return _current


def configure(security: Security) -> None:
    """Sets this process's security (and the environment its children inherit)."""
    global _current
    security.check_files()
    _current = security
    os.environ.update(security.to_env())


# ---- TLS credentials and bearer tokens on the wire ----


def server_credentials(security: Security) -> grpc.ServerCredentials:
    """Mutual TLS: the server presents its certificate and requires one signed by the cluster CA."""
    pair = (security.read(security.tls_key), security.read(security.tls_cert))
    return grpc.ssl_server_credentials(
        [pair], root_certificates=security.read(security.tls_ca), require_client_auth=True
    )


def channel_credentials(security: Security) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=security.read(security.tls_ca),
        private_key=security.read(security.tls_key),
        certificate_chain=security.read(security.tls_cert),
    )


class TokenCheck(grpc.aio.ServerInterceptor):
    """Rejects calls without `authorization: Bearer <token>` (UNAUTHENTICATED) before they reach a servicer."""

    def __init__(self, token_for_method) -> None:
        self.token_for_method = token_for_method  # method path -> required token, or None

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        token = self.token_for_method(details.method)
        sent = dict(details.invocation_metadata or ()).get("authorization", "")
        if handler is None or token is None or hmac.compare_digest(sent, f"Bearer {token}"):
            return handler
        return _refusal(handler, "missing or wrong bearer token" if sent else "a bearer token is required")


def _refusal(handler, message: str):
    async def unary(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def streaming(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover  (makes this an async generator, as streaming handlers are)

    kinds = {
        (False, False): grpc.unary_unary_rpc_method_handler(unary),
        (False, True): grpc.unary_stream_rpc_method_handler(streaming),
        (True, False): grpc.stream_unary_rpc_method_handler(unary),
        (True, True): grpc.stream_stream_rpc_method_handler(streaming),
    }
    return kinds[(handler.request_streaming, handler.response_streaming)]


def server_token_check(security: Security, public: bool) -> TokenCheck | None:
    """The gateway (public) wants the client token on its API; internal services want the cluster token."""

    def token_for(method: str) -> str | None:
        if method == HEALTH_CHECK:
            return None
        if public:
            return security.client_token
        return security.cluster_token

    if (security.client_token if public else security.cluster_token) is None:
        return None
    return TokenCheck(token_for)


class AddToken(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Sends `authorization: Bearer <token>` with every call of a blocking channel."""

    def __init__(self, token: str) -> None:
        self.token = token

    def _details(self, details):
        return _ClientCallDetails(
            details.method,
            details.timeout,
            list(details.metadata or ()) + [("authorization", f"Bearer {self.token}")],
            details.credentials,
            details.wait_for_ready,
            details.compression,
        )

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, requests):
        return continuation(self._details(details), requests)

    def intercept_stream_stream(self, continuation, details, requests):
        return continuation(self._details(details), requests)


class _ClientCallDetails(grpc.ClientCallDetails):
    def __init__(self, method, timeout, metadata, credentials, wait_for_ready, compression) -> None:
        self.method, self.timeout, self.metadata = method, timeout, metadata
        self.credentials, self.wait_for_ready, self.compression = credentials, wait_for_ready, compression


def aio_token_interceptors(token: str) -> list:
    """The asyncio equivalents of AddToken, one per call kind."""

    def details(d):
        metadata = grpc.aio.Metadata(*(tuple(d.metadata or ())), ("authorization", f"Bearer {token}"))
        return grpc.aio.ClientCallDetails(d.method, d.timeout, metadata, d.credentials, d.wait_for_ready)

    class UnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):
        async def intercept_unary_unary(self, continuation, d, request):
            return await continuation(details(d), request)

    class UnaryStream(grpc.aio.UnaryStreamClientInterceptor):
        async def intercept_unary_stream(self, continuation, d, request):
            return await continuation(details(d), request)

    class StreamUnary(grpc.aio.StreamUnaryClientInterceptor):
        async def intercept_stream_unary(self, continuation, d, requests):
            return await continuation(details(d), requests)

    class StreamStream(grpc.aio.StreamStreamClientInterceptor):
        async def intercept_stream_stream(self, continuation, d, requests):
            return await continuation(details(d), requests)

    return [UnaryUnary(), UnaryStream(), StreamUnary(), StreamStream()]
