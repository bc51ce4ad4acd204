"""The generator interface every QA backend implements, and the errors a backend raises.

A `Generator` makes the pairs of one chunk or raises `ChunkFailed` (for good, after its own
retries); it never fills a gap with pairs it made up. `MalformedOutput` is a model reply that is not
the strict JSON the prompt asked for: the model backends ask again, up to a limit, then fail the
chunk.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from services.common.qapair import QAPair
from services.qagen.chunk import Chunk


class ChunkFailed(Exception):
    """A chunk's generation failed for good (after retries); `reason` says why, for the session."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class MalformedOutput(ValueError):
    """A model's reply is not the strict JSON the prompt asked for."""


@runtime_checkable
class Generator(Protocol):
    """Makes the pairs of one chunk, or raises `ChunkFailed`."""

    def generate(self, chunk: Chunk, *, doc_title: str | None, strategies: Sequence[str]) -> list[QAPair]: ...
