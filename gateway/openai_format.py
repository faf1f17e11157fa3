"""OpenAI's JSON shapes for what `openai_serving` produces: completion and chat objects, their streamed
chunks, usage, logprobs (the legacy completions layout and chat's `content` list). Plain dicts."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

from stagemesh.gateway.openai_serving import Delta, Run
from stagemesh.gateway.tokenizer import TextCodec
from stagemesh.models.requests import SampledToken


def usage(run: Run) -> dict:
    prompt, completion = run.prompt_tokens, run.completion_tokens
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


@dataclass
class ChoiceText:
    """A choice gathered for a non-streamed answer."""

    text: str = ""
    tokens: list[SampledToken] = field(default_factory=list)
    finish_reason: str | None = None

    def add(self, delta: Delta) -> None:
        self.text += delta.text
        self.tokens.extend(delta.tokens)
        self.finish_reason = delta.finish_reason or self.finish_reason


class Formatter:
    """Builds one request's objects; `kind` is "completion" or "chat"."""

    def __init__(self, kind: str, model: str, codec: TextCodec | None, logprobs: bool) -> None:
        self.kind, self.model, self.codec, self.logprobs = kind, model, codec, logprobs
        self.id = ("cmpl-" if kind == "completion" else "chatcmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self._offsets: dict[int, int] = {}  # completions' text_offset per choice

    def _envelope(self, obj: str, choices: list[dict]) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices}

    # ---- whole answers ----

    def response(self, run: Run, gathered: list[ChoiceText]) -> dict:
        if self.kind == "completion":
            choices = [self._completion_choice(i, c.text, c.tokens, c.finish_reason) for i, c in enumerate(gathered)]
            return self._envelope("text_completion", choices) | {"usage": usage(run)}
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": c.text},
                "logprobs": self._chat_logprobs(c.tokens),
                "finish_reason": c.finish_reason,
            }
            for i, c in enumerate(gathered)
        ]
        return self._envelope("chat.completion", choices) | {"usage": usage(run)}

    # ---- streamed chunks ----

    def role_chunks(self, run: Run) -> list[dict]:
        """Chat streams open each choice with the assistant role (as OpenAI does); completions do not."""
        if self.kind == "completion":
            return []
        return [self._chunk({"index": c.index, "delta": {"role": "assistant", "content": ""}}) for c in run.choices]

    def chunk(self, delta: Delta) -> dict:
        if self.kind == "completion":
            return self._chunk(self._completion_choice(delta.index, delta.text, delta.tokens, delta.finish_reason))
        content = {"content": delta.text} if delta.text or delta.finish_reason is None else {}
        choice = {"index": delta.index, "delta": content, "logprobs": self._chat_logprobs(delta.tokens)}
        return self._chunk(choice | {"finish_reason": delta.finish_reason})

    def usage_chunk(self, run: Run) -> dict:
        return self._chunk(None) | {"usage": usage(run)}

    def _chunk(self, choice: dict | None) -> dict:
        obj = "text_completion" if self.kind == "completion" else "chat.completion.chunk"
        if choice is not None:
            choice.setdefault("logprobs", None)
            choice.setdefault("finish_reason", None)
        return self._envelope(obj, [choice] if choice is not None else [])

    # ---- pieces ----

    def _completion_choice(self, index: int, text: str, tokens, finish_reason) -> dict:
        logprobs = self._completion_logprobs(index, tokens) if self.logprobs else None
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}

    def _token(self, token_id: int) -> str:
        return self.codec.token_text(token_id) if self.codec else str(token_id)

    def _completion_logprobs(self, index: int, tokens) -> dict:
        names = [self._token(t.token_id) for t in tokens]
        offsets = []
        for name in names:
            offsets.append(self._offsets.get(index, 0))
            self._offsets[index] = offsets[-1] + len(name)
        return {
            "tokens": names,
            "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [{self._token(i): lp for i, lp in t.top_logprobs} for t in tokens],
            "text_offset": offsets,
        }

    def _chat_logprobs(self, tokens) -> dict | None:
        if not self.logprobs:
            return None
        return {"content": [self._chat_token(t) for t in tokens]}

    def _chat_token(self, t: SampledToken) -> dict:
        entry = self._logprob_entry(t.token_id, t.logprob)
        return entry | {"top_logprobs": [self._logprob_entry(i, lp) for i, lp in t.top_logprobs]}

    def _logprob_entry(self, token_id: int, logprob: float) -> dict:
        text = self._token(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}
