"""What the OpenAI-compatible endpoints do, without HTTP: a request body becomes the same `GenerationRequest`
objects the gRPC servicer submits (one per prompt and sample, `n` seeds from `choice_seed`), the scheduler
runs them, and their tokens come back as `Delta`s that `openai_format` turns into OpenAI's JSON.

Errors are the domain's own (`InvalidArgument`, `NotFound`, `ResourceExhausted`, `Unavailable`); the HTTP
edge maps them to statuses in one place.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from stagemesh.errors import InvalidArgument, NotFound, StagemeshError
from stagemesh.gateway.chat_template import ChatTemplate
from stagemesh.gateway.openai_protocol import ChatCompletionRequest, CompletionRequest, _Sampling
from stagemesh.gateway.output import TextOutput
from stagemesh.gateway.scheduler import FinishEvent, Scheduler, Sequence
from stagemesh.gateway.server import DEFAULT_MAX_TOKENS, MAX_PROMPT_BYTES, MAX_STOP_CHARS, MAX_STOP_STRINGS
from stagemesh.gateway.tokenizer import TextCodec
from stagemesh.models.requests import GenerationRequest, SampledToken, SamplingParams, choice_seed

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's and vLLM's default for /v1/completions
FINISH = {"stop": "stop", "eos": "stop", "length": "length"}  # domain reason -> OpenAI's


@dataclass(frozen=True)
class Delta:
    """New output of choice `index`: its text delta and the tokens behind it; the last one has a reason."""

    index: int
    text: str
    tokens: tuple[SampledToken, ...] = ()
    finish_reason: str | None = None


@dataclass
class Choice:
    index: int
    prompt_index: int
    seq: Sequence
    output: TextOutput
    emitted: int = 0  # tokens delivered (those past a stop string are not)


@dataclass
class Run:
    """The choices of one request, in OpenAI's order (prompt by prompt, n samples each)."""

    prompts: list[list[int]]
    choices: list[Choice] = field(default_factory=list)

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    @property
    def completion_tokens(self) -> int:
        return sum(c.emitted for c in self.choices)


