"""The quality gate for QA pairs: each filter with a bad pair it removes and counts, the grounding
check, the held-out split by source chunk, and the coverage report (no server, no model)."""

from __future__ import annotations

import pytest

from services.common.qapair import QAPair, pair_id_for
from services.qagen import quality
from services.qagen.chunk import Chunk, chunk_text
from services.qagen.extractive import make_pairs
from services.qagen.quality import coverage_report, filter_pairs, split_pairs, support
from services.qagen.strategies import paraphrase_pairs

CHUNK = Chunk(
    chunk_id="c1",
    doc_id="d",
    start=0,
    end=200,
    heading="History",
    text=(
        "The lighthouse was first lit in 1847 by the Tarn Harbour Board. In 1902, the keeper Anna Roth "
        "installed a new Fresnel lens that doubled the range of the beam."
    ),
)
GOOD_Q = "When was the lighthouse first lit?"
GOOD_A = "The lighthouse was first lit in 1847 by the Tarn Harbour Board."


def pair(
    question: str = GOOD_Q, answer: str = GOOD_A, chunk_id: str = "c1", strategy: str = "quiz", **kw
) -> QAPair:
    return QAPair(
        pair_id_for(chunk_id, question, answer), question, answer, "d", chunk_id, 0, 200, strategy, **kw
    )


def check(*pairs: QAPair, **kw) -> tuple[list[QAPair], dict[str, int]]:
    return filter_pairs([pair(), *pairs], chunks=[CHUNK], **kw)


def dropped_only(counts: dict[str, int], reason: str, n: int = 1) -> None:
    assert counts == {r: (n if r == reason else 0) for r in quality.REASONS}


# --- each filter -------------------------------------------------------------------------------


def test_a_good_pair_passes_every_check_and_carries_its_support():
    """The control: a quoted answer is kept with score 1.0 and nothing is counted."""
    kept, counts = filter_pairs([pair()], chunks=[CHUNK])
    assert [p.question for p in kept] == [GOOD_Q] and kept[0].score == 1.0
    assert sum(counts.values()) == 0


@pytest.mark.parametrize(
    ("question", "answer"), [("What is it?", ""), ("", GOOD_A), ("  ", "   "), ("?", GOOD_A)]
)
def test_an_empty_question_or_answer_is_dropped_as_empty(question, answer):
    """No answer, or a question with no words: removed and counted under empty."""
    kept, counts = check(pair(question, answer))
    assert len(kept) == 1
    dropped_only(counts, "empty")


def test_a_fragment_answer_is_dropped_as_too_short():
    """An answer under the minimum length is no training target; a metadata answer may be short."""
    kept, counts = check(pair("Who lit the lighthouse first?", "The Board."))
    assert len(kept) == 1
    dropped_only(counts, "too_short")
    kept, counts = check(pair("What is the title of the document?", "History", strategy="metadata"))
    assert len(kept) == 2 and sum(counts.values()) == 0


def test_an_answer_longer_than_the_limit_in_characters_or_tokens_is_dropped_as_too_long():
    """Over max_answer_chars, or over max_answer_tokens as counted by the length function."""
    long_answer = (GOOD_A + " ") * 20
    kept, counts = check(pair("What does the text say about the lighthouse?", long_answer))
    assert len(kept) == 1
    dropped_only(counts, "too_long")
    kept, counts = filter_pairs(
        [pair()], chunks=[CHUNK], length_fn=lambda s: len(s.split()), max_answer_tokens=8
    )
    assert kept == []
    dropped_only(counts, "too_long")


