"""`stagemesh.LLM`: the offline API, shaped like vLLM's. It starts the same local mesh as `stagemesh up` (real
processes, deploy.launcher), sends every prompt through the gRPC client at once (the gateway batches them
continuously) and stops the mesh on close or exit. A convenience over the mesh, not a second engine.

    with LLM(model="checkpoints/smollm2", tensor_parallel_size=3, pipeline_parallel_size=2) as llm:
        outs = llm.generate(["The capital of France is"], SamplingParams(max_tokens=16, temperature=0))
"""

from __future__ import annotations

import asyncio
import random
import sys
import uuid
import weakref
from dataclasses import dataclass, field

from stagemesh.deploy.commands import MeshLayout
from stagemesh.errors import InvalidArgument
from stagemesh.models.requests import choice_seed


@dataclass(frozen=True)
class SamplingParams:
    """vLLM's sampling options (and defaults: temperature 1, 16 tokens) for `LLM.generate` / `LLM.chat`."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1 = off
    seed: int | None = None  # None = a fresh one per request
    max_tokens: int | None = 16  # None = the gateway's default (256, or what the context leaves)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None  # alternatives per token to report (the chosen token's always comes with them)

    def __post_init__(self) -> None:
        if self.n < 1:
            raise InvalidArgument(f"n must be >= 1, got {self.n}")


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None  # "stop" (EOS, a stop string or stop token) or "length"
    logprobs: list[dict[int, float]] | None = None  # per token: {token id: logprob}, the chosen one included
    cumulative_logprob: float | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = True


class LLM:
    def __init__(
        self,
        model: str,
        tensor_parallel_size: int = 1,
        pipeline_parallel_size: int = 1,
        startup_timeout: float = 300.0,
        **layout,
    ) -> None:
        """`layout`: more MeshLayout fields (dtype, device, threads, kv_memory, max_running, ...)."""
        from stagemesh.deploy.launcher import LocalMesh
        from stagemesh.gateway.chat_template import ChatTemplate
        from stagemesh.gateway.tokenizer import TextCodec

        self.layout = MeshLayout(model_dir=model, tp=tensor_parallel_size, pp=pipeline_parallel_size, **layout)
        self.codec = TextCodec.from_dir(model)
        self.chat_template = ChatTemplate.from_dir(model)
        self._mesh = LocalMesh(self.layout, log=sys.stderr)
        self._finalizer = weakref.finalize(self, self._mesh.stop)  # on close, garbage collection or exit
        try:
            self._mesh.start(timeout=startup_timeout)
        except BaseException:
            self.close()
            raise
        self.gateway = self._mesh.gateway

    # ---- the API ----

    def generate(self, prompts, sampling_params: SamplingParams | None = None, use_tqdm: bool = True):
        """prompts: a string, a list of strings, {"prompt_token_ids": [...]}, or a list of those."""
        items = [self._prompt(p) for p in (prompts if isinstance(prompts, list) else [prompts])]
        return self._run(items, sampling_params or SamplingParams(), use_tqdm)

    def chat(self, messages, sampling_params: SamplingParams | None = None, use_tqdm: bool = True, **template):
        """messages: one conversation (a list of {"role", "content"}) or a list of conversations; each is
        rendered with the checkpoint's chat template, as transformers' apply_chat_template renders it."""
        if self.chat_template is None:
            raise InvalidArgument(f"{self.layout.model_dir} has no chat template: use generate()")
        conversations = messages if messages and isinstance(messages[0], list) else [messages]
        add_generation_prompt = template.pop("add_generation_prompt", True)
        items = []
        for conversation in conversations:
            text = self.chat_template.render(conversation, add_generation_prompt, **template)
            items.append((text, self._require_codec().encode(text, add_special_tokens=False)))
        return self._run(items, sampling_params or SamplingParams(), use_tqdm)

    def close(self) -> None:
        self._finalizer()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- inside ----

    def _require_codec(self):
        if self.codec is None:
            raise InvalidArgument(f"{self.layout.model_dir} has no tokenizer.json: give prompt_token_ids")
        return self.codec

    def _prompt(self, prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self._require_codec().encode(prompt)
        if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            return prompt.get("prompt"), list(prompt["prompt_token_ids"])
        if isinstance(prompt, dict) and "prompt" in prompt:
            return prompt["prompt"], self._require_codec().encode(prompt["prompt"])
        raise InvalidArgument("a prompt is a string or {'prompt_token_ids': [...]}")

    def _run(self, items: list[tuple[str | None, list[int]]], params: SamplingParams, use_tqdm: bool):
        from tqdm import tqdm

        with tqdm(total=len(items), desc="Processed prompts", disable=not use_tqdm or len(items) < 2) as bar:
            return asyncio.run(self._all(items, params, bar))

    async def _all(self, items, params: SamplingParams, bar) -> list[RequestOutput]:
        from stagemesh.gateway.client import AsyncClient

        limit = asyncio.Semaphore(self.layout.max_running)  # the gateway's queue stays short of full

        async def one(client, prompt: str | None, ids: list[int]) -> RequestOutput:
            async with limit:
                out = RequestOutput(uuid.uuid4().hex, prompt, ids)
                seed = params.seed if params.seed is not None else random.getrandbits(63)
                choices = [client.generate(_params(ids, params, choice_seed(seed, i))) for i in range(params.n)]
                for i, done in enumerate(await asyncio.gather(*choices)):
                    out.outputs.append(_completion(i, done, params.logprobs is not None))
                bar.update(1)
                return out

        async with AsyncClient(self.gateway) as client:
            return list(await asyncio.gather(*(one(client, p, ids) for p, ids in items)))


def _params(ids: list[int], p: SamplingParams, seed: int):
    from stagemesh.gateway.client import GenerationParams

    stop = (p.stop,) if isinstance(p.stop, str) else tuple(p.stop or ())
    return GenerationParams(
        ids,
        max_tokens=p.max_tokens,
        temperature=p.temperature,
        top_p=p.top_p,
        top_k=max(0, p.top_k),
        seed=seed,
        stop=stop,
        stop_token_ids=tuple(p.stop_token_ids or ()),
        ignore_eos=p.ignore_eos,
        logprobs=p.logprobs or 0,
    )


def _completion(index: int, done, with_logprobs: bool) -> CompletionOutput:
    reason = "stop" if done.finish_reason in ("stop", "eos") else done.finish_reason
    out = CompletionOutput(index, done.text, list(done.token_ids), reason)
    if with_logprobs:
        out.logprobs = [{l.token_id: l.logprob, **dict(l.top)} for l in done.logprobs]
        out.cumulative_logprob = sum(l.logprob for l in done.logprobs)
    return out
