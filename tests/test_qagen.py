"""Unit tests of the extractive QA core: chunking, the generation rules and the filters (no server)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from services.qagen.chunk import Chunk, chunk_text, split_sentences
from services.qagen.extractive import QAPair, filter_pairs, generate_pairs, make_pairs, pair_id_for

ROOT = Path(__file__).resolve().parents[1]

DOC = """# The Velmora Lighthouse

The Velmora Lighthouse is a granite tower on the northern cape of Tarn Island. It guides fishing
boats into Velmora Harbour through the narrow channel between two reefs.

The tower is 42 metres tall and its lamp can be seen from 18 nautical miles away on a clear night.

## History

The lighthouse was first lit in 1847 by the Tarn Harbour Board. In 1902, the keeper Anna Roth
installed a new Fresnel lens that doubled the range of the beam. She kept the light for 31 years
and wrote a daily log of the weather.

The station was automated in March 1971, and the last keeper left the island that summer.

## The island today

Tarn Island has 312 permanent residents, most of whom work in fishing or in the small ferry
service. Visitors arrive on the morning boat from Velmora and climb the 214 steps to the lantern
room. A keeper's cottage is a small stone house next to the tower that now holds a museum about
the lighthouse and its keepers.

Storm petrels nest on the cliffs below the tower every spring, and the island council protects
their burrows during the breeding season.

## Getting there

```
ferry --from velmora --to tarn
# departs 07:30, returns 16:00
```

Ferries leave from the old quay below the fish market. Tickets are sold on board, and bicycles
travel free of charge in the summer months.
"""


def _chunk_of(chunks: list[Chunk], pair: QAPair) -> Chunk:
    return next(c for c in chunks if c.chunk_id == pair.chunk_id)


def _pair(question: str, answer: str, chunk_id: str = "c1") -> QAPair:
    return QAPair(pair_id_for(chunk_id, question, answer), question, answer, "d", chunk_id, 0, 10, "test")


# --- chunking ----------------------------------------------------------------------------------


def test_chunk_spans_index_back_into_the_original_text():
    """Every chunk's text is exactly the slice of the document its start and end name."""
    for max_chars, overlap in [(1200, 150), (200, 60), (90, 0)]:
        chunks = chunk_text(DOC, doc_id="d1", max_chars=max_chars, overlap_chars=overlap)
        assert chunks
        for c in chunks:
            assert DOC[c.start : c.end] == c.text
            assert c.text == c.text.strip()
            assert len(c.text) <= max_chars


def test_chunks_carry_the_nearest_heading_above_them():
    """Each chunk names the Markdown heading of its section; heading lines are not chunk text."""
    chunks = chunk_text(DOC, doc_id="d1")
    assert [c.heading for c in chunks] == [
        "The Velmora Lighthouse",
        "History",
        "The island today",
        "Getting there",
    ]
    assert all(not c.text.startswith("#") for c in chunks)
    assert [c.part for c in chunks] == [0, 0, 0, 0]


def test_text_before_the_first_heading_has_no_heading():
    """A preamble chunk has heading None; setext headings start sections too."""
    text = "A short preamble that comes first in the file.\n\nSetext Title\n============\n\nBody text here.\n"
    chunks = chunk_text(text, doc_id="d")
    assert [(c.heading, c.text) for c in chunks] == [
        (None, "A short preamble that comes first in the file."),
        ("Setext Title", "Body text here."),
    ]


def test_hash_lines_inside_code_fences_do_not_start_sections():
    """A `# comment` inside a fenced block stays in the section's chunk."""
    chunks = chunk_text(DOC, doc_id="d1")
    fence = next(c for c in chunks if "ferry --from" in c.text)
    assert "# departs 07:30" in fence.text
    assert fence.heading == "Getting there"


def test_chunks_never_start_or_end_inside_a_word():
    """Chunk boundaries fall on whitespace, even when sentences are longer than a chunk."""
    long_sentence = " ".join(f"word{i}" for i in range(400)) + "."
    text = DOC + "\n" + long_sentence + "\n"
    for c in chunk_text(text, doc_id="d", max_chars=120, overlap_chars=30):
        assert c.start == 0 or not (text[c.start - 1].isalnum() and text[c.start].isalnum())
        assert c.end == len(text) or not (text[c.end - 1].isalnum() and text[c.end].isalnum())


