"""Unit tests of the extractive QA core: chunking, the generation rules and the filters (no server)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from services.common.options import resolve_strategies
from services.qagen import quality
from services.qagen.chunk import Chunk, chunk_text, split_sentences, token_length
from services.qagen.extractive import (
    DEFAULT_MAX_TOKENS,
    QAPair,
    filter_pairs,
    generate_pairs,
    is_metadata_line,
    make_pairs,
    pair_id_for,
)
from services.qagen.strategies import ALL_STRATEGIES, RULES, clean_title, lemma, paraphrases, wh_questions
from services.qagen.text import prose_sentences

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


def test_every_answer_is_quoted_from_its_source_chunks():
    """Answers are grounded: each sentence is text of a chunk the pair names, and spans match the chunk."""
    for max_chars, overlap in [(1200, 150), (200, 80)]:
        pairs, chunks, _ = make_pairs(DOC, "d1", title="Velmora", max_chars=max_chars, overlap_chars=overlap)
        assert pairs
        for p in pairs:
            chunk = _chunk_of(chunks, p)
            assert (p.start, p.end, p.doc_id) == (chunk.start, chunk.end, "d1")
            assert p.question.endswith("?")
            sources = [chunk, *(next(c for c in chunks if c.chunk_id == s) for s in p.sources)]
            texts = [c.text for c in sources] + [c.heading for c in sources if c.heading]
            if p.strategy not in ("summary", "section_summary", "vague", "paraphrase"):
                assert any(p.answer in t for t in texts), p
            for s, e in split_sentences(p.answer):
                for piece in p.answer[s:e].split("; "):
                    assert any(piece in t for t in texts), (p, piece)


def test_each_rule_contributes_pairs_to_a_varied_document():
    """Definitions, dates, numbers and people each make the expected questions; headings make none."""
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
    # changed: "What does the document say about History?" (a title question answered by the
    # section's opening paragraph) was the noise this rule set removes
    assert not any("say about" in q for q in by_question)
    assert set(stats["by_strategy"]) >= {"definition", "date", "number", "entity"}


def test_a_chunk_with_content_but_no_rule_match_gets_a_fallback_pair():
    """Plain prose with no definition, number, name or heading still yields one grounded pair."""
    text = (
        "Storm petrels nest on the cliffs below the old tower every spring, and keepers count the "
        "storm petrels each morning."
    )
    chunk = chunk_text(text, doc_id="d")[0]
    pairs = generate_pairs(chunk)
    assert [p.strategy for p in pairs] == ["fallback"]
    # changed: the question was "What does the text say about ...?", a question about the text
    assert pairs[0].question == "What can you tell me about storm petrels?"
    assert pairs[0].answer in chunk.text


def test_a_chunk_is_not_asked_about_under_its_heading_or_the_documents_title():
    """No "What does the document say about <title>?": it teaches a title, not a fact (this test
    replaces one that pinned exactly that question)."""
    text = "Ferries leave from the old quay below the fish market, and tickets are sold on board."
    pairs = generate_pairs(chunk_text(text, doc_id="d")[0], doc_title="Velmora ferries")
    assert not any("Velmora ferries" in p.question for p in pairs)


def test_coverage_of_a_multi_section_document_is_above_ninety_percent():
    """Almost all of a well-formed document lies in chunks that yield at least one pair."""
    # changed: 160-character chunks made only of pronoun sentences ("She kept the light for 31
    # years") used to get a "What does the text say about ...?" pair; now they get none
    for max_chars, overlap, least in [(1200, 150, 0.9), (300, 80, 0.9), (160, 40, 0.65)]:
        pairs, chunks, stats = make_pairs(DOC, "d1", max_chars=max_chars, overlap_chars=overlap)
        assert stats["chunks"] == len(chunks)
        assert stats["pairs"] == len(pairs)
        assert stats["coverage"] > least, stats
        assert stats["chunks_with_pairs"] >= least * stats["chunks"]


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


def test_make_pairs_keeps_its_worker_call_and_drops_malformed_and_ungrounded_counts_in():
    """The positional call the worker makes still works; stats count every quality reason."""
    pairs, chunks, stats = make_pairs(DOC, "d1", "velmora.md")
    assert pairs and chunks
    assert set(stats["dropped"]) == set(quality.REASONS) and "malformed_question" in stats["dropped"]
    assert stats["chunk_coverage"] == stats["chunks_with_pairs"] / stats["chunks"]


# --- token-aware chunking and pages -------------------------------------------------------------


@pytest.fixture(scope="module")
def base_tokenizer():
    """The base model's tokenizer when its converted copy is in the model cache, else a small BPE
    trained here on the test document (both are real subword tokenizers, nothing is downloaded)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from services.common.config import Settings

    cached = Path(Settings.from_env().model_cache).expanduser() / "SmolLM2-135M-Instruct"
    if (cached / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(cached)
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator([DOC], trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


def test_with_a_tokenizer_every_size_is_counted_in_tokens(base_tokenizer):
    """token_length(tokenizer) makes max_tokens and overlap_tokens token counts, and bounds chunks so."""
    n_tokens = token_length(base_tokenizer)
    long_doc = DOC + "\n" + " ".join(f"The keeper counted {i} ships on day {i}." for i in range(60)) + "\n"
    pairs, chunks, stats = make_pairs(long_doc, "d1", length_fn=n_tokens, max_tokens=60, overlap_tokens=12)
    assert len(chunks) > 6 and pairs
    assert max(n_tokens(c.text) for c in chunks) <= 60
    assert max(len(c.text) for c in chunks) > 60  # characters are not what was counted
    for a, b in zip(chunks, chunks[1:], strict=False):
        if a.heading == b.heading:
            assert n_tokens(b.text[: b.overlap]) <= 12
    # with a tokenizer and no size, chunks are DEFAULT_MAX_TOKENS tokens, not 1200 of anything
    _, default_chunks, _ = make_pairs(long_doc, "d1", length_fn=n_tokens)
    assert max(n_tokens(c.text) for c in default_chunks) <= DEFAULT_MAX_TOKENS


def test_answers_longer_than_max_answer_tokens_are_dropped_as_too_long(base_tokenizer):
    """A token budget on answers applies to every strategy's answers and is counted."""
    n_tokens = token_length(base_tokenizer)
    pairs, _, stats = make_pairs(DOC, "d1", length_fn=n_tokens, max_answer_tokens=25)
    assert pairs and all(n_tokens(p.answer) <= 25 for p in pairs)
    assert stats["dropped"]["too_long"] > 0


def test_chunks_name_the_pages_they_span():
    """With the document's page map each chunk lists the 1-based pages its span overlaps."""
    cut = DOC.index("## The island today")
    pages = [{"page": 1, "start": 0, "end": cut}, {"page": 2, "start": cut, "end": len(DOC)}]
    chunks = chunk_text(DOC, doc_id="d1", max_chars=200, overlap_chars=0, pages=pages)
    assert {c.pages for c in chunks} == {(1,), (2,)}
    assert all(c.pages == ((1,) if c.end <= cut else (2,)) for c in chunks)
    spanning = chunk_text(
        DOC,
        doc_id="d1",
        max_chars=5000,
        overlap_chars=0,
        pages=[*pages[:1], {"page": 2, "start": 100, "end": len(DOC)}],
    )
    assert spanning[0].pages == (1, 2)
    assert Chunk.from_dict(json.loads(json.dumps(spanning[0].to_dict()))) == spanning[0]


# --- strategies ---------------------------------------------------------------------------------

REPORT = """# Harbour Lights of the North Coast

By Anna Roth and Jon Berg

Published: 12 March 2021

The North Coast has seven working lighthouses. A lighthouse keeper is a person who tends the lamp
and keeps the log.

## Construction

The Velmora tower was built in 1847 on the northern cape of Tarn Island. The Tarn Harbour Board
paid 4,000 pounds for the granite. Masons from Aberdeen finished the lantern room in 1849.

The tower was painted red because fishermen could not see the white stone in fog. Keepers trimmed
the wick by hand every four hours.

## Automation

The station was automated in March 1971. Engineers replaced the lamp by installing an electric
beacon. Jon Berg wrote the final keeper's log in 1971.

The old Fresnel lens is kept in the museum at Velmora.
"""


@pytest.fixture(scope="module")
def report():
    return make_pairs(REPORT, "r1", title="harbour-lights.pdf")


@pytest.fixture(scope="module")
def report_all():
    """The report with every strategy named, the opt-in `summary` and `vague` included."""
    return make_pairs(REPORT, "r1", title="harbour-lights.pdf", strategies=list(ALL_STRATEGIES))


def _questions(pairs, strategy):
    return {p.question: p for p in pairs if p.strategy == strategy}


def test_every_strategy_contributes_and_each_pair_names_its_rule(report_all):
    """All rule sets fire on a varied document; strategy names are those of strategies.RULES."""
    pairs, _, stats = report_all
    rules = {r for names in RULES.values() for r in names}
    assert {p.strategy for p in pairs} <= rules
    assert set(stats["by_strategy"]) >= {
        "definition", "date", "number", "who", "what", "when", "where", "why", "how",
        "summary", "section_summary", "metadata", "vague", "paraphrase",
    }  # fmt: skip
    assert set(ALL_STRATEGIES) == set(RULES)


def test_whole_document_summaries_and_vague_questions_are_made_only_when_named(report, report_all):
    """The default set (no strategies named) leaves out `summary` and `vague`; naming them adds them."""
    assert "summary" not in resolve_strategies(None) and "vague" not in resolve_strategies(None)
    default = {p.strategy for p in report[0]}
    named = {p.strategy for p in report_all[0]}
    assert not default & {"summary", "vague"} and {"summary", "vague"} <= named
    assert {"section_summary", "metadata", "definition", "number"} <= default


def test_strategies_can_be_chosen_one_at_a_time():
    """A subset of strategies makes only their rules' pairs; an unknown name is an error."""
    pairs, _, _ = make_pairs(REPORT, "r1", strategies=["definition"])
    assert {p.strategy for p in pairs} == {"definition"}
    pairs, _, _ = make_pairs(REPORT, "r1", strategies=["wh", "paraphrase"])
    assert {p.strategy for p in pairs} <= {*RULES["wh"], "paraphrase"}
    with pytest.raises(ValueError, match="unknown QA strategies"):
        make_pairs(REPORT, "r1", strategies=["quizz"])


def test_who_what_when_where_why_and_how_questions_ask_about_each_fact(report):
    """Each question word gets its question from the sentence that answers it."""
    pairs, _, _ = report
    expected = {
        "who": (
            "Who wrote the final keeper's log in 1971?",
            "Jon Berg wrote the final keeper's log in 1971.",
        ),
        "what": ("What was automated in March 1971?", "The station was automated in March 1971."),
        "when": (
            "When did Jon Berg write the final keeper's log?",
            "Jon Berg wrote the final keeper's log in 1971.",
        ),
        "where": (
            "Where was the Velmora tower built?",
            "The Velmora tower was built in 1847 on the northern cape of",
        ),
        "why": (
            "Why was the tower painted red?",
            "The tower was painted red because fishermen could not see",
        ),
        "how": (
            "How did engineers replace the lamp?",
            "Engineers replaced the lamp by installing an electric",
        ),
    }
    for rule, (question, answer) in expected.items():
        got = _questions(pairs, rule)
        assert question in got, (rule, sorted(got))
        assert got[question].answer.replace("\n", " ").startswith(answer)
    assert "When did masons from Aberdeen finish the lantern room?" in _questions(pairs, "when")


@pytest.mark.parametrize(
    ("past", "base"),
    [
        ("installed", "install"), ("lit", "light"), ("wrote", "write"), ("stopped", "stop"),
        ("created", "create"), ("located", "locate"), ("carried", "carry"), ("moved", "move"),
        ("decided", "decide"), ("caused", "cause"), ("named", "name"), ("opened", "open"),
        ("changed", "change"), ("focused", "focus"), ("passed", "pass"), ("added", "add"),
    ],
)  # fmt: skip
def test_past_tenses_are_turned_back_into_base_forms(past, base):
    """The small morphology behind "When did X <verb> ...?" handles regular and irregular verbs."""
    assert lemma(past) == base


def test_metadata_questions_come_from_the_first_lines(report):
    """Title, authors and date are asked about when the document's first lines state them."""
    pairs, chunks, _ = report
    got = {p.question: p.answer for p in _questions(pairs, "metadata").values()}
    assert got == {
        "What is the title of the document?": "Harbour Lights of the North Coast",
        "Who wrote Harbour Lights of the North Coast?": "Anna Roth and Jon Berg",
        "When was Harbour Lights of the North Coast published?": "12 March 2021",
    }
    # the byline and date are metadata, not facts for the other rules to quote
    assert not any(p.answer.startswith(("By Anna", "Published")) for p in pairs if p.strategy != "metadata")


def test_summaries_come_at_three_lengths_and_one_walks_every_section(report_all):
    """One sentence, short and detailed summaries grow in length; the walk draws on every section."""
    pairs, chunks, _ = report_all
    got = _questions(pairs, "summary")
    title = "Harbour Lights of the North Coast"
    one = got[f"Can you summarize {title} in one sentence?"].answer
    short = got[f"Can you give a short summary of {title}?"].answer
    detailed = got[f"Can you give a detailed summary of {title}?"].answer
    assert len(one) <= 250 < len(detailed) and len(one) < len(short) <= len(detailed) <= 800
    assert len(split_sentences(one)) == 1
    walk = got["Can you summarize the whole document, section by section?"]
    assert {walk.chunk_id, *walk.sources} == {c.chunk_id for c in chunks}


def test_each_section_gets_a_summary_of_its_own_sentences(report):
    """A section summary quotes two or more sentences of that section only."""
    pairs, chunks, _ = report
    got = _questions(pairs, "section_summary")
    assert set(got) == {
        "Can you summarize the section on Construction?",
        "Can you summarize the section on Automation?",
    }
    construction = got["Can you summarize the section on Construction?"]
    section = next(c for c in chunks if c.heading == "Construction")
    assert construction.chunk_id == section.chunk_id and len(split_sentences(construction.answer)) >= 2


def test_vague_questions_use_the_title_a_person_would_know(report_all):
    """ "What is <title> about?" and friends, answered with the document's central sentences."""
    pairs, _, _ = report_all
    got = _questions(pairs, "vague")
    assert "What is Harbour Lights of the North Coast about?" in got
    assert (
        got["What topics does Harbour Lights of the North Coast cover?"].answer == "Construction; Automation"
    )
    untitled = "\n\n".join(REPORT.split("\n\n")[3:6])  # no heading: the document's name stands in
    pairs, _, _ = make_pairs(untitled, "r2", title="uploads/harbour_lights-2021.pdf", strategies=["vague"])
    assert "What is harbour lights 2021 about?" in {p.question for p in pairs}


@pytest.mark.parametrize(
    ("name", "title"),
    [
        ("harbour_lights-2021.pdf", "harbour lights 2021"),
        ("https://example.org/guides/keeping-the-light.html?x=1", "keeping the light"),
        ("Annual Report.docx", "Annual Report"),
        ("3f9a1c77e0b24d5a.pdf", None),
        ("", None),
        ("___.txt", None),
    ],
)
def test_document_names_become_titles_only_when_they_read_like_one(name, title):
    """File names lose extension and separators; ids and empty names give no title."""
    assert clean_title(name) == title


def test_each_question_gets_two_paraphrases_with_the_same_answer_and_source(report):
    """Paraphrases reword the question, keep answer and chunk, and point at their original."""
    pairs, _, _ = report
    by_id = {p.pair_id: p for p in pairs}
    variants = [p for p in pairs if p.strategy == "paraphrase"]
    assert variants
    per_original = Counter(p.variant_of for p in variants)
    assert max(per_original.values()) == 2
    for v in variants:
        original = by_id[v.variant_of]
        assert v.question != original.question and v.question.endswith("?")
        assert (v.answer, v.chunk_id, v.sources) == (original.answer, original.chunk_id, original.sources)
    assert paraphrases("How tall is the tower?", "The tower is 42 metres tall.", strategy="number") == [
        "What is the height of the tower?",
        "Do you know how tall the tower is?",
    ]
    assert paraphrases("What is the Velmora Lighthouse?", strategy="definition") == [
        "Can you explain what the Velmora Lighthouse is?",
        "What is meant by the Velmora Lighthouse?",
    ]
    # changed: a question no rule fits used to get framings ("According to the document, ...")
    # that reword the template, not the fact; it now gets none
    assert paraphrases("How many storms does the text give for the station?") == []


def test_page_notices_and_bylines_are_not_prose():
    """ "Enable JavaScript" notices and byline/date lines are not sentences to ask about."""
    assert is_metadata_line("By Anna Roth and Jon Berg") and is_metadata_line("Published: 12 March 2021")
    assert not is_metadata_line("By 1902, the keeper had installed a new lens.")
    text = "Please enable JavaScript to view this page. You need to enable JavaScript to run this app."
    pairs, _, stats = make_pairs(text * 3, "d")
    assert pairs == [] and "not enough text to learn from" in stats["error"]


# --- fact questions ------------------------------------------------------------------------------


def _facts(sentence):
    from services.qagen.strategies import sentence_facts

    return {f.question: f for f in sentence_facts(sentence)}


def test_a_quantity_is_asked_for_in_its_own_clause():
    """The number's unit and preposition choose the question word; the clause is inverted around it."""
    assert set(_facts("A crew will return within 3 working days.")) == {
        "Within how many working days will a crew return?"
    }
    assert set(_facts("The board reviews the policy every 24 months, or sooner if the law changes.")) == {
        "How often does the board review the policy?"
    }
    assert set(_facts("A subscription costs £52 a year for one green bin, and £39 for each extra bin.")) == {
        "How much does a subscription cost a year for one green bin?"
    }
    assert set(_facts("In 2023 the district's households threw away 41,800 tonnes of waste.")) == {
        "How many tonnes of waste did the district's households throw away in 2023?"
    }
    assert set(_facts("There is a grace period of 48 hours after the due time.")) == {
        "How long is the grace period after the due time?"
    }


def test_a_clock_time_is_asked_for_with_its_preposition():
    """ "at" asks "What time", "by" "By what time", "until" "Until what time", "from ... to" "When";
    a decimal ("from 2.31 W") is no clock time, and a time in another clause gets no question."""
    facts = _facts("Guided tours start at 11:00 and 15:00 and last about 45 minutes.")
    assert set(facts) == {"What time do guided tours start?"}
    assert facts["What time do guided tours start?"].variants[0] == "When do guided tours start?"
    assert "By what time must items be placed outside?" in _facts(
        "Items must be placed outside by 07:00 on the collection day, on your own property where possible."
    )
    assert "Until what time can bookings be cancelled free of charge?" in _facts(
        "Bookings can be cancelled free of charge until 12:00 on the working day before collection."
    )
    assert "When is the Harbour Museum open?" in _facts(
        "The Harbour Museum is open from 10:00 to 17:30, Tuesday to Sunday."
    )
    assert "What time does the last ferry leave?" in _facts("The last ferry leaves at 9 pm on weekdays.")
    assert not any(
        f.rule == "when" for f in _facts("Tidewell lowered the power from 2.31 W to 1.74 W.").values()
    )
    assert _facts("The keeper, who arrives at 06:00, opens the gate.") == {}


def test_a_plural_subject_with_a_bare_verb_is_a_clause():
    """ "Tickets cost 4 euros" is read as subject and verb (before a figure), so its quantity is asked
    for; a plural noun before a word that is no verb there ("Bus stops close to ...") is not."""
    from services.qagen.rules.clause import parse_finite

    assert set(_facts("Tickets cost 4 euros for adults and 2 euros for children under 12.")) == {
        "How much do tickets cost for adults?"
    }
    clause = parse_finite("Bus stops close to the museum are marked in blue.")
    assert clause is not None and clause.aux == "are" and clause.subject.startswith("bus stops close")


def test_a_short_visitor_notice_gives_enough_pairs_to_learn_from():
    """Nine sentences of opening times and prices: a pair for each time and price they state (one
    pair in all before the clock-time and plural-verb rules, below the three a session needs)."""
    text = (
        "# Visiting the Harbour Museum\n\nThe Harbour Museum is open from 10:00 to 17:30, Tuesday to Sunday. "
        "Tickets cost 4 euros for adults and 2 euros for children under 12. Entry is free on the first "
        "Sunday of every month. Guided tours start at 11:00 and 15:00 and last about 45 minutes. Large "
        "bags must be left in the lockers by the main entrance. Photography is allowed everywhere except "
        "in the map room. Groups of more than 15 people should book at least two weeks ahead.\n"
    )
    pairs, _, stats = make_pairs(text, "d")
    facts = {p.question for p in pairs if p.strategy not in ("metadata", "paraphrase")}
    assert {
        "When is the Harbour Museum open?",
        "How much do tickets cost for adults?",
        "What time do guided tours start?",
    } <= facts, facts
    assert len(pairs) >= 3 and "error" not in stats


def test_a_quantity_the_clause_cannot_carry_gets_no_question():
    """No "How many minutes does the text mention?": a reduced relative or a participle opener yields nothing."""
    assert _facts("Containers left on the pavement for more than 48 hours may be removed.") == {}
    assert _facts("Figure 1 shows the distribution of latency of 240 messages.") == {}
    pairs, _, _ = make_pairs(DOC + "\nThe museum is open for 3 hours a day, if the keeper is there.\n", "d1")
    assert not any(" the text " in p.question or " mention?" in p.question for p in pairs)


def test_each_fact_is_reworded_around_the_fact_not_the_template():
    """Paraphrases of a fact question change the question word or the word order, keeping the fact."""
    answer = "The board reviews the policy every 24 months, or sooner if the law changes."
    assert paraphrases("How often does the board review the policy?", answer, strategy="number") == [
        "How frequently does the board review the policy?",
        "Do you know how often the board reviews the policy?",
    ]
    answer = "The hub writes 8,640 readings a day."
    assert paraphrases("How many readings does the hub write a day?", answer, strategy="number") == [
        "What number of readings does the hub write a day?",
        "Do you know how many readings the hub writes a day?",
    ]


def test_a_passive_agent_is_asked_for_both_ways():
    """ "Appeals are heard by the Review Board" -> "Who hears appeals?" and "What does the Review Board hear?"."""
    facts = _facts("Appeals are heard by the Review Board, which consists of three trustees.")
    assert facts["Who hears appeals?"].rule == "who"
    assert facts["What does the Review Board hear?"].rule == "what"
    assert "By whom are appeals heard?" in facts["Who hears appeals?"].variants


def test_a_question_that_names_its_own_answer_is_not_asked():
    """ "Appeals are heard by the Appeals Panel": "What does the Appeals Panel hear?" and "What is
    heard by the Appeals Panel?" give "appeals" away; "Who hears appeals?" is still asked."""
    sentence = "Appeals are heard by the Appeals Panel, which consists of three trustees."
    assert set(_facts(sentence)) == {"Who hears appeals?"}
    questions = [p.question for p in generate_pairs(chunk_text(sentence, doc_id="d")[0])]
    questions += [q for q, _, _ in wh_questions(prose_sentences(chunk_text(sentence, doc_id="d")[0]))]
    assert not any(q.startswith(("What is heard", "What does the Appeals Panel")) for q in questions)


def test_steps_and_conditions_are_asked_as_a_user_would():
    """ "To X, do Y" -> "How do I X?"; "If you X, do Y" -> "What should I do if I X?"; else "What happens if"."""
    assert set(_facts("To pair a door sensor, open Menu > Devices, then hold the button for 3 seconds.")) == {
        "How do I pair a door sensor?"
    }
    assert "What should I do if I am moving into a property and the containers are missing?" in _facts(
        "If you are moving into a property and the containers are missing, report it online."
    )
    assert "What happens if the condition is still present after 20 minutes?" in _facts(
        "If the condition is still present after 20 minutes, the buzzer sounds again."
    )


def test_who_questions_are_only_asked_about_people():
    """A place or a body in a sentence gets no "Who is" question; a name with a role before it does."""
    text = (
        "Plastic film can be taken to the collection points at larger supermarkets near Quarry Road. "
        "North zone collections cover Hollins Cross and Wharf Side every Monday morning. "
        "In 1902 the keeper Anna Roth installed a new lens in the old tower."
    )
    questions = [p.question for p in generate_pairs(chunk_text(text, doc_id="d")[0])]
    assert "Who is Anna Roth?" in questions
    assert not any(q.startswith("Who is") and "Anna Roth" not in q for q in questions)


def test_definitions_are_not_read_from_an_opening_clause_or_a_relative_clause():
    """ "If you are ..." and "Textiles that are wet ..." define nothing: no "What is meant by If you?"."""
    text = (
        "If you are moving into a property in the district and the containers are missing, report it. "
        "Textiles that are wet, oily or mouldy cannot be reused and belong in the grey bin. "
        "Garden waste collections are a paid service that runs from March to November."
    )
    questions = [p.question for p in generate_pairs(chunk_text(text, doc_id="d")[0])]
    assert "What are garden waste collections?" in questions
    assert not any("If you" in q or "Textiles that" in q for q in questions)


def test_reference_entries_table_rows_and_glued_headings_are_not_asked_about():
    """A reference list entry or a run of table numbers is not prose; a heading glued to a sentence is cut off."""
    text = (
        "Proceedings of the Conference on Smart Environments, pages 14-22, 2022.\n\n"
        "Karsby Fen 17 212 3.9 61 Dunmoor Ridge 19 268 4.4 48 Pellan 12 199 3.1 70.\n\n"
        "Acknowledgements\nThis work was funded by the Coastal Observation Fund under grant CO-2021-0457."
    )
    chunk = chunk_text(text, doc_id="d")[0]
    from services.qagen.text import prose_sentences

    assert [s.text for s in prose_sentences(chunk)] == [
        "This work was funded by the Coastal Observation Fund under grant CO-2021-0457."
    ]


def test_section_summaries_and_topics_name_sections_without_their_numbers():
    """ "5.2 Mounting steps" is asked about as "Mounting steps"; a site name after "|" leaves the title."""
    doc = (
        "# Brindle B4 manual | Quillfen\n\nThe Brindle B4 is a wall-mounted hub for cold rooms.\n\n"
        "## 5.2 Mounting steps\n\nHold the template against the wall and mark the holes. "
        "Drill the holes with a 6 mm bit and push in the plugs.\n\n"
        "## 6. First start\n\nSwitch the hub on and choose the language. Enter the admin PIN and change it."
    )
    pairs, _, _ = make_pairs(doc, "m", strategies=["section_summary", "vague"])
    questions = {p.question for p in pairs}
    assert "Can you summarize the section on Mounting steps?" in questions
    assert "What is Brindle B4 manual about?" in questions
    assert not any(ch.isdigit() and "summarize the section" in q for q in questions for ch in q)


def _chunk_questions(text: str) -> list[str]:
    """Every quiz, definition and wh question the rules ask about one chunk of `text`."""
    chunk = chunk_text(text, doc_id="d")[0]
    return [p.question for p in generate_pairs(chunk)] + [q for q, _, _ in wh_questions(prose_sentences(chunk))]


@pytest.mark.parametrize(
    "sentence",
    [
        "Garden waste collections are optional and are paid for separately.",
        "Appeals are heard by the Appeals Panel, which consists of three trustees.",
        "Batching messages is the obvious remedy, and fixed batching is used in some gateways.",
        "Moving away from the three parishes is the one case in which we refund the fee.",
        "The intervals below are the minimum for sites with light door traffic.",
        "Sensor nodes were of four types supplied by two manufacturers.",
    ],
)
def test_a_what_is_x_question_is_only_asked_for_a_sentence_that_defines_x(sentence):
    """A property, a rule, a judgement, an activity or document furniture gets no "What is/are X?"."""
    questions = [p.question for p in generate_pairs(chunk_text(sentence, doc_id="d")[0]) if p.strategy == "definition"]
    assert questions == []
    defining = "The backup battery is a lithium iron phosphate pack supplied with every hub."
    got = [p.question for p in generate_pairs(chunk_text(defining, doc_id="d")[0]) if p.strategy == "definition"]
    assert got == ["What is the backup battery?"]


@pytest.mark.parametrize(
    "sentence",
    [
        "The second is availability: a gateway that has shut down delivers nothing at all.",
        "Items must be placed outside early on the collection day, on your own property where possible.",
        "Tie shoes together in pairs before you put them in the textile bank at the centre.",
        "Nodes did not need any change.",
        "Several authors have proposed harvesting-aware scheduling for the nodes themselves.",
    ],
)
def test_a_fallback_question_is_only_asked_about_a_real_noun_phrase(sentence):
    """No "What can you tell me about the second / items / tie shoes / nodes / several authors?"."""
    assert not any(q.startswith("What can you tell me about") for q in _chunk_questions(sentence))
    topic = "Shredded paper can be recycled if it is put inside a paper envelope or paper bag."
    assert "What can you tell me about shredded paper?" in _chunk_questions(topic)


@pytest.mark.parametrize(
    ("sentence", "bad"),
    [
        ("Borrowing history is kept for 18 months after each item is returned, so that we can plan.", "How many months"),
        ("Powered tools must be less than 10 years old and come with their manuals.", "How long"),
        ("New-build properties must buy a full set of containers for £96 before the first collection.", "How much"),
        ("Bags left next to a full bin, known as side waste, are not collected after Christmas in Fenmarrow.", "Where"),
        ("Removing the urgency classes saved a little energy but raised the latency to 2,950 ms, because alarms waited.", "Why"),
        ("Tidewell delivered 99.1% of alarms; FixedFwd delivered 93.4%, largely because alarms collided with routine traffic.", "Why"),
        ("Event loans are free of charge and allow up to 15 items for up to 10 days.", "What is free"),
        ("The Appeals Panel is quiet in summer; appeals are heard by the Appeals Panel within 28 days.", "What is heard"),
    ],
)
def test_a_sentence_the_rules_would_misread_gets_no_ungrammatical_question(sentence, bad):
    """A quantity in another clause, "N years old", an object before "for £N", a participle read as a
    verb, a second verb the inversion would leave unchanged, a cause belonging to another clause,
    and "What is <adjective>?" give no question of that form."""
    assert not any(q.startswith(bad) for q in _chunk_questions(sentence))


def test_what_happened_in_a_year_is_asked_only_when_one_sentence_names_it():
    """ "What happened in 2023?" is ambiguous when two sentences of the chunk name 2023."""
    one = "In 2023 the district's households threw away 41,800 tonnes of waste."
    two = one + " A trial in the village of Sallowby ran from June to November 2023."
    assert "What happened in 2023?" in _chunk_questions(one)
    assert "What happened in 2023?" not in _chunk_questions(two)


def test_a_measure_of_a_thing_is_not_reworded_as_what_the_thing_is():
    """ "a larger bin of 240 litres" -> "How many litres is the larger bin?" without "What is the
    larger bin?"; an amount ("a fixed penalty of £400") keeps "What is the fixed penalty?"."""
    bin_facts = _facts("Households of six can apply for a larger slate-grey bin of 240 litres.")
    assert all(not v.startswith("What is") for f in bin_facts.values() for v in f.variants)
    fee = _facts("The council can issue a fixed penalty of £400 for fly-tipping.")
    assert "What is the fixed penalty for fly-tipping?" in fee["How much is the fixed penalty for fly-tipping?"].variants


SECTIONS = """# Depot guide

This guide explains how the council's waste depot works for the residents of the district.

## Opening

The depot opens at 08:00 on weekdays and at 09:00 on Saturdays. Staff close the gates at 17:00
sharp every day. The depot is closed on every public holiday and on the day after it.

## Containers

Each household receives three containers.

- Grey bin, 180 litres: general waste. Collected every three weeks.
- Teal bin, 240 litres: paper, cans and plastic bottles. Collected every two weeks.
- Amber caddy, 23 litres: food waste. Collected every week.

A fourth container is available by subscription. Households may keep their old brown bin until 2025.

## Prices

| Item | Price |
|---|---|
| Plasterboard | £5 per bag |
| Tyres | £4 each |
| Mattress | £12 each |
| Fridge | £20 each |
| Sofa | £25 each |
| Piano | £60 each |

Prices are reviewed every April. Payment is by card only.

## Questions

Can I bring a trailer? Yes, with a permit. Can I bring asbestos? Only on weekday mornings.

## Centres

The district has three centres. They accept wood, metal and garden waste. Commercial waste is not
accepted at any centre. Van permits are issued online.
"""


def test_a_section_summary_quotes_only_sentences_that_stand_alone():
    """Summaries come from prose sections; a section that is mostly a table, has a list as part of
    it, or is questions and answers gets none; a pronoun-led sentence comes with the one before it."""
    pairs, _, _ = make_pairs(SECTIONS, "s1", strategies=["section_summary"])
    got = {p.question: p.answer for p in pairs}
    assert set(got) == {"Can you summarize the section on Opening?", "Can you summarize the section on Centres?"}
    centres = got["Can you summarize the section on Centres?"]
    assert centres.startswith("The district has three centres. They accept wood")
