"""The `extractive` backend: the rules of `services.qagen.strategies` as a `Generator`.

Deterministic, grounded, no model, and it never fails a chunk; it also makes the document-level
pairs (`document_pairs`), which `generate_document` asks a generator for when it has them.
"""

from __future__ import annotations

from collections.abc import Sequence

from services.common.qapair import QAPair
from services.qagen import strategies as strategy_rules
from services.qagen.chunk import Chunk


class ExtractiveGenerator:
    """The rules of `strategies.py`: deterministic, grounded, no model; never fails."""

    concurrency = 1

    def generate(
        self, chunk: Chunk, *, doc_title: str | None = None, strategies: Sequence[str] | None = None
    ) -> list[QAPair]:
        return strategy_rules.chunk_pairs(chunk, doc_title=doc_title, strategies=strategies)

    def document_pairs(
        self,
        chunks: Sequence[Chunk],
        *,
        doc_title: str | None = None,
        strategies: Sequence[str] | None = None,
    ) -> list[QAPair]:
        return strategy_rules.document_pairs(chunks, doc_title=doc_title, strategies=strategies)