def test_a_word_longer_than_a_chunk_is_the_only_thing_cut():
    """One unbroken token longer than max_chars is cut into pieces that still cover it."""
    text = "start " + "x" * 250 + " end"
    chunks = chunk_text(text, doc_id="d", max_chars=100, overlap_chars=0)
    assert all(len(c.text) <= 100 for c in chunks)
    assert sum(c.text.count("x") for c in chunks) == 250
    assert chunks[0].text.startswith("start") and chunks[-1].text.endswith("end")


def test_consecutive_chunks_in_a_section_overlap_by_at_most_overlap_chars():
    """Within a section, each chunk repeats a short tail of the one before, starting at a boundary."""
    chunks = chunk_text(DOC, doc_id="d1", max_chars=200, overlap_chars=80)
    pairs = [(a, b) for a, b in zip(chunks, chunks[1:], strict=False) if a.heading == b.heading]
    assert pairs, "the document should need several chunks per section at this size"
    for a, b in pairs:
        assert b.start < a.end, "chunks of one section should overlap"
        assert a.start < b.start, "each chunk should move forward"
        assert b.overlap == a.end - b.start <= 80
        assert DOC[b.start : a.end] == b.text[: b.overlap]
        assert DOC[b.start - 1].isspace()


def test_chunks_of_different_sections_never_overlap():
    """The first chunk of a section starts after the last chunk of the previous one ends."""
    chunks = chunk_text(DOC, doc_id="d1", max_chars=200, overlap_chars=80)
    for a, b in zip(chunks, chunks[1:], strict=False):
        if a.heading != b.heading:
            assert b.start >= a.end
            assert b.part == 0 and b.overlap == 0


def test_zero_overlap_gives_disjoint_chunks_that_cover_the_text():
    """With overlap_chars=0 chunks are disjoint, and together hold every word of the sections."""
    chunks = chunk_text(DOC, doc_id="d1", max_chars=150, overlap_chars=0)
    for a, b in zip(chunks, chunks[1:], strict=False):
        assert b.start >= a.end
    words_in_chunks = " ".join(c.text for c in chunks).split()
    headings = {"# The Velmora Lighthouse", "## History", "## The island today", "## Getting there"}
    body_words = " ".join(line for line in DOC.splitlines() if line not in headings).split()
    assert words_in_chunks == body_words


def test_chunk_ids_are_stable_and_depend_on_document_and_span():
    """The same text chunks to the same ids; another document id gives other ids."""
    a = chunk_text(DOC, doc_id="d1")
    b = chunk_text(DOC, doc_id="d1")
    c = chunk_text(DOC, doc_id="d2")
    assert [x.chunk_id for x in a] == [x.chunk_id for x in b]
    assert len({x.chunk_id for x in a}) == len(a)
    assert not {x.chunk_id for x in a} & {x.chunk_id for x in c}


def test_length_fn_measures_chunk_size():
    """A custom length function (here: words) bounds chunks instead of characters."""

    def n_words(s: str) -> int:
        return len(s.split())

    chunks = chunk_text(DOC, doc_id="d1", max_chars=30, overlap_chars=8, length_fn=n_words)
    assert len(chunks) > 4
    assert all(n_words(c.text) <= 30 for c in chunks)
    for a, b in zip(chunks, chunks[1:], strict=False):
        if a.heading == b.heading:
            assert n_words(b.text[: b.overlap]) <= 8


def test_bad_chunk_sizes_are_rejected():
    """max_chars must be positive and the overlap smaller than it."""
    with pytest.raises(ValueError):
        chunk_text(DOC, doc_id="d", max_chars=0)
    with pytest.raises(ValueError):
        chunk_text(DOC, doc_id="d", max_chars=100, overlap_chars=100)


def test_chunks_round_trip_through_dicts():
    """Chunk.to_dict and Chunk.from_dict are inverses (for chunks.jsonl)."""
    for c in chunk_text(DOC, doc_id="d1", max_chars=200, overlap_chars=50):
        assert Chunk.from_dict(json.loads(json.dumps(c.to_dict()))) == c


