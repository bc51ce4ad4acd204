"""The per-document pipeline: a generator run over one document's chunks, then the quality gate.

`generate_document` runs a generator over a document's chunks (concurrently when the generator
allows it), retries each failed chunk once more on its own, adds paraphrases and the document-level
pairs, and passes everything through the quality gate (`quality.filter_pairs`). Pair ids are hashes
of chunk, question and answer, and a chunk's pairs are kept all-or-nothing, so a retry — or a rerun
with `previous=` the pairs of a run that partly failed — never duplicates what already succeeded.

Its steps, in order: `_sort_chunks` (skipped, reused, to do), `_ChunkRuns` (the first pass, pooled
when the generator allows it, and the retries alone), `_fresh_pairs` (new and document-level pairs,
none twice), `_gate` (the checks, then paraphrases of what passed, checked too) and `_stats`.
Progress is counted by `_Ticker`, always from the calling thread.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait

from services.common.options import resolve_strategies
from services.common.qapair import QAPair
from services.qagen import quality
from services.qagen import strategies as strategy_rules
from services.qagen.backends.base import ChunkFailed, Generator
from services.qagen.chunk import Chunk
from services.qagen.text import MIN_DOCUMENT_WORDS, has_content, prose_words

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]


def generate_document(
    generator: Generator,
    chunks: Sequence[Chunk],
    *,
    doc_title: str | None = None,
    strategies: Iterable[str] | None = None,
    progress: Progress | None = None,
    previous: Iterable[QAPair] = (),
    retry_chunks: Iterable[str] = (),
    retry_failed: bool = True,
    min_support: float = quality.MIN_SUPPORT,
    length_fn: Callable[[str], int] | None = None,
    max_answer_tokens: int | None = None,
    min_words: int = MIN_DOCUMENT_WORDS,
) -> tuple[list[QAPair], dict]:
    """Generate, check and count the pairs of one document's chunks.

    A document with fewer than `min_words` words of prose gets no pairs at all, and `stats["error"]`
    says "not enough text to learn from": pairs from a one-line file or a page whose content never
    loaded would be invented, whatever backend made them. Chunks without content are skipped (no
    request, no pairs). Chunks that already have pairs in
    `previous` are not generated again, unless listed in `retry_chunks` (they failed before; the
    pairs document-level rules made from them are in `previous` all the same); those pairs come first in the result, as they were. Each
    other chunk is generated once (in parallel up to `generator.concurrency`); each that failed is
    then generated once more, alone. `progress(done, total)` is called from this thread once per
    chunk, when it is settled. Paraphrases (strategy `paraphrase`) are added for the new pairs that
    passed the checks, and document-level pairs when the generator makes them.

    `stats`: chunks, skipped, reused, generated, pairs, dropped (by `quality.REASONS`), failed,
    failed_chunks ([{chunk_id, reason}]), retried, recovered, chunks_with_pairs, chunk_coverage,
    by_strategy, seconds.
    """
    started = time.monotonic()
    selected = resolve_strategies(strategies)
    by_id = {c.chunk_id: c for c in chunks}
    previous = [p for p in previous if p.chunk_id in by_id or not p.chunk_id]
    done_before = {p.chunk_id for p in previous} - set(retry_chunks)
    ticker = _Ticker(progress, len(chunks))
    words = prose_words(chunks)
    too_little = words < min_words
    todo, skipped, reused = _sort_chunks(chunks, done_before, too_little, ticker)

    runs = _ChunkRuns(generator, doc_title, selected, ticker)
    runs.first_pass(todo, final=not retry_failed)
    failed_first = [c for c in todo if c.chunk_id in runs.errors]
    if retry_failed:
        for c in failed_first:  # alone, one at a time: a chunk that failed under load may pass now
            runs.settle(c, None, final=True)

    fresh, known = _fresh_pairs(generator, chunks, todo, runs.results, previous, doc_title, selected)
    checks = {
        "chunks": by_id,
        "min_support": min_support,
        "length_fn": length_fn,
        "max_answer_tokens": max_answer_tokens,
    }
    kept, dropped, generated = _gate(previous, fresh, known, selected, checks)
    counts = {"skipped": skipped, "reused": reused, "generated": generated}
    retried = failed_first if retry_failed else None
    stats = _stats(chunks, todo, kept, dropped, runs.errors, retried, counts, started)
    if too_little:
        stats["error"] = (
            f"not enough text to learn from: {words} words of prose, at least {min_words} are needed"
        )
    return kept, stats


class _Ticker:
    """Counts settled chunks and reports each to `progress(done, total)`, when there is one."""

    def __init__(self, progress: Progress | None, total: int):
        self.progress, self.total, self.settled = progress, total, 0

    def __call__(self) -> None:
        self.settled += 1
        if self.progress is not None:
            self.progress(self.settled, self.total)


def _sort_chunks(
    chunks: Sequence[Chunk], done_before: set[str], too_little: bool, tick: Callable[[], None]
) -> tuple[list[Chunk], int, int]:
    """(the chunks to generate, how many are skipped, how many reused); those not to generate are
    settled (ticked) here, in document order."""
    todo: list[Chunk] = []
    skipped = reused = 0
    for c in chunks:
        if too_little:
            skipped += 1
            tick()
        elif c.chunk_id in done_before:
            reused += 1
            tick()
        elif not has_content(c):
            skipped += 1
            tick()
        else:
            todo.append(c)
    return todo, skipped, reused


class _ChunkRuns:
    """The generation of a document's chunks: each chunk's pairs in `results` or its failure reason
    in `errors` (a later success clears it). Settling happens on the calling thread only."""

    def __init__(self, generator: Generator, doc_title: str | None, selected: list[str], tick: _Ticker):
        self.generator, self.doc_title, self.selected, self.tick = generator, doc_title, selected, tick
        self.results: dict[str, list[QAPair]] = {}
        self.errors: dict[str, str] = {}

    def run(self, chunk: Chunk) -> list[QAPair]:
        return self.generator.generate(chunk, doc_title=self.doc_title, strategies=self.selected)

    def settle(self, chunk: Chunk, fut: Future | None, final: bool) -> None:
        """Record the chunk's outcome (of `fut`, or of a run here); tick when it succeeded or when
        this was its last try."""
        try:
            self.results[chunk.chunk_id] = fut.result() if fut is not None else self.run(chunk)
            self.errors.pop(chunk.chunk_id, None)
        except ChunkFailed as exc:
            self.errors[chunk.chunk_id] = exc.reason
        except Exception as exc:  # a backend bug or a broken model fails the chunk, not the document
            log.exception("generating chunk %s failed", chunk.chunk_id)
            self.errors[chunk.chunk_id] = f"{type(exc).__name__}: {exc}"
        if final or chunk.chunk_id in self.results:
            self.tick()

    def first_pass(self, todo: Sequence[Chunk], *, final: bool) -> None:
        """Each chunk once: in a pool of `generator.concurrency` threads, or here one by one."""
        workers = max(1, int(getattr(self.generator, "concurrency", 1)))
        if workers == 1 or len(todo) <= 1:
            for c in todo:
                self.settle(c, None, final=final)
            return
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="qagen") as pool:
            pending = {pool.submit(self.run, c): c for c in todo}
            while pending:
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in finished:
                    self.settle(pending.pop(fut), fut, final=final)


def _fresh_pairs(
    generator: Generator,
    chunks: Sequence[Chunk],
    todo: Sequence[Chunk],
    results: dict[str, list[QAPair]],
    previous: list[QAPair],
    doc_title: str | None,
    selected: list[str],
) -> tuple[list[QAPair], set[str]]:
    """(the new pairs in chunk order, then the document-level ones; every pair id now known)."""
    # a chunk's pairs are all kept or all missing: a retried chunk cannot duplicate a settled one
    known = {p.pair_id for p in previous}
    fresh: list[QAPair] = []
    for c in todo:
        for p in results.get(c.chunk_id, ()):
            if p.pair_id not in known:
                known.add(p.pair_id)
                fresh.append(p)
    document_level = getattr(generator, "document_pairs", None)
    if document_level is not None and not previous and results:
        fresh += [
            p
            for p in document_level(chunks, doc_title=doc_title, strategies=selected)
            if p.pair_id not in known
        ]
    return fresh, known


def _gate(
    previous: list[QAPair], fresh: list[QAPair], known: set[str], selected: list[str], checks: dict
) -> tuple[list[QAPair], Counter, int]:
    """(the pairs that pass the checks, the dropped ones by reason, how many were generated):
    earlier and new pairs, then paraphrases of the new ones that passed."""
    kept, dropped = quality.filter_pairs([*previous, *fresh], **checks)
    dropped = Counter(dropped)
    generated = len(fresh)
    if "paraphrase" in selected:
        old = {q.pair_id for q in previous}
        new = [p for p in kept if p.pair_id not in old]
        variants = [v for v in strategy_rules.paraphrase_pairs(new) if v.pair_id not in known]
        generated += len(variants)
        kept, more = quality.filter_pairs([*kept, *variants], **checks)
        dropped.update(more)
    return kept, dropped, generated


def _stats(
    chunks: Sequence[Chunk],
    todo: Sequence[Chunk],
    kept: list[QAPair],
    dropped: Counter,
    errors: dict[str, str],
    retried: list[Chunk] | None,
    counts: dict[str, int],
    started: float,
) -> dict:
    """The stats of `generate_document`; `retried` is None when failed chunks were not retried,
    `counts` holds skipped, reused and generated, `started` the run's `time.monotonic()`."""
    report = quality.coverage_report(kept, chunks)
    return {
        "chunks": len(chunks),
        "skipped": counts["skipped"],
        "reused": counts["reused"],
        "generated": counts["generated"],
        "pairs": len(kept),
        "dropped": {r: dropped[r] for r in quality.REASONS},
        "failed": len(errors),
        "failed_chunks": [
            {"chunk_id": c.chunk_id, "reason": errors[c.chunk_id]} for c in todo if c.chunk_id in errors
        ],
        "retried": len(retried) if retried is not None else 0,
        "recovered": sum(1 for c in retried if c.chunk_id not in errors) if retried is not None else 0,
        "chunks_with_pairs": report["chunks_with_pairs"],
        "chunk_coverage": report["coverage"],
        "by_strategy": dict(sorted(Counter(p.strategy for p in kept).items())),
        "seconds": round(time.monotonic() - started, 3),
    }
