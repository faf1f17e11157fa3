"""Turns a sequence's tokens into the text a client sees: incremental detokenization, and stop strings
(cut before the match; text that could still become a stop string is held back, never streamed)."""

from __future__ import annotations

from stagemesh.gateway.tokenizer import StreamDecoder, TextCodec


class TextOutput:
    def __init__(self, codec: TextCodec | None, stop: tuple[str, ...] = ()) -> None:
        self._decoder: StreamDecoder | None = codec.stream() if codec else None
        self._stop = tuple(s for s in stop if s)
        self._hold = max((len(s) for s in self._stop), default=1) - 1
        self._text = ""  # decoded so far
        self._sent = 0  # characters of _text already emitted
        self.stopped = False

    def add(self, token_id: int) -> str:
        """Text that can be streamed after this token; sets `stopped` when a stop string matched."""
        if self._decoder is None or self.stopped:
            return ""
        self._text += self._decoder.add(token_id)
        return self._emit(final=False)

    def finish(self) -> str:
        """The rest, when the sequence ends for any other reason."""
        if self._decoder is None or self.stopped:
            return ""
        self._text += self._decoder.flush()
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        hits = [i for i in (self._text.find(s, max(0, self._sent - self._hold)) for s in self._stop) if i >= 0]
        if hits:
            self.stopped = True
            end = min(hits)
        else:
            end = len(self._text) if final or not self._stop else max(self._sent, len(self._text) - self._hold)
        delta = self._text[self._sent : end]
        self._sent = max(self._sent, end)
        return delta