def test_sentences_split_at_ends_but_not_at_abbreviations_or_initials():
    """Dr., e.g. and initials do not end a sentence; list items and blank lines do."""
    text = (
        "Dr. Smith met J. R. Roth in 1902. They spoke, e.g. about lamps! Did it work?\n- first item\n- second"
    )
    got = [text[s:e] for s, e in split_sentences(text)]
    assert got == [
        "Dr. Smith met J. R. Roth in 1902.",
        "They spoke, e.g. about lamps!",
        "Did it work?",
        "first item",
        "second",
    ]


# --- generation --------------------------------------------------------------------------------


def test_every_answer_is_quoted_from_its_chunk():
    """Answers are grounded: each is a substring of the chunk it names, and spans match the chunk."""
    for max_chars, overlap in [(1200, 150), (200, 80)]:
        pairs, chunks, _ = make_pairs(DOC, "d1", title="Velmora", max_chars=max_chars, overlap_chars=overlap)
        assert pairs
        for p in pairs:
            chunk = _chunk_of(chunks, p)
            assert p.answer in chunk.text
            assert (p.start, p.end, p.doc_id) == (chunk.start, chunk.end, "d1")
            assert p.question.endswith("?")


def test_each_rule_contributes_pairs_to_a_varied_document():
    """Definitions, dates, numbers, named entities and headings each make the expected questions."""
    pairs, _, stats = make_pairs(DOC, "d1")
    by_question = {p.question: p for p in pairs}
    assert by_question["What is the Velmora Lighthouse?"].strategy == "definition"
    assert by_question["When was the lighthouse first lit?"].answer.startswith(
        "The lighthouse was first lit in 1847"
    )
    assert by_question["What happened in 1902?"].strategy == "date"
    assert by_question["How tall is the tower?"].strategy == "number"
    assert (
        "312 permanent residents" in by_question["How many permanent residents does Tarn Island have?"].answer
    )
    assert by_question["Who is Anna Roth?"].strategy == "entity"
    history = by_question["What does the document say about History?"]
    assert history.strategy == "heading" and history.answer.startswith("The lighthouse was first lit")
    assert set(stats["by_strategy"]) >= {"definition", "date", "number", "entity", "heading"}


def test_a_chunk_with_content_but_no_rule_match_gets_a_fallback_pair():
    """Plain prose with no definition, number, name or heading still yields one grounded pair."""
    text = (
        "Storm petrels nest on the cliffs below the old tower every spring, and keepers count the "
        "storm petrels each morning."
    )
    chunk = chunk_text(text, doc_id="d")[0]
    pairs = generate_pairs(chunk)
    assert [p.strategy for p in pairs] == ["fallback"]
    assert pairs[0].question.startswith("What does the text say about ")
    assert pairs[0].answer in chunk.text


def test_doc_title_stands_in_for_a_missing_heading():
    """A first chunk without a heading is asked about under the document's title."""
    text = "Ferries leave from the old quay below the fish market, and tickets are sold on board."
    pairs = generate_pairs(chunk_text(text, doc_id="d")[0], doc_title="Velmora ferries")
    assert "What does the document say about Velmora ferries?" in [p.question for p in pairs]


def test_coverage_of_a_multi_section_document_is_above_ninety_percent():
    """Almost all of a well-formed document lies in chunks that yield at least one pair."""
    for max_chars, overlap in [(1200, 150), (300, 80), (160, 40)]:
        pairs, chunks, stats = make_pairs(DOC, "d1", max_chars=max_chars, overlap_chars=overlap)
        assert stats["chunks"] == len(chunks)
        assert stats["pairs"] == len(pairs)
        assert stats["coverage"] > 0.9, stats
        assert stats["chunks_with_pairs"] >= 0.9 * stats["chunks"]


def test_output_is_deterministic_across_runs_and_hash_seeds():
    """The same document gives the same chunks and pairs, also in processes with other hash seeds."""
    first = make_pairs(DOC, "d1", title="Velmora")
    assert make_pairs(DOC, "d1", title="Velmora") == first
    script = (
        "import json, sys; from services.qagen.extractive import make_pairs; "
        "p, c, s = make_pairs(sys.stdin.read(), 'd1', title='Velmora'); "
        "print(json.dumps([[x.to_dict() for x in p], [x.to_dict() for x in c], s], sort_keys=True))"
    )
    outputs = set()
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        run = subprocess.run(
            [sys.executable, "-c", script],
            input=DOC,
            capture_output=True,
            text=True,
            cwd=ROOT,
            env=env,
            check=True,
        )
        outputs.add(run.stdout)
    assert len(outputs) == 1
    pairs, chunks, stats = json.loads(outputs.pop())
    assert pairs == [p.to_dict() for p in first[0]]


