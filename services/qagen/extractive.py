"""The `extractive` QA backend: deterministic, grounded question-answer pairs without a language model.

Each rule reads a chunk's sentences and writes questions from templates; every answer is quoted from
the chunk (`answer in chunk.text`), so a pair never says more than the document does. The rule sets
live in `services.qagen.rules` behind `strategies.py` (quiz, definition, wh, summaries, metadata,
vague questions, paraphrases); the sentence helpers they share in `text.py`. `filter_pairs` drops
empty, too short, too long and near-duplicate pairs, and `make_pairs` ties chunking, rules and
filtering together for one document; `quality.py` holds the checks every pair passes, and
`pipeline.py` the pipeline `make_pairs` runs.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from services.common.qapair import QAPair, pair_id_for
from services.qagen import quality
from services.qagen.backends.extractive import ExtractiveGenerator
from services.qagen.chunk import Chunk, LengthFn, chunk_text
from services.qagen.clean import chunk_clean
from services.qagen.pipeline import generate_document
from services.qagen.quality import DUPLICATE_JACCARD
from services.qagen.rules.base import MAX_PER_RULE
from services.qagen.rules.definition import definitions
from services.qagen.rules.quiz import dates, entities, fallback, generate_pairs, numbers
from services.qagen.text import (
    MAX_ANSWER_CHARS,
    MIN_ANSWER_CHARS,
    MIN_CONTENT_WORDS,
    MIN_DOCUMENT_WORDS,
    has_content,
    is_metadata_line,
    prose_words,
)

# the names this module held before the rules moved out, for the callers that import them from here
__all__ = [
    "DEFAULT_MAX_TOKENS",
    "DEFAULT_OVERLAP_TOKENS",
    "DUPLICATE_JACCARD",
    "MAX_ANSWER_CHARS",
    "MAX_PER_RULE",
    "MIN_ANSWER_CHARS",
    "MIN_CONTENT_WORDS",
    "MIN_DOCUMENT_WORDS",
    "REASONS",
    "QAPair",
    "chunk_document",
    "dates",
    "definitions",
    "entities",
    "fallback",
    "filter_pairs",
    "generate_pairs",
    "has_content",
    "is_metadata_line",
    "make_pairs",
    "numbers",
    "pair_id_for",
    "prose_words",
]

# Chunk sizes of `make_pairs` when a tokenizer's `length_fn` is given and no size is: in tokens.
DEFAULT_MAX_TOKENS = 320
DEFAULT_OVERLAP_TOKENS = 40

REASONS = ("empty", "too_short", "too_long", "duplicate_question")


def filter_pairs(
    pairs: Iterable[QAPair],
    *,
    min_answer_chars: int = MIN_ANSWER_CHARS,
    max_answer_chars: int = MAX_ANSWER_CHARS,
    duplicate_jaccard: float = DUPLICATE_JACCARD,
) -> tuple[list[QAPair], dict[str, int]]:
    """Drop empty, too short and too long pairs, and questions too close to an earlier kept one.

    Returns the kept pairs in their order and the number dropped for each reason in `REASONS`.
    Near-duplicates are found by token-set Jaccard similarity (see `quality.filter_pairs`, which
    adds the malformed and grounding checks that `make_pairs` applies too).
    """
    kept, counts = quality.filter_pairs(
        pairs,
        min_answer_chars=min_answer_chars,
        max_answer_chars=max_answer_chars,
        min_answer_chars_by_strategy={},
        duplicate_jaccard=duplicate_jaccard,
        check_malformed=False,
    )
    return kept, {r: counts[r] for r in REASONS}


def _nonspace(text: str, start: int, end: int) -> int:
    return end - start - sum(text.count(ws, start, end) for ws in (" ", "\n", "\t", "\r", "\f", "\v"))


def _union(spans: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for s, e in sorted(spans):
        if merged and s <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], e))
        else:
            merged.append((s, e))
    return merged


def chunk_document(
    text: str,
    doc_id: str,
    *,
    max_chars: int | None = None,
    overlap_chars: int | None = None,
    length_fn: LengthFn | None = None,
    max_tokens: int | None = None,
    overlap_tokens: int | None = None,
    pages: Sequence[dict] | None = None,
) -> list[Chunk]:
    """A document's chunks, sized in characters without `length_fn` (default 1200, overlap 150) or
    in its unit, tokens, with it (default `DEFAULT_MAX_TOKENS`/`DEFAULT_OVERLAP_TOKENS`)."""
    if length_fn is None or length_fn is len:
        length_fn, limit, overlap = len, max_chars or 1200, 150 if overlap_chars is None else overlap_chars
    else:
        limit = max_tokens or max_chars or DEFAULT_MAX_TOKENS
        overlap = next((o for o in (overlap_tokens, overlap_chars) if o is not None), None)
        overlap = min(DEFAULT_OVERLAP_TOKENS, limit // 4) if overlap is None else overlap
    # reference lists, author blocks, axis text and page furniture stay in the text but out of chunks
    return chunk_clean(
        text,
        lambda masked: chunk_text(
            masked, doc_id=doc_id, max_chars=limit, overlap_chars=overlap, length_fn=length_fn, pages=pages
        ),
        doc_id=doc_id,
        pages=pages,
    )


def make_pairs(
    text: str,
    doc_id: str,
    title: str | None = None,
    *,
    max_chars: int | None = None,
    overlap_chars: int | None = None,
    length_fn: LengthFn | None = None,
    max_tokens: int | None = None,
    overlap_tokens: int | None = None,
    pages: Sequence[dict] | None = None,
    strategies: Iterable[str] | None = None,
    min_support: float | None = None,
    max_answer_tokens: int | None = None,
    min_words: int = MIN_DOCUMENT_WORDS,
) -> tuple[list[QAPair], list[Chunk], dict]:
    """Chunk one document, generate pairs for every chunk with the extractive strategies and keep
    the ones that pass the quality checks.

    Sizes: without `length_fn`, chunks hold at most `max_chars` characters (default 1200) and
    overlap by `overlap_chars` (150). With `length_fn` (e.g. `chunk.token_length(tokenizer)`) every
    size is in its unit, tokens: `max_tokens`/`overlap_tokens` (default 320/40; `max_chars`/
    `overlap_chars` are read as tokens when given instead), and `max_answer_tokens` bounds answers.
    `pages` is the document's page map, `strategies` a subset of `strategies.ALL_STRATEGIES`
    (default: all of them), `min_support` the grounding threshold (default `quality.MIN_SUPPORT`).

    `stats`: chunks, chunks_with_pairs, chunk_coverage (their share), generated, pairs (kept),
    coverage (the share of the chunked text's non-space characters that lie in a chunk with a kept
    pair), dropped (by reason, see `quality.REASONS`) and by_strategy. A text with fewer than
    `min_words` words of prose gets no pairs and `stats["error"]` ("not enough text to learn
    from: ..."); the caller reports that.
    """
    chunks = chunk_document(
        text,
        doc_id,
        max_chars=max_chars,
        overlap_chars=overlap_chars,
        length_fn=length_fn,
        max_tokens=max_tokens,
        overlap_tokens=overlap_tokens,
        pages=pages,
    )
    kept, gen_stats = generate_document(
        ExtractiveGenerator(),
        chunks,
        doc_title=title,
        strategies=strategies,
        min_support=quality.MIN_SUPPORT if min_support is None else min_support,
        length_fn=None if length_fn is len else length_fn,
        max_answer_tokens=max_answer_tokens,
        min_words=min_words,
    )
    with_pairs = {p.chunk_id for p in kept}
    total = sum(_nonspace(text, s, e) for s, e in _union((c.start, c.end) for c in chunks))
    covered = sum(
        _nonspace(text, s, e) for s, e in _union((c.start, c.end) for c in chunks if c.chunk_id in with_pairs)
    )
    stats = {
        "chunks": len(chunks),
        "chunks_with_pairs": gen_stats["chunks_with_pairs"],
        "chunk_coverage": gen_stats["chunk_coverage"],
        "generated": gen_stats["generated"],
        "pairs": len(kept),
        "coverage": covered / total if total else 0.0,
        "dropped": gen_stats["dropped"],
        "by_strategy": gen_stats["by_strategy"],
    }
    if "error" in gen_stats:
        stats["error"] = gen_stats["error"]
    return kept, chunks, stats
