"""The public `stagemesh.v1.Generation` service: protobuf in, one call into the scheduler, protobuf out."""

from __future__ import annotations

import random
import uuid
from collections.abc import AsyncIterator

from stagemesh.errors import InvalidArgument
from stagemesh.gateway.output import TextOutput
from stagemesh.gateway.scheduler import FinishEvent, Scheduler, Sequence
from stagemesh.gateway.tokenizer import TextCodec
from stagemesh.models.requests import GenerationRequest, SampledToken, SamplingParams
from stagemesh.proto import generation_pb2 as pb
from stagemesh.proto import generation_pb2_grpc as pb_grpc
from stagemesh.proto.rpc import maps_errors, status_code

SERVICE = pb.DESCRIPTOR.services_by_name["Generation"].full_name
FINISH = {
    "length": pb.FINISH_REASON_LENGTH,
    "stop": pb.FINISH_REASON_STOP,
    "eos": pb.FINISH_REASON_EOS,
    "cancelled": pb.FINISH_REASON_CANCELLED,
    "error": pb.FINISH_REASON_ERROR,
}
DEFAULT_MAX_TOKENS = 256
MAX_PROMPT_BYTES = 1 << 20
MAX_STOP_STRINGS, MAX_STOP_CHARS = 16, 256


class GenerationServicer(pb_grpc.GenerationServicer):
    def __init__(self, scheduler: Scheduler, gateway) -> None:
        self.scheduler = scheduler
        self.gateway = gateway  # gateway.service.Gateway: codec, model info, metrics

    @maps_errors
    async def Generate(self, request: pb.GenerateRequest, context) -> AsyncIterator[pb.GenerateResponse]:
        sampling = check_request(request)  # before readiness: a bad request is refused as such at any time
        self.scheduler.check_ready()
        req, request_id = to_request(request, sampling, self.gateway.codec, self.scheduler.max_context)
        seq = self.scheduler.submit(req)
        output = TextOutput(self.gateway.codec, tuple(request.stop))
        try:
            while True:
                events = await _next_events(seq)
                response = pb.GenerateResponse(request_id=request_id)
                for event in events:
                    if isinstance(event, FinishEvent):
                        yield self._finish(response, seq, output, event)
                        if event.error is not None:
                            await context.abort(status_code(event.error), str(event.error))
                        return
                    if output.stopped:
                        continue  # tokens already generated past a stop string are dropped
                    _add_token(response, event.token, output, req.sampling.logprobs)
                    if output.stopped:
                        self.scheduler.cancel(seq, "stop")
                if response.token_ids:
                    yield response
        finally:
            self.scheduler.cancel(seq)  # the client went away or its deadline passed: free the KV now

    @maps_errors
    async def Complete(self, request: pb.GenerateRequest, context) -> pb.CompleteResponse:
        final = pb.CompleteResponse()
        async for part in self.Generate(request, context):
            final.request_id = part.request_id
            final.text += part.text
            final.token_ids.extend(part.token_ids)
            final.logprobs.extend(part.logprobs)
            final.finish_reason = part.finish_reason
            final.usage.CopyFrom(part.usage)
        return final

    @maps_errors
    async def ModelInfo(self, request: pb.ModelInfoRequest, context) -> pb.ModelInfoResponse:
        return self.gateway.model_info()

    def _finish(self, response: pb.GenerateResponse, seq: Sequence, output: TextOutput, event: FinishEvent):
        response.text += output.finish()
        response.finish_reason = FINISH[event.reason]
        if event.error is not None:
            response.error = str(event.error)
        now = self.scheduler.clock()
        response.usage.CopyFrom(
            pb.Usage(
                prompt_tokens=seq.prompt_len,
                completion_tokens=len(seq.generated),
                seed=seq.request.sampling.seed,
                time_to_first_token=(seq.first_token_at or now) - seq.submitted_at,
                total_time=now - seq.submitted_at,
            )
        )
        return response


async def _next_events(seq: Sequence) -> list:
    """Waits for one event, then takes whatever else is already there (one message for a burst)."""
    events = [await seq.events.get()]
    while not seq.events.empty() and not isinstance(events[-1], FinishEvent):
        events.append(seq.events.get_nowait())
    return events


def _add_token(response: pb.GenerateResponse, token: SampledToken, output: TextOutput, logprobs: int) -> None:
    response.token_ids.append(token.token_id)
    response.text += output.add(token.token_id)
    if logprobs:
        response.logprobs.append(
            pb.TokenLogprobs(
                token_id=token.token_id,
                logprob=token.logprob,
                top_ids=[i for i, _ in token.top_logprobs],
                top_logprobs=[lp for _, lp in token.top_logprobs],
            )
        )


def check_request(request: pb.GenerateRequest) -> SamplingParams:
    """What can be checked without the model; returns the request's sampling settings. InvalidArgument
    names the field at fault."""
    kind = request.WhichOneof("prompt")
    if kind is None:
        raise InvalidArgument("prompt: set text or token_ids")
    if kind == "text" and len(request.text.encode()) > MAX_PROMPT_BYTES:
        raise InvalidArgument(f"prompt.text is {len(request.text.encode())} bytes; the limit is {MAX_PROMPT_BYTES}")
    if kind == "token_ids" and not request.token_ids.ids:
        raise InvalidArgument("prompt is empty")
    if request.HasField("max_tokens") and request.max_tokens < 1:
        raise InvalidArgument(f"max_tokens must be >= 1, got {request.max_tokens}")
    if len(request.stop) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_CHARS for s in request.stop):
        raise InvalidArgument(f"stop: at most {MAX_STOP_STRINGS} strings of at most {MAX_STOP_CHARS} characters")
    return SamplingParams(
        temperature=request.temperature if request.HasField("temperature") else 0.0,
        top_p=request.top_p if request.HasField("top_p") else 1.0,
        top_k=request.top_k if request.HasField("top_k") else 0,
        seed=request.seed if request.HasField("seed") else random.getrandbits(63),
        logprobs=request.logprobs,
    )


def to_request(
    request: pb.GenerateRequest, sampling: SamplingParams, codec: TextCodec | None, max_context: int
) -> tuple[GenerationRequest, str]:
    """The request against the model served (after `check_request`); InvalidArgument names the field at fault."""
    if request.WhichOneof("prompt") == "text":
        if codec is None:
            raise InvalidArgument("prompt.text: this model has no tokenizer.json; send prompt.token_ids")
        prompt = codec.encode(request.text)
    else:
        prompt = list(request.token_ids.ids)
    if not prompt:
        raise InvalidArgument("prompt is empty")
    if len(prompt) >= max_context:
        raise InvalidArgument(f"prompt has {len(prompt)} tokens; the context is {max_context}")
    if request.HasField("max_tokens"):
        max_tokens = request.max_tokens
    else:
        max_tokens = min(DEFAULT_MAX_TOKENS, max_context - len(prompt))
    req = GenerationRequest(tuple(prompt), max_tokens, sampling, tuple(request.stop_token_ids), request.ignore_eos)
    return req, request.request_id or uuid.uuid4().hex