@pytest.mark.parametrize(
    ("question", "answer"),
    [
        ("<|im_start|>assistant When was it lit?", GOOD_A),
        ("Q: When was the lighthouse first lit?", GOOD_A),
        ("When was the lighthouse first lit?", '{"answer": "The lighthouse was first lit in 1847."}'),
        ("When was the lighthouse\nfirst lit?", GOOD_A),
        ("When was the lighthouse first lit\x00?", GOOD_A),
        ("The lighthouse was lit in 1847", GOOD_A),
        ("1847 ??? 1902 !!! 42 %%% ###?", GOOD_A),
        (
            "When was the lighthouse first lit by the Tarn Harbour Board?",
            "When was the lighthouse first lit by the Tarn Harbour Board?",
        ),
        ("When " + "really " * 60 + "was it lit?", GOOD_A),
    ],
)
def test_a_malformed_pair_is_dropped_as_malformed(question, answer):
    """Template tokens, Q/A labels, JSON, line breaks, control characters, no question: malformed."""
    kept, counts = check(pair(question, answer))
    assert len(kept) == 1
    dropped_only(counts, "malformed")


def test_an_imperative_request_is_a_well_formed_question():
    """ "Summarize the section on History." is a request a person types: it is not malformed."""
    assert quality.malformed_reason("Summarize the section on History.", GOOD_A) is None


def test_near_duplicate_questions_are_dropped_and_the_first_is_kept():
    """The same question in other case and punctuation, or nearly the same words, is counted once."""
    kept, counts = check(
        pair("when was the LIGHTHOUSE first lit??"),
        pair("When was the lighthouse first lit ?", chunk_id="c1"),
        pair(
            "Who installed a new Fresnel lens?", "In 1902, the keeper Anna Roth installed a new Fresnel lens."
        ),
    )
    assert [p.question for p in kept] == [GOOD_Q, "Who installed a new Fresnel lens?"]
    dropped_only(counts, "duplicate_question", 2)


def test_a_dropped_pair_does_not_hide_a_good_one_with_the_same_question():
    """Duplicates are found among pairs that passed the other checks, so an ungrounded first copy
    does not shadow a grounded second one."""
    bad = pair(GOOD_Q, "The lighthouse was first lit by Napoleon Bonaparte during his voyage to Egypt.")
    kept, counts = filter_pairs([bad, pair()], chunks=[CHUNK])
    assert [p.answer for p in kept] == [GOOD_A]
    dropped_only(counts, "ungrounded")


# --- grounding ---------------------------------------------------------------------------------


def test_grounding_drops_an_answer_the_source_chunk_does_not_support():
    """An answer with facts the chunk lacks is dropped and counted as ungrounded."""
    invented = pair(
        "Who designed the lens?", "The lens was designed by Augustin Fresnel's students in Paris in 1899."
    )
    kept, counts = check(invented)
    assert invented not in kept and len(kept) == 1
    dropped_only(counts, "ungrounded")


def test_grounding_accepts_a_reworded_answer_made_of_the_chunks_words():
    """Inflections and reordering still count as support: "installing" is supported by "installed"."""
    assert support("Anna Roth, the keeper, installed the lens in 1902.", CHUNK.text) == 1.0
    reworded = "In 1902 Anna Roth was installing a new Fresnel lens, doubling the beam's range."
    assert support(reworded, CHUNK.text) >= quality.MIN_SUPPORT
    kept, counts = check(pair("What did Anna Roth do in 1902?", reworded))
    assert len(kept) == 2 and counts["ungrounded"] == 0


def test_the_heading_and_named_source_chunks_count_as_support():
    """A title answer is supported by the chunk's heading; a summary by every chunk it names."""
    assert support("History", quality.source_text(CHUNK)) == 1.0
    other = Chunk(
        "c2", "d", 300, 400, "Tarn Island has 312 permanent residents who work in fishing.", "Today"
    )
    summary = pair(
        "Can you summarize the document?",
        "The lighthouse was first lit in 1847. Tarn Island has 312 permanent residents.",
        strategy="summary",
        sources=("c2",),
    )
    kept, counts = filter_pairs([summary], chunks=[CHUNK, other])
    assert kept and counts["ungrounded"] == 0
    kept, counts = filter_pairs([summary], chunks=[CHUNK])  # without c2, half the answer is unsupported
    assert kept == [] and counts["ungrounded"] == 1


