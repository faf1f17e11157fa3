"""Python client library for a stagemesh gateway, sync (`Client`) and asyncio (`AsyncClient`).

    with Client("127.0.0.1:8000") as client:
        for chunk in client.stream(GenerationParams("Hello", max_tokens=32)):
            print(chunk.text, end="")

Typed requests and results; a failed call raises GatewayError carrying the gRPC status code.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field

import grpc
from stagemesh.proto import generation_pb2 as pb
from stagemesh.proto import generation_pb2_grpc as pb_grpc
from stagemesh.proto.rpc import aio_channel, channel, error_from_rpc

FINISH_NAMES = {
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_STOP: "stop",
    pb.FINISH_REASON_EOS: "eos",
    pb.FINISH_REASON_CANCELLED: "cancelled",
    pb.FINISH_REASON_ERROR: "error",
}


class GatewayError(Exception):
    """A failed call: `code` (a grpc.StatusCode) and `details` as the gateway sent them, and `error`, the
    stagemesh.errors class that status names (proto.rpc.error_from_rpc, the one gRPC -> domain mapping)."""

    def __init__(self, e: grpc.RpcError) -> None:
        self.code, self.details = e.code(), e.details()
        self.error = error_from_rpc(e, "gateway")
        super().__init__(f"{self.code.name}: {self.details}")


@dataclass(frozen=True)
class GenerationParams:
    prompt: str | list[int]
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int = 0
    request_id: str = ""

    def to_proto(self) -> pb.GenerateRequest:
        msg = pb.GenerateRequest(
            stop=list(self.stop),
            stop_token_ids=list(self.stop_token_ids),
            ignore_eos=self.ignore_eos,
            logprobs=self.logprobs,
            request_id=self.request_id,
        )
        if isinstance(self.prompt, str):
            msg.text = self.prompt
        else:
            msg.token_ids.ids.extend(self.prompt)
        for name in ("max_tokens", "temperature", "top_p", "top_k", "seed"):
            if getattr(self, name) is not None:
                setattr(msg, name, getattr(self, name))
        return msg


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    seed: int
    time_to_first_token: float
    total_time: float


@dataclass(frozen=True)
class StreamChunk:
    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...] = ()
    finish_reason: str | None = None
    usage: Usage | None = None
    request_id: str = ""


@dataclass
class Completion:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    usage: Usage | None = None
    request_id: str = ""

    def add(self, chunk: StreamChunk) -> None:
        self.text += chunk.text
        self.token_ids.extend(chunk.token_ids)
        self.logprobs.extend(chunk.logprobs)
        self.finish_reason = chunk.finish_reason or self.finish_reason
        self.usage = chunk.usage or self.usage
        self.request_id = chunk.request_id


def _chunk(msg) -> StreamChunk:
    logprobs = tuple(TokenLogprob(l.token_id, l.logprob, tuple(zip(l.top_ids, l.top_logprobs))) for l in msg.logprobs)
    usage = None
    if msg.HasField("usage"):
        u = msg.usage
        usage = Usage(u.prompt_tokens, u.completion_tokens, u.seed, u.time_to_first_token, u.total_time)
    return StreamChunk(
        msg.text, tuple(msg.token_ids), logprobs, FINISH_NAMES.get(msg.finish_reason), usage, msg.request_id
    )


class Client:
    """token: the gateway's client token (default: STAGEMESH_CLIENT_TOKEN); TLS files come from STAGEMESH_TLS_*."""

    def __init__(self, address: str, timeout: float | None = None, token: str | None = None) -> None:
        self._channel = channel(address, public=True, token=token)
        self._stub = pb_grpc.GenerationStub(self._channel)
        self.timeout = timeout

    def stream(self, params: GenerationParams, timeout: float | None = None) -> Iterator[StreamChunk]:
        call = self._stub.Generate(params.to_proto(), timeout=timeout or self.timeout)
        try:
            for msg in call:
                yield _chunk(msg)
        except grpc.RpcError as e:
            raise GatewayError(e) from None
        finally:
            call.cancel()  # leaving the loop early cancels the request and frees its KV

    def generate(self, params: GenerationParams, timeout: float | None = None) -> Completion:
        try:
            msg = self._stub.Complete(params.to_proto(), timeout=timeout or self.timeout)
        except grpc.RpcError as e:
            raise GatewayError(e) from None
        completion = Completion()
        completion.add(_chunk(msg))
        return completion

    def model_info(self) -> pb.ModelInfoResponse:
        try:
            return self._stub.ModelInfo(pb.ModelInfoRequest(), timeout=self.timeout or 10)
        except grpc.RpcError as e:
            raise GatewayError(e) from None

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncClient:
    def __init__(self, address: str, timeout: float | None = None, token: str | None = None) -> None:
        self._channel = aio_channel(address, public=True, token=token)
        self._stub = pb_grpc.GenerationStub(self._channel)
        self.timeout = timeout

    async def stream(self, params: GenerationParams, timeout: float | None = None) -> AsyncIterator[StreamChunk]:
        call = self._stub.Generate(params.to_proto(), timeout=timeout or self.timeout)
        try:
            async for msg in call:
                yield _chunk(msg)
        except grpc.aio.AioRpcError as e:
            raise GatewayError(e) from None
        finally:
            call.cancel()

    async def generate(self, params: GenerationParams, timeout: float | None = None) -> Completion:
        completion = Completion()
        async for chunk in self.stream(params, timeout):
            completion.add(chunk)
        return completion

    async def model_info(self) -> pb.ModelInfoResponse:
        try:
            return await self._stub.ModelInfo(pb.ModelInfoRequest(), timeout=self.timeout or 10)
        except grpc.aio.AioRpcError as e:
            raise GatewayError(e) from None

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


def generate_via_gateway(address: str, args, timeout: float, on_text: Callable[[str], None] | None) -> dict:
    """`stagemesh generate --gateway`: the same JSON as the reference engine's."""
    prompt = args.prompt if args.prompt is not None else list(args.prompt_ids)
    params = GenerationParams(
        prompt,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        ignore_eos=args.ignore_eos,
    )
    completion = Completion()
    try:
        with Client(address, timeout) as client:
            has_tokenizer = client.model_info().has_tokenizer
            for chunk in client.stream(params):
                completion.add(chunk)
                if on_text and chunk.text:
                    on_text(chunk.text)
    except GatewayError as e:
        raise e.error from None
    return {
        "token_ids": completion.token_ids,
        "text": completion.text if has_tokenizer else None,
        "finish_reason": completion.finish_reason,
    }
