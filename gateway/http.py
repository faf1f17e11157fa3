"""The OpenAI-compatible HTTP API (`--http-port`): a FastAPI app served by uvicorn inside the gateway's own
event loop, beside the gRPC server, over the same scheduler (no extra hop). Handlers are thin: body ->
`OpenAIServing` -> `Formatter`. Domain errors become HTTP statuses and OpenAI's error body in one function,
`error_response`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import socket
import ssl
import time
from collections.abc import AsyncIterator

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from stagemesh.errors import InvalidArgument, StagemeshError, Unauthenticated
from stagemesh.gateway.openai_format import ChoiceText, Formatter
from stagemesh.gateway.openai_protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)
from stagemesh.gateway.openai_serving import OpenAIServing, Run, chat_logprobs, chat_max_tokens, completion_max_tokens
from stagemesh.proto import security

log = logging.getLogger("stagemesh.gateway.http")

HTTP_STATUS = {  # errors.py code -> HTTP status
    "INVALID_ARGUMENT": 400,
    "FAILED_PRECONDITION": 400,
    "UNAUTHENTICATED": 401,
    "NOT_FOUND": 404,
    "RESOURCE_EXHAUSTED": 429,
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
}
ERROR_TYPES = {  # named as vLLM names them (the openai client's exception classes)
    400: "BadRequestError",
    401: "AuthenticationError",
    404: "NotFoundError",
    429: "RateLimitError",
    503: "ServiceUnavailableError",
    504: "TimeoutError",
    500: "InternalServerError",
}
OPEN_PATHS = ("/health", "/metrics")  # as grpc.health is: no token needed


def error_body(error: StagemeshError, param: str | None = None) -> tuple[int, dict]:
    """The one place a domain error becomes an HTTP status and OpenAI's error body."""
    status = HTTP_STATUS.get(error.code, 500)
    return status, {"error": {"message": str(error), "type": ERROR_TYPES[status], "param": param, "code": status}}


def error_response(error: StagemeshError, param: str | None = None) -> JSONResponse:
    status, body = error_body(error, param)
    return JSONResponse(body, status_code=status)


def check_bearer(request: Request) -> None:
    """With --client-token, every path but /health and /metrics wants `Authorization: Bearer <token>`."""
    token = security.current().client_token
    if token is None or request.url.path in OPEN_PATHS:
        return
    sent = request.headers.get("authorization", "")
    if not hmac.compare_digest(sent.encode(), f"Bearer {token}".encode()):
        raise Unauthenticated("missing or wrong bearer token" if sent else "a bearer token is required")