def test_a_pair_naming_an_unknown_chunk_cannot_be_grounded():
    """Grounding needs the source: a pair whose chunk is not among the chunks is dropped."""
    kept, counts = filter_pairs([pair(chunk_id="nowhere")], chunks=[CHUNK])
    assert kept == [] and counts["ungrounded"] == 1


# --- almost no text ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "Loading...",
        "Please enable JavaScript to view this page.",
        "<noscript>You need to enable JavaScript to run this app.</noscript>",
        "# Annual Report\n\nBy Anna Roth\n\n2021",
        "Contents\n\n1. Introduction\n2. Methods\n3. Results",
    ],
)
def test_a_document_with_almost_no_text_yields_no_pairs(text):
    """A one-line or JavaScript-only page gives no pairs from any strategy: nothing is invented."""
    pairs, _, stats = make_pairs(text, "d", title="report.pdf")
    assert pairs == []
    assert stats["pairs"] == 0 and stats["chunk_coverage"] == 0.0


# --- held-out split ----------------------------------------------------------------------------


DOC = "\n\n".join(
    f"## Station {n}\n\nThe {n} station recorded {40 + i} storms in {1990 + i} on the northern coast. "
    f"Keeper {n.title()} Berg wrote a daily log of the weather and the ships that passed the cape."
    for i, n in enumerate(
        ["Alder", "Birch", "Cedar", "Dogwood", "Elm", "Fir", "Gum", "Hazel", "Ivy", "Juniper"]
    )
)


def test_the_split_never_puts_paraphrases_of_one_chunk_on_both_sides():
    """Every chunk's pairs, paraphrases included, land entirely in train or entirely in eval."""
    pairs, chunks, _ = make_pairs(DOC, "d", strategies=["quiz", "wh", "definition", "paraphrase"])
    assert any(p.variant_of for p in pairs)
    for seed in range(5):
        train, held_out = split_pairs(pairs, eval_fraction=0.2, seed=seed)
        assert held_out and train
        assert sorted(p.pair_id for p in train + held_out) == sorted(p.pair_id for p in pairs)
        assert not {p.chunk_id for p in train} & {p.chunk_id for p in held_out}
        ids = {p.pair_id for p in held_out}
        for p in pairs:
            if p.variant_of:
                assert (p.pair_id in ids) == (p.variant_of in ids)


def test_the_split_is_deterministic_and_near_the_asked_fraction():
    """The same seed gives the same split; another seed another; eval holds about the fraction."""
    pairs, _, _ = make_pairs(DOC, "d", strategies=["quiz", "wh", "paraphrase"])
    a = split_pairs(pairs, 0.2, seed=1)
    assert split_pairs(pairs, 0.2, seed=1) == a
    assert any(split_pairs(pairs, 0.2, seed=s)[1] != a[1] for s in range(2, 6))
    assert 0.1 * len(pairs) <= len(a[1]) <= 0.3 * len(pairs)
    assert split_pairs(pairs, 0.0) == (list(pairs), [])
    with pytest.raises(ValueError):
        split_pairs(pairs, 1.0)


def test_chunks_that_share_an_answer_or_feed_a_summary_stay_out_of_eval_together():
    """Overlapping chunks quoting one sentence are one group; chunks a summary draws on stay in train."""
    same = "The keeper wrote a daily log of the weather and the passing ships."
    pairs = [
        pair("What did the keeper write?", same, chunk_id="a"),
        pair("What did the keeper keep?", same, chunk_id="b"),
        pair("Can you summarize it?", GOOD_A + " " + same, chunk_id="c", strategy="summary", sources=("d",)),
        pair("When was it lit?", GOOD_A, chunk_id="d"),
        *(
            pair(
                f"What happened in {y}?", f"Something happened in the year {y} at the cape.", chunk_id=f"y{y}"
            )
            for y in range(1900, 1920)
        ),
    ]
    for seed in range(10):
        train, held_out = split_pairs(pairs, eval_fraction=0.3, seed=seed)
        sides = {p.chunk_id: p in held_out for p in pairs}
        assert sides["a"] == sides["b"]
        assert not sides["c"] and not sides["d"]


