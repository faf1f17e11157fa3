"""The OpenAI-compatible HTTP API's request bodies (pydantic), with vLLM's extras. Unknown fields are
ignored, as OpenAI does; a value of the wrong type or outside its range is a 400 naming the field.

Ranges that the domain objects check themselves (temperature, top_p, top_k, max_tokens against the
context) are left to them, so both public APIs say the same thing about the same mistake.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

MAX_LOGPROBS = 20  # vLLM's default --max-logprobs (OpenAI allows 5 on completions, 20 on chat)
MAX_N = 64


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    """What completions and chat share."""

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None  # default 1, as OpenAI and vLLM
    top_p: float | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM's extras
    top_k: int | None = None  # 0 or -1 = off
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    min_tokens: int = Field(0, ge=0)

    @property
    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)


class ChatMessage(_Body):
    model_config = ConfigDict(extra="allow")  # name, tool_calls, ... reach the template as they came
    role: str
    content: str | list[dict] | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    add_generation_prompt: bool = True  # vLLM's extra
    chat_template_kwargs: dict | None = None  # vLLM's extra: more variables for the template

    def conversation(self) -> list[dict]:
        """Messages as the template sees them; a list of text parts becomes one string (as vLLM does)."""
        out = []
        for m in self.messages:
            message = m.model_dump(exclude_none=True)
            if isinstance(m.content, list):
                message["content"] = "".join(p.get("text", "") for p in m.content if p.get("type") == "text")
            out.append(message)
        return out


class TokenizeRequest(_Body):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[int]
