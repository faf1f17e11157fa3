"""Text <-> token ids for a checkpoint's `tokenizer.json`, with incremental detokenization for streaming.

Imports no torch. A checkpoint without `tokenizer.json` has no TextCodec: token ids still work, text
gets a clear error.
"""

from __future__ import annotations

from pathlib import Path

from stagemesh.errors import InvalidArgument


class TextCodec:
    def __init__(self, tokenizer) -> None:
        self._tok = tokenizer
        self.vocab_size = tokenizer.get_vocab_size()

    @classmethod
    def from_dir(cls, path: str | Path) -> TextCodec | None:
        file = Path(path) / "tokenizer.json"
        if not file.is_file():
            return None
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_file(str(file)))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """add_special_tokens=False for a rendered chat template, which carries its own (as transformers)."""
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    def token_text(self, token_id: int) -> str:
        """One token as text, special tokens included (how logprobs name their tokens)."""
        return self._tok.decode([token_id], skip_special_tokens=False)

    def stream(self) -> StreamDecoder:
        return StreamDecoder(self)


class StreamDecoder:
    """Turns generated ids into text deltas without splitting multi-byte characters (TGI's offsets)."""

    def __init__(self, codec: TextCodec) -> None:
        self._codec = codec
        self._ids: list[int] = []
        self._prefix = 0  # ids before this one are context only
        self._read = 0  # text of ids[_prefix:_read] has been emitted

    def add(self, token_id: int) -> str:
        self._ids.append(token_id)
        emitted = self._codec.decode(self._ids[self._prefix : self._read])
        text = self._codec.decode(self._ids[self._prefix :])
        if len(text) > len(emitted) and not text.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._ids)
            return text[len(emitted) :]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end)."""
        emitted = self._codec.decode(self._ids[self._prefix : self._read])
        text = self._codec.decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        return text[len(emitted) :]


def require_codec(codec: TextCodec | None, model_dir: str | Path) -> TextCodec:
    if codec is None:
        raise InvalidArgument(f"{model_dir} has no tokenizer.json: send token ids (--prompt-ids) instead of text")
    return codec