def build_app(serving: OpenAIServing, gateway) -> FastAPI:
    app = FastAPI(title="stagemesh", docs_url=None, redoc_url=None, dependencies=[Depends(check_bearer)])
    started = int(time.time())

    @app.exception_handler(StagemeshError)
    async def domain_error(request: Request, error: StagemeshError):
        return error_response(error)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, error: RequestValidationError):
        first = error.errors()[0] if error.errors() else {}
        loc = first.get("loc", ())
        param = str(loc[1]) if len(loc) > 1 else None  # the body's field, not pydantic's union branch
        return error_response(InvalidArgument(f"{param or 'body'}: {first.get('msg', 'invalid request')}"), param)

    @app.get("/health")
    async def health():
        return Response(status_code=200 if serving.scheduler.sink is not None else 503)

    @app.get("/metrics")
    async def metrics():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(gateway.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        serving.scheduler.check_ready()
        card = {"id": serving.model_name, "object": "model", "created": started, "owned_by": "stagemesh"}
        card |= {
            "root": gateway.topology.plan.spec.model_dir,
            "parent": None,
            "max_model_len": serving.scheduler.max_context,
        }
        return {"object": "list", "data": [card]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        model = serving.check_model(body.model)
        run = serving.start(serving.completion_prompts(body), body, completion_max_tokens(body), body.logprobs or 0)
        formatter = Formatter("completion", model, gateway.codec, body.logprobs is not None)
        return await _answer(serving, run, formatter, body.stream, body.include_usage, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        model = serving.check_model(body.model)
        logprobs = chat_logprobs(body)
        prompt = serving.chat_prompt(
            body.conversation(), body.add_generation_prompt, **(body.chat_template_kwargs or {})
        )
        run = serving.start([prompt], body, chat_max_tokens(body), logprobs)
        formatter = Formatter("chat", model, gateway.codec, body.logprobs)
        return await _answer(serving, run, formatter, body.stream, body.include_usage, request)

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        serving.check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise InvalidArgument("give exactly one of prompt or messages")
        if body.messages is not None:
            messages = [m.model_dump(exclude_none=True) for m in body.messages]
            tokens = serving.chat_prompt(messages, body.add_generation_prompt)
        else:
            tokens = serving.encode(body.prompt, body.add_special_tokens)
        return {"count": len(tokens), "max_model_len": serving.scheduler.max_context, "tokens": tokens}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        serving.check_model(body.model)
        return {"prompt": serving.codec().decode(body.tokens)}

    return app


async def _answer(serving: OpenAIServing, run: Run, formatter: Formatter, stream: bool, include_usage: bool, request):
    if stream:
        return StreamingResponse(_sse(serving, run, formatter, include_usage), media_type="text/event-stream")
    collect = asyncio.ensure_future(_collect(serving, run, formatter))
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait([collect, gone], return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not collect.done():  # the client went away: stop generating for it and free the KV now
            collect.cancel()
            serving.cancel(run)
    return collect.result() if not collect.cancelled() else Response(status_code=499)


async def _collect(serving: OpenAIServing, run: Run, formatter: Formatter) -> dict:
    gathered = [ChoiceText() for _ in run.choices]
    async for delta in serving.deltas(run):
        gathered[delta.index].add(delta)
    return formatter.response(run, gathered)


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _sse(serving: OpenAIServing, run: Run, formatter: Formatter, include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events as OpenAI's clients parse them; a client that disconnects cancels this generator
    (Starlette does), and leaving `deltas` cancels the sequences."""
    try:
        for chunk in formatter.role_chunks(run):
            yield _event(chunk)
        async for delta in serving.deltas(run):
            yield _event(formatter.chunk(delta))
        if include_usage:
            yield _event(formatter.usage_chunk(run))
    except StagemeshError as e:  # after the headers went out, the error travels as an event
        yield _event(error_body(e)[1])
    finally:
        serving.cancel(run)
    yield "data: [DONE]\n\n"


def _event(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


# ---- the server ----


class _Server:
    """uvicorn inside an event loop it does not own: no signal handlers of its own (run_service has them)."""

    def __init__(self, app: FastAPI, host: str, port: int) -> None:
        import uvicorn

        sec = security.current()
        sec.check_listen(host, protected_by_token=bool(sec.client_token))
        tls = {}
        if sec.tls:  # the same mutual TLS as the gRPC API: the client presents a certificate of the cluster CA
            tls = dict(
                ssl_certfile=sec.tls_cert,
                ssl_keyfile=sec.tls_key,
                ssl_ca_certs=sec.tls_ca,
                ssl_cert_reqs=ssl.CERT_REQUIRED,
            )
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind((host, port))
        self.port = self.socket.getsockname()[1]
        self.scheme = "https" if sec.tls else "http"
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off", **tls)
        self.server = uvicorn.Server(config)
        self.server.capture_signals = contextlib.nullcontext

    async def serve(self) -> None:
        try:
            await self.server.serve(sockets=[self.socket])
        finally:
            self.socket.close()


def http_server(serving: OpenAIServing, gateway, host: str, port: int) -> _Server:
    """Binds now (port 0 = a free one: `.port` has it); `await server.serve()` serves."""
    return _Server(build_app(serving, gateway), host, port)