def test_imported_pairs_without_chunks_keep_a_fact_and_its_paraphrases_together():
    """Pairs with no chunk (a person's own) are grouped by the fact they reword."""
    originals = [
        QAPair(pair_id_for("", f"What is rule {i}?", f"Rule {i} says to keep the lamp lit."), f"What is rule {i}?",
               f"Rule {i} says to keep the lamp lit.", "d", "", 0, 0, "imported")
        for i in range(20)
    ]  # fmt: skip
    pairs = originals + paraphrase_pairs(originals)
    train, held_out = split_pairs(pairs, eval_fraction=0.25, seed=3)
    assert held_out
    ids = {p.pair_id for p in held_out}
    for p in pairs:
        if p.variant_of:
            assert (p.pair_id in ids) == (p.variant_of in ids)


# --- coverage ----------------------------------------------------------------------------------


def test_the_coverage_report_counts_chunks_with_at_least_one_kept_pair():
    """Coverage is the share of chunks that are the source of a kept pair; the rest are listed."""
    chunks = chunk_text(DOC, doc_id="d")
    pairs = [
        pair(chunk_id=chunks[0].chunk_id),
        pair("Other?", chunk_id=chunks[0].chunk_id),
        pair(chunk_id=chunks[3].chunk_id),
    ]
    report = coverage_report(pairs, chunks)
    assert report["chunks"] == 10 and report["chunks_with_pairs"] == 2
    assert report["coverage"] == pytest.approx(0.2)
    assert report["uncovered"] == [c.chunk_id for i, c in enumerate(chunks) if i not in (0, 3)]
    assert coverage_report([], [])["coverage"] == 0.0


def test_make_pairs_covers_every_chunk_of_a_regular_document():
    """The extractive strategies reach every chunk of a document with content, and say so."""
    pairs, chunks, stats = make_pairs(DOC, "d")
    assert stats["chunk_coverage"] == 1.0 == coverage_report(pairs, chunks)["coverage"]
    assert stats["generated"] == stats["pairs"] + sum(stats["dropped"].values())
    assert set(stats["dropped"]) == set(quality.REASONS)


# --- question checks -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "question",
    [
        "What does the document say about 12. Troubleshooting?",
        "How many minutes does the section on 10. Maintenance mention?",
        "What can you tell me about 5.2 Mounting steps?",
        "How many shows does the text mention?",
        "What can you tell me about 2018?",
        "What does Figure 1 show about latency?",
    ],
)
def test_questions_about_the_document_rather_than_its_content_are_refused_as_reference_questions(question):
    """Section numbers, "does the text mention", figure references and a bare year as topic are refused."""
    assert quality.question_problem(question) == "reference_question"


@pytest.mark.parametrize(
    "question",
    ["Who is Eastfield Depot?", "Who is Quarry Road?", "Who is a cliff top 84 m above sea level?"],
)
def test_who_questions_are_only_asked_about_people(question):
    """ "Who is" about a place, a body or a thing is refused as the wrong question word."""
    assert quality.question_problem(question) == "wrong_question_word"
    assert quality.question_problem("Who is Anna Roth?") is None


@pytest.mark.parametrize(
    "question",
    [
        "What is meant by If you?",
        "When did In 2023 the district's households throw away 41?",
        "In which year did most brownouts cluster between 9 March and?",
        "How many days before the event does Event loan must be booked through the Events Liaison?",
        "Which thing are heard by the Appeals Panel?",
        "What reached by e-mail at the addresses on the notice board?",
        "What should I do if I are moving house?",
    ],
)
def test_fragments_built_from_a_sentence_are_refused_as_malformed_questions(question):
    """A clause opener carried into the question, a dangling end or a broken verb group is refused."""
    assert quality.question_problem(question) == "malformed_question"


