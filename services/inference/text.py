"""Text out of token ids: incremental detokenizing and stop strings, shared by every decoding path."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class IncrementalDecoder:
    """Turns token ids into text one id at a time without splitting characters.

    Decoding each id alone would break multi-byte characters (byte-level tokens can hold part of a
    UTF-8 sequence) and spaces some tokenizers only render in context. So, like TGI and vLLM, decode a
    short window of recent ids and emit only what it adds, holding back text that ends in an
    unfinished character (U+FFFD) until a later id completes it.
    """

    def __init__(self, tokenizer: Any):
        self._tok = tokenizer
        self._ids: list[int] = []
        self._prefix = 0  # start of the decoding window
        self._read = 0  # ids before this index are already emitted
        self._prefix_text = ""

    def _decode(self, ids: list[int]) -> str:
        # cleanup of tokenization spaces rewrites text by context (" ." -> "."), which a window can't match
        return self._tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, token_id: int) -> str:
        """Add one id; return the text it completes (possibly empty)."""
        self._ids.append(token_id)
        text = self._decode(self._ids[self._prefix :])
        if len(text) > len(self._prefix_text) and not text.endswith("\ufffd"):
            piece = text[len(self._prefix_text) :]
            self._prefix, self._read = self._read, len(self._ids)
            self._prefix_text = self._decode(self._ids[self._prefix : self._read])
            return piece
        return ""

    def flush(self) -> str:
        """Text still held back (e.g. an unfinished character when generation ended)."""
        text = self._decode(self._ids[self._prefix :])
        piece = text[len(self._prefix_text) :]
        self._prefix = self._read = len(self._ids)
        self._prefix_text = ""
        return piece


class StopScanner:
    """Cuts a text stream at the first stop string, never emitting any part of it.

    Holds back the longest tail that could still grow into a stop string, so a stop string split
    across tokens is caught too.
    """

    def __init__(self, stops: Sequence[str]):
        self._stops = tuple(stops)
        self._held = ""

    def push(self, text: str) -> tuple[str, bool]:
        """Add text; return (text safe to emit, whether a stop string was hit)."""
        if not self._stops:
            return text, False
        buf = self._held + text
        hits = [i for i in (buf.find(s) for s in self._stops) if i >= 0]
        if hits:
            self._held = ""
            return buf[: min(hits)], True
        keep = self._partial_tail(buf)
        self._held = buf[len(buf) - keep :]
        return buf[: len(buf) - keep], False

    def _partial_tail(self, buf: str) -> int:
        longest = max(len(s) for s in self._stops) - 1
        for k in range(min(longest, len(buf)), 0, -1):
            tail = buf[-k:]
            if any(s.startswith(tail) for s in self._stops):
                return k
        return 0

    def flush(self) -> str:
        """Held-back text, released when the stream ends without a stop string."""
        held, self._held = self._held, ""
        return held
