"""What a generation request is, independent of where it runs: sampling settings, the request, a
sampled token, and when a sequence stops. Imports no torch (the gateway uses it too)."""

from __future__ import annotations

from dataclasses import dataclass, field

from stagemesh.errors import InvalidArgument

MAX_LOGPROBS = 20


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0  # 1 = off
    top_k: int = 0  # 0 = off
    seed: int = 0
    logprobs: int = 0  # alternatives to report per token; 0 = none (the chosen token's logprob still is)

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise InvalidArgument(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise InvalidArgument(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InvalidArgument(f"top_k must be >= 0, got {self.top_k}")
        if not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise InvalidArgument(f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class SampledToken:
    token_id: int
    logprob: float
    top_logprobs: tuple[tuple[int, float], ...] = field(default=())


@dataclass(frozen=True)
class GenerationRequest:
    prompt_ids: tuple[int, ...]
    max_tokens: int
    sampling: SamplingParams = SamplingParams()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0  # EOS and stop tokens do not end the sequence before this many tokens

    def validate(self, vocab_size: int, max_context: int) -> None:
        """Raises InvalidArgument naming the field that cannot be served."""
        if not self.prompt_ids:
            raise InvalidArgument("prompt is empty")
        if self.max_tokens < 1:
            raise InvalidArgument(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise InvalidArgument(f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}")
        if len(self.prompt_ids) >= max_context:
            raise InvalidArgument(f"prompt has {len(self.prompt_ids)} tokens; the context is {max_context}")
        if len(self.prompt_ids) + self.max_tokens > max_context:
            raise InvalidArgument(
                f"prompt ({len(self.prompt_ids)} tokens) + max_tokens ({self.max_tokens}) exceeds the context of {max_context}"
            )
        bad = next((t for t in self.prompt_ids if not 0 <= t < vocab_size), None)
        if bad is not None:
            raise InvalidArgument(f"prompt token ids must be in [0, {vocab_size}); got {bad}")


def finish_reason(
    token: int, generated: int, req: GenerationRequest, eos_ids: tuple[int, ...], room: int
) -> str | None:
    """Why a sequence ends after emitting `token` as its `generated`-th token, or None to go on."""
    if generated < req.min_tokens:
        return "length" if room <= 0 else None
    if token in req.stop_token_ids:
        return "stop"
    if not req.ignore_eos and token in eos_ids:
        return "eos"
    if generated >= req.max_tokens or room <= 0:
        return "length"
    return None


def choice_seed(seed: int, index: int) -> int:
    """The seed of sample `index` of a request asking for n samples (OpenAI's `n`): sample 0 keeps the
    request's seed, the others get their own 63-bit seeds, so the n samples differ and each reproduces."""
    if index == 0:
        return seed
    import hashlib

    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1