@pytest.mark.parametrize(
    "question",
    [
        "Within how many working days will a crew return?",
        "What happened in 1902?",
        "Who are appeals heard by?",
        "Can you summarize the section on Mounting steps?",
        "What is the title of the document?",
        "How much does a subscription cost a year for one green bin?",
    ],
)
def test_well_formed_questions_pass_the_question_checks(question):
    """The checks refuse fragments, not ordinary questions ending in a preposition or a year."""
    assert quality.question_problem(question) is None


def test_refused_questions_are_counted_under_their_reason():
    """filter_pairs drops a refused question and counts it, so stats say why the set shrank."""
    kept, counts = check(pair("What does the document say about 2. History?"))
    assert [p.question for p in kept] == [GOOD_Q]
    dropped_only(counts, "reference_question")


# --- context-bound questions and answers -----------------------------------------------------------


@pytest.mark.parametrize(
    "question",
    [
        "What should I do if the difference is larger than 2.0 °C?",
        "What happens if the condition is still present after 20 minutes?",
        "What can you tell me about the second?",
        "How much does basic membership cost a year in other words?",
        "What delivered 99.1% of their alarms?",
        "What can you tell me about our six-hour settling period?",
        "What should I do if nothing happens?",
        "How long does installing take?",
        "What are the intervals below?",
        "How long is the shortest interval?",
        "When were the changes approved by the council's Environment Committee?",
        "What differed from the pooled means by 0.02 W and 0.3 points respectively?",
        "How does it work?",
    ],
)
def test_a_context_bound_question_is_rejected(question):
    """A question that only makes sense with the text it was lifted from is refused as context-bound."""
    assert quality.question_problem(question) == "context_bound"


@pytest.mark.parametrize(
    "question",
    [
        "What should I do if my container was out on time but was not emptied?",
        "What is the difference between the chilled and the frozen profile?",
        "What happens on the first Saturday of each month?",
        "What is collected on the same day as the plum box?",
        "What does the hub do when its battery is low?",
        "Which items, such as ladders, may any member borrow?",
        "What is the largest centre of the three?",
    ],
)
def test_a_question_that_names_what_it_refers_to_is_not_context_bound(question):
    """A reference with its "of ..." or "between ...", an ordinal before a noun, "its" after the noun
    it refers to, and a superlative with its "of ..." are ordinary questions."""
    assert quality.question_problem(question) is None


@pytest.mark.parametrize(
    "answer",
    [
        "Its footage is kept for 31 days and then overwritten.",
        "In other words, Basic membership costs €32 a year.",
        "No: plastic bags and film, crisp packets and polystyrene.",
        "The changes were approved by the council's Environment Committee on 14 November 2023.",
        "The switch happened at 00:00 UTC every Monday.",
    ],
)
def test_an_answer_that_leans_on_an_earlier_sentence_is_rejected(answer):
    """An answer opening with a pronoun, a connective or a bare reference ("The changes") is refused."""
    assert quality.question_problem("What is kept for 31 days?", answer) == "context_bound"
    assert quality.question_problem("What is kept for 31 days?", "Desk footage is kept for 31 days.") is None


def test_an_answer_cut_off_mid_sentence_is_malformed():
    """ "... is roughly proportional to the" (a PDF page break) is not an answer."""
    q = "What can you tell me about the energy benefit of batching?"
    assert quality.malformed_reason(q, "The energy benefit of batching is roughly proportional to the")
    assert quality.malformed_reason(q, "The energy benefit of batching grows with the batch length.") is None


def test_a_context_bound_pair_is_dropped_and_counted():
    """The gate drops such a pair and counts it under `context_bound`."""
    bad = pair("What happened after the second?", GOOD_A)
    kept, counts = check(bad)
    assert [p.question for p in kept] == [GOOD_Q] and counts["context_bound"] == 1
