"""RAFT-style examples (services/trainer/passages.py): the pair's source chunk among distractors,
distractors alone, or no passages, in inference's own prompt layout."""

from __future__ import annotations

from services.common import passages as layout
from services.common.passages import build_passages
from services.inference import bots as inference_bots
from services.trainer import passages
from services.trainer.examples import build_examples
from tests.test_model import real_tokenizer

TOPICS = [
    "harbour",
    "lighthouse",
    "ferry",
    "warehouse",
    "crane",
    "customs",
    "pier",
    "tugboat",
    "dock",
    "canal",
]
CHUNKS = [
    {
        "chunk_id": f"c{i}",
        "doc_id": "d1" if i < 5 else "d2",
        "start": 100 * i,
        "end": 100 * i + 90,
        "text": f"The {topic} of Brindle was built in {1900 + i} and is painted {topic[:3]}-red.",
    }
    for i, topic in enumerate(TOPICS)
]
PAIRS = [
    {
        "chunk_id": f"c{i % 10}",
        "question": f"When was the {TOPICS[i % 10]} of Brindle built (form {i // 10})?",
        "answer": f"In {1900 + i % 10}.",
    }
    for i in range(40)
]
PAGES = {"d1": [{"page": 1, "start": 0}, {"page": 2, "start": 300}], "d2": []}
NAMES = {"d1": "harbour.pdf", "d2": "notes.md"}


def _make(seed: int = 3):
    return passages.raft_pairs(PAIRS, build_passages(CHUNKS, PAGES, NAMES), k=3, seed=seed)


def test_examples_mix_gold_with_distractors_distractors_alone_and_no_passages():
    """Most questions carry their own chunk among two others (at varying places), some carry
    three other chunks, some none; the answers never change."""
    out, counts = _make()
    assert sum(counts.values()) == len(out) == len(PAIRS)
    assert counts["gold"] >= 20 and counts["distractors"] >= 3 and counts["none"] >= 1
    places = set()
    seen = {"gold": 0, "distractors": 0, "none": 0}
    for pair, made in zip(PAIRS, out, strict=True):
        assert made["answer"] == pair["answer"]
        gold_text = CHUNKS[int(pair["chunk_id"][1:])]["text"]
        if made["question"] == pair["question"]:
            seen["none"] += 1
            continue
        lines = made["question"].split("\n")
        assert lines[0] == "Passages from the documents:" and lines[-1] == f"Question: {pair['question']}"
        numbered = [line for line in lines if line.startswith("[")]
        assert [line[:3] for line in numbered] == ["[1]", "[2]", "[3]"]
        holding = [i for i, line in enumerate(numbered) if gold_text in line]
        if holding:
            seen["gold"] += 1
            places.add(holding[0])
        else:
            seen["distractors"] += 1
    assert seen == counts
    assert places == {0, 1, 2}


def test_the_layout_is_the_one_inference_builds_for_retrieved_passages():
    """The user turn is the `with_passages` chat uses too, of the session's passages (document
    names and pages included), not a second copy of the format."""
    assert passages.with_passages is layout.with_passages is inference_bots.with_passages
    out, _ = _make()
    built = {p.chunk_id: p for p in layout.build_passages(CHUNKS, PAGES, NAMES)}
    first = next(m for p, m in zip(PAIRS, out, strict=True) if m["question"] != p["question"])
    chunk_ids = [c["chunk_id"] for c in CHUNKS if c["text"] in first["question"]]
    order = sorted(chunk_ids, key=lambda c: first["question"].index(CHUNKS[int(c[1:])]["text"]))
    question = PAIRS[out.index(first)]["question"]
    hits = [layout.Hit(built[c], 0.0) for c in order]
    assert first["question"] == layout.with_passages(question, hits)
    assert "(harbour.pdf, p. 1)" in first["question"] or "(notes.md, p. 1)" in first["question"]


def test_the_same_seed_gives_the_same_examples_and_passages_reach_the_prompt():
    """Deterministic per seed (a resumed run rebuilds the same data); another seed differs. The
    passages sit in the user turn before the labelled answer."""
    assert _make(3) == _make(3)
    assert _make(3)[0] != _make(4)[0]
    tok = real_tokenizer()
    out, _ = _make()
    made = next(m for m in out if m["question"].startswith("Passages"))
    example = build_examples(tok, [made], max_seq_len=1024)[0]
    prompt = tok.decode([t for t, lab in zip(example.input_ids, example.labels, strict=True) if lab == -100])
    assert "Passages from the documents:" in prompt and "[3]" in prompt


def test_without_chunks_the_pairs_stay_as_they_are():
    """A session trained only from uploaded QA files has no chunks: plain questions."""
    out, counts = passages.raft_pairs(PAIRS[:4], [], k=3, seed=1)
    assert out == PAIRS[:4] and counts == {"gold": 0, "distractors": 0, "none": 4}


def test_held_out_questions_get_what_retrieval_finds_as_chat_would():
    """retrieved_pairs puts BM25's top passages before each question (the gold one first when
    the question names its topic); a question retrieval finds nothing for stays plain."""
    asked = [PAIRS[2], {"question": "Zzyzx?", "answer": "No."}]
    out = passages.retrieved_pairs(asked, build_passages(CHUNKS, PAGES, NAMES), k=3)
    index = layout.BM25(layout.build_passages(CHUNKS, PAGES, NAMES))
    assert out[0]["question"] == layout.with_passages(
        PAIRS[2]["question"], index.search(PAIRS[2]["question"], k=3)
    )
    assert CHUNKS[2]["text"] in out[0]["question"].split("\n")[1]
    assert out[1] == asked[1]


def test_held_out_questions_read_with_passages_start_with_the_quote_chat_gives():
    """With `quote`, each open-book copy carries the start of the reply chat would give: the
    sentences of its passages BM25 ranks best for the question, quoted and cited; none without
    `quote`, and none for a question nothing is retrieved for."""
    from services.common import evidence

    asked = [PAIRS[2], {"question": "Zzyzx?", "answer": "No."}]
    built = build_passages(CHUNKS, PAGES, NAMES)
    out = passages.retrieved_pairs(asked, built, k=3, quote=2)
    hits = layout.BM25(built).search(PAIRS[2]["question"], k=3)
    picked = evidence.pick(PAIRS[2]["question"], hits, None, 2)
    assert picked and out[0]["prime"] == evidence.opening(picked)
    assert out[0]["prime"].startswith('The document says: "') and "[1]" in out[0]["prime"]
    assert "prime" not in out[1]
    assert "prime" not in passages.retrieved_pairs(asked, built, k=3)[0]
