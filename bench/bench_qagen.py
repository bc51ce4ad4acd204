"""Pairs per minute and chunk coverage of the extractive QA generator on a 50-page document.

The document is generated (seeded, so every run reads the same text): about 25,000 words in 50
pages, each page a section with a heading and paragraphs of definitions, dates, numbers, names,
causes and plain description, after a title, a byline and a date line. Run:

    .venv/bin/python bench/bench_qagen.py [--pages 50] [--runs 3] [--tokenizer PATH]

With `--tokenizer` (a transformers tokenizer folder, e.g. the converted base model in the model
cache) chunks are sized in its tokens instead of characters. The issue's target: > 90% of chunks
with at least one kept pair.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.qagen.chunk import token_length  # noqa: E402
from services.qagen.extractive import make_pairs  # noqa: E402
from services.qagen.quality import split_pairs  # noqa: E402

SYLLABLES = "ka mor vel tar an dis lo ven ri sol bra me cor thal un ost ber gal ni rew".split()
FIRST = "Anna Jon Maria Tomas Ingrid Pavel Elena Oskar Lucia Henrik Sofia Mateo Clara Ivo Nadia Emil".split()
NOUNS = """harbour bridge canal mill lighthouse market school library granary foundry ferry tunnel dam
observatory archive chapel garrison quarry orchard brewery""".split()
ADJ = "old narrow granite wooden northern busy quiet restored coastal famous small large".split()
PLURALS = "residents ships workers students lamps houses boats visitors trees wagons".split()
VERBS = "rebuilt extended repaired opened closed expanded painted measured surveyed restored".split()
ORGS = "Council Society Guild Board Company Trust".split()
TOPICS = "History Trade Buildings People Transport Industry Culture Geography Schools Festivals".split()


def _place(r: random.Random) -> str:
    return "".join(r.choice(SYLLABLES) for _ in range(r.randint(2, 3))).title()


def _person(r: random.Random) -> str:
    return f"{r.choice(FIRST)} {_place(r)}"


def _sentence(r: random.Random, place: str) -> str:
    noun, noun2 = r.sample(NOUNS, 2)
    year = r.randint(1650, 2020)
    n = r.randint(3, 9000)
    kind = r.randrange(9)
    if kind == 0:
        term, adj = f"{_place(r).lower()}ing", r.choice(ADJ)
        a, a2 = ("An" if term[0] in "aeiou" else "A"), ("an" if adj[0] in "aeiou" else "a")
        return (
            f"{a} {term} is {a2} {adj} {noun} that the people of {place} used to store {r.choice(PLURALS)}."
        )
    if kind == 1:
        return f"The {noun} of {place} was {r.choice(VERBS)} in {year} by {_person(r)}."
    if kind == 2:
        return f"In {year}, {_person(r)} {r.choice(VERBS)} the {noun} near the {noun2}."
    if kind == 3:
        return f"{place} has {n} {r.choice(PLURALS)} and {r.randint(2, 90)} {r.choice(PLURALS)} in the winter months."
    if kind == 4:
        return (
            f"The {noun} is {r.randint(5, 400)} metres long and carries {n} {r.choice(PLURALS)} every year."
        )
    if kind == 5:
        return (
            f"The {noun} was closed in {year} because the {noun2} had flooded the lower streets of {place}."
        )
    if kind == 6:
        return f"{_person(r)} led the {place} {r.choice(ORGS)} from {year} to {year + r.randint(2, 30)}."
    if kind == 7:
        return f"Engineers {r.choice(VERBS)} the {noun} by replacing the {r.choice(ADJ)} {noun2} with stone."
    return (
        f"The {r.choice(ADJ)} {noun} beside the {noun2} remains popular with {r.choice(PLURALS)} "
        f"who come to {place} in the summer."
    )


def make_document(pages: int = 50, words_per_page: int = 500, seed: int = 7) -> tuple[str, list[dict]]:
    """A Markdown document of `pages` pages and its page map (`pages.json` shape)."""
    r = random.Random(seed)
    out = [
        "# The Towns of the Velmora Coast\n\nBy Anna Roth and Jon Berg\n\nPublished: 12 March 2021\n\n"
        "This report describes the towns of the Velmora coast, their buildings, trade and people.\n\n"
    ]
    page_map = []
    for page in range(1, pages + 1):
        start = sum(len(x) for x in out)
        place = _place(r)
        parts = [f"## {place} {r.choice(TOPICS)}\n\n"]
        words = 0
        while words < words_per_page:
            paragraph = " ".join(_sentence(r, place) for _ in range(r.randint(3, 6)))
            words += len(paragraph.split())
            parts.append(paragraph + "\n\n")
        out.append("".join(parts))
        page_map.append({"page": page, "start": start, "end": start + len(out[-1])})
    return "".join(out), page_map


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pages", type=int, default=50)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--tokenizer", help="a transformers tokenizer folder: size chunks in its tokens")
    ap.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    args = ap.parse_args()

    text, page_map = make_document(args.pages)
    options: dict = {"pages": page_map}
    if args.tokenizer:
        from transformers import AutoTokenizer

        options["length_fn"] = token_length(AutoTokenizer.from_pretrained(args.tokenizer))

    times = []
    for _ in range(args.runs):
        started = time.perf_counter()
        pairs, chunks, stats = make_pairs(text, "bench", "velmora-coast.pdf", **options)
        times.append(time.perf_counter() - started)
    seconds = statistics.median(times)
    train, held_out = split_pairs(pairs, eval_fraction=0.1, seed=0)
    originals = sum(n for s, n in stats["by_strategy"].items() if s != "paraphrase")
    figures = {
        "pages": args.pages,
        "words": len(text.split()),
        "chunking": "tokens" if args.tokenizer else "characters",
        "chunks": stats["chunks"],
        "pairs": stats["pairs"],
        "pairs_without_paraphrases": originals,
        "seconds": round(seconds, 2),
        "pairs_per_minute": round(stats["pairs"] / seconds * 60),
        "chunk_coverage": round(stats["chunk_coverage"], 4),
        "text_coverage": round(stats["coverage"], 4),
        "dropped": stats["dropped"],
        "by_strategy": stats["by_strategy"],
        "split": {"train": len(train), "eval": len(held_out)},
    }
    if args.json:
        print(json.dumps(figures))
        return
    print(f"document: {figures['pages']} pages, {figures['words']} words, chunked by {figures['chunking']}")
    print(f"chunks: {figures['chunks']}   pairs: {figures['pairs']} ({originals} before paraphrases)")
    print(f"time: {seconds:.2f} s (median of {args.runs})   pairs/minute: {figures['pairs_per_minute']:,}")
    print(
        f"chunk coverage: {100 * stats['chunk_coverage']:.1f}%   text coverage: {100 * stats['coverage']:.1f}%"
    )
    print(f"dropped: {stats['dropped']}")
    print(f"by strategy: {stats['by_strategy']}")
    print(f"held-out split (10%): {len(train)} train / {len(held_out)} eval")
    target = "met" if stats["chunk_coverage"] > 0.9 else "MISSED"
    print(f"target > 90% chunk coverage: {target}")


if __name__ == "__main__":
    main()
