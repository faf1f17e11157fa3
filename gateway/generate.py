"""`stagemesh generate`: one request through the in-process reference engine or a running mesh's gateway,
with the same output either way (streamed text, or one JSON object with token_ids, text, finish_reason)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from stagemesh.gateway.tokenizer import TextCodec, require_codec


@dataclass(frozen=True)
class GenerateArgs:
    prompt: str | None
    prompt_ids: list[int] | None
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    ignore_eos: bool = False


def run_generate(
    args: GenerateArgs,
    model_dir: str | None = None,
    gateway: str | None = None,
    dtype: str = "float32",
    device: str = "cpu",
    timeout: float = 300.0,
    on_text: Callable[[str], None] | None = None,
) -> dict:
    if gateway is not None:
        from stagemesh.gateway.client import generate_via_gateway

        return generate_via_gateway(gateway, args, timeout=timeout, on_text=on_text)
    return _generate_locally(model_dir, args, dtype, device, on_text)


def _generate_locally(model_dir: str, args: GenerateArgs, dtype: str, device: str, on_text) -> dict:
    from stagemesh.models.dtypes import serving_dtype
    from stagemesh.models.engine import ReferenceEngine
    from stagemesh.models.requests import GenerationRequest, SamplingParams

    codec = TextCodec.from_dir(model_dir)
    prompt_ids = args.prompt_ids if args.prompt is None else require_codec(codec, model_dir).encode(args.prompt)
    sampling = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed)
    request = GenerationRequest(tuple(prompt_ids), args.max_tokens, sampling, ignore_eos=args.ignore_eos)
    engine = ReferenceEngine(model_dir, dtype=serving_dtype(dtype), device=device)
    result = engine.generate([request])[0]
    text = codec.decode(result.token_ids) if codec else None
    if on_text and text:
        on_text(text)
    return {
        "token_ids": result.token_ids,
        "text": text,
        "finish_reason": result.finish_reason,
    }