class OpenAIServing:
    def __init__(self, scheduler: Scheduler, gateway, served_model_name: str | None = None) -> None:
        self.scheduler = scheduler
        self.gateway = gateway  # gateway.service.Gateway: codec, chat template, plan
        self._name = served_model_name

    # ---- model and prompts ----

    @property
    def model_name(self) -> str:
        if self._name:
            return self._name
        topology = self.gateway.topology
        return topology.plan.spec.model_dir if topology is not None else ""

    def check_model(self, name: str | None) -> str:
        """The model a request names must be the one served (omitted = that one); NotFound otherwise."""
        if name is not None and name != self.model_name:
            raise NotFound(f"The model `{name}` does not exist. This gateway serves `{self.model_name}`.")
        return self.model_name

    def codec(self) -> TextCodec:
        self.scheduler.check_ready()
        if self.gateway.codec is None:
            raise InvalidArgument("prompt: this model has no tokenizer.json; send token ids")
        return self.gateway.codec

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if len(text.encode()) > MAX_PROMPT_BYTES:
            raise InvalidArgument(f"prompt is {len(text.encode())} bytes; the limit is {MAX_PROMPT_BYTES}")
        return self.codec().encode(text, add_special_tokens)

    def completion_prompts(self, req: CompletionRequest) -> list[list[int]]:
        p = req.prompt
        if isinstance(p, str):
            return [self.encode(p)]
        if p and all(isinstance(x, int) for x in p):
            return [list(p)]
        if not p:
            raise InvalidArgument("prompt is empty")
        return [self.encode(x) if isinstance(x, str) else list(x) for x in p]

    def chat_template(self) -> ChatTemplate:
        self.scheduler.check_ready()
        template = self.gateway.chat_template
        if template is None:
            raise InvalidArgument(
                "this model has no chat template (tokenizer_config.json chat_template or chat_template.jinja): "
                "use /v1/completions"
            )
        return template

    def chat_prompt(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> list[int]:
        text = self.chat_template().render(messages, add_generation_prompt, **kwargs)
        return self.encode(text, add_special_tokens=False)

    # ---- running ----

    def start(self, prompts: list[list[int]], req: _Sampling, max_tokens: int | None, logprobs: int) -> Run:
        """Submits every choice; if one is refused, the others are cancelled and the error raised."""
        stop = req.stop_strings
        if len(stop) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_CHARS for s in stop):
            raise InvalidArgument(f"stop: at most {MAX_STOP_STRINGS} strings of at most {MAX_STOP_CHARS} characters")
        run = Run(prompts)
        base_seed = (req.seed & (2**63 - 1)) if req.seed is not None else None
        try:
            for p, prompt in enumerate(prompts):
                for i in range(req.n):
                    seed = choice_seed(base_seed, i) if base_seed is not None else random.getrandbits(63)
                    request = self._request(prompt, req, max_tokens, logprobs, seed)
                    seq = self.scheduler.submit(request)
                    run.choices.append(Choice(len(run.choices), p, seq, TextOutput(self.gateway.codec, stop)))
        except StagemeshError:
            self.cancel(run)
            raise
        return run

    def _request(self, prompt: list[int], req: _Sampling, max_tokens: int | None, logprobs: int, seed: int):
        if max_tokens is None:
            max_tokens = min(DEFAULT_MAX_TOKENS, self.scheduler.max_context - len(prompt))
        sampling = SamplingParams(
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=0 if req.top_k in (None, -1) else req.top_k,
            seed=seed,
            logprobs=logprobs,
        )
        return GenerationRequest(
            tuple(prompt), max_tokens, sampling, tuple(req.stop_token_ids or ()), req.ignore_eos, req.min_tokens
        )

    def cancel(self, run: Run) -> None:
        for choice in run.choices:
            self.scheduler.cancel(choice.seq)  # no-op for finished ones; frees the KV of the others now

    async def deltas(self, run: Run) -> AsyncIterator[Delta]:
        """Every choice's output as it comes, interleaved; leaving early (a client that went away)
        cancels what still runs."""
        queue: asyncio.Queue = asyncio.Queue()
        pumps = [asyncio.ensure_future(self._pump(c, queue)) for c in run.choices]
        try:
            remaining = len(run.choices)
            while remaining:
                item = await queue.get()
                if isinstance(item, StagemeshError):
                    raise item
                remaining -= item.finish_reason is not None
                yield item
        finally:
            for pump in pumps:
                pump.cancel()
            self.cancel(run)

    async def _pump(self, choice: Choice, queue: asyncio.Queue) -> None:
        seq, output = choice.seq, choice.output
        while True:
            event = await seq.events.get()
            if isinstance(event, FinishEvent):
                if event.error is not None:
                    queue.put_nowait(event.error)
                    return
                reason = "stop" if output.stopped else FINISH.get(event.reason, event.reason)
                queue.put_nowait(Delta(choice.index, output.finish(), (), reason))
                return
            if output.stopped:
                continue  # generated past a stop string before the cancel landed: dropped
            text = output.add(event.token.token_id)
            choice.emitted += 1
            queue.put_nowait(Delta(choice.index, text, (event.token,)))
            if output.stopped:
                self.scheduler.cancel(seq, "stop")


def completion_max_tokens(req: CompletionRequest) -> int:
    return COMPLETION_DEFAULT_MAX_TOKENS if req.max_tokens is None else req.max_tokens


def chat_max_tokens(req: ChatCompletionRequest) -> int | None:
    """max_completion_tokens (OpenAI's current name), else max_tokens, else what the gRPC API defaults to."""
    return req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens


def chat_logprobs(req: ChatCompletionRequest) -> int:
    if req.top_logprobs and not req.logprobs:
        raise InvalidArgument("top_logprobs: set logprobs to true to use it")
    return req.top_logprobs or 0