@pytest.mark.parametrize(
    "text",
    ["", "   \n\n ", "Notes.", "The Velmora Lighthouse.", "# Only a heading\n", "A lamp, a lens, a tower."],
)
def test_too_little_text_yields_no_pairs(text):
    """A one-line or empty text gives no pairs, which the caller reports as "not enough text"."""
    pairs, _, stats = make_pairs(text, "d")
    assert pairs == []
    assert stats["pairs"] == 0
    assert stats["coverage"] == 0.0


# --- filtering ---------------------------------------------------------------------------------


def test_near_duplicate_questions_are_dropped_and_counted():
    """A question whose tokens nearly match an earlier kept one is dropped; the first one stays."""
    answer = "The Velmora Lighthouse is a granite tower on the cape."
    pairs = [
        _pair("What is the Velmora Lighthouse?", answer, "c1"),
        _pair("What is the Velmora lighthouse?", answer, "c2"),  # same tokens once normalised
        _pair("what is THE velmora lighthouse", answer, "c3"),
        _pair("What is the Velmora Lighthouse on the northern cape of Tarn Island?", answer, "c4"),
        _pair("How tall is the tower?", "The tower is 42 metres tall.", "c5"),
    ]
    kept, counts = filter_pairs(pairs)
    assert [p.chunk_id for p in kept] == ["c1", "c4", "c5"]
    assert counts["duplicate_question"] == 2


def test_jaccard_threshold_is_applied_to_token_sets():
    """Ten shared tokens out of eleven (0.91) is a duplicate; eight of ten (0.8) is not."""
    base = "alpha beta gamma delta epsilon zeta eta theta iota kappa"
    answer = "A long enough answer for the test."
    kept, counts = filter_pairs([_pair(base + "?", answer, "a"), _pair(base + " lambda?", answer, "b")])
    assert len(kept) == 1 and counts["duplicate_question"] == 1
    other = "alpha beta gamma delta epsilon zeta eta theta mu nu?"
    kept, counts = filter_pairs([_pair(base + "?", answer, "a"), _pair(other, answer, "b")])
    assert len(kept) == 2 and counts["duplicate_question"] == 0


def test_empty_short_and_long_answers_are_dropped_and_counted():
    """Empty pairs, answers under 20 characters and answers over 800 are removed, each counted."""
    pairs = [
        _pair("What is it?", ""),
        _pair("", "A perfectly reasonable answer here."),
        _pair("Why?", "Too short."),
        _pair("What does the text say about everything?", "word " * 200),
        _pair("How tall is the tower?", "The tower is 42 metres tall."),
    ]
    kept, counts = filter_pairs(pairs)
    assert [p.question for p in kept] == ["How tall is the tower?"]
    assert counts == {"empty": 2, "too_short": 1, "too_long": 1, "duplicate_question": 0}


def test_make_pairs_reports_what_the_filters_dropped():
    """A document that repeats a section counts the repeated questions as duplicates."""
    repeated = DOC + "\n## History again\n\n" + DOC.split("## History\n", 1)[1].split("## The island", 1)[0]
    _, _, stats = make_pairs(repeated, "d1")
    assert stats["dropped"]["duplicate_question"] >= 3
    assert stats["generated"] == stats["pairs"] + sum(stats["dropped"].values())


def test_pairs_round_trip_through_dicts():
    """QAPair.to_dict and QAPair.from_dict are inverses, and ids are stable hashes."""
    pairs, _, _ = make_pairs(DOC, "d1")
    for p in pairs:
        assert QAPair.from_dict(json.loads(json.dumps(p.to_dict()))) == p
        assert p.pair_id == pair_id_for(p.chunk_id, p.question, p.answer)
    assert len({p.pair_id for p in pairs}) == len(pairs)
