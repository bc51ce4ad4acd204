"""The extractive strategies: separate rule sets, each asking about a document in its own way.

A model that is to learn a document needs each fact asked about more than once and in more than one
form, plus the questions people actually open with ("What is this about?"). Each strategy below is a
rule set; every pair it makes names its rule in `strategy` and its source chunk, and every answer
is text of that chunk (or, for summaries and lists of headings, of the chunks named in `sources`).

| strategy          | rules (pair.strategy)                      | scope    |
| ----------------- | ------------------------------------------ | -------- |
| `quiz`            | heading, date, number, entity, fallback    | chunk    |
| `definition`      | definition                                 | chunk    |
| `wh`              | who, what, when, where, why, how           | chunk    |
| `summary`         | summary (whole document, 3 lengths)        | document |
| `section_summary` | section_summary                            | document |
| `metadata`        | metadata (title, authors, date)            | document |
| `vague`           | vague (what a person knowing only the title asks) | document |
| `paraphrase`      | paraphrase (2 rewordings of each question) | pairs    |

`summary` and `vague` are opt-in: a session that names no strategies gets the others
(`options.QA_DEFAULT_STRATEGIES`), since their whole-document answers were mostly wrong.

The rules are deliberately plain: regular expressions over sentences, a small table of irregular
verbs, sentence scores from word frequencies. They can miss a fact; they never invent one.

This module is the interface: each rule set lives in its own module of `services.qagen.rules`.
"""

from __future__ import annotations

from collections.abc import Iterable

from services.common.options import (
    QA_CHUNK_STRATEGIES,
    QA_DOCUMENT_STRATEGIES,
    QA_STRATEGIES,
    resolve_strategies,
)
from services.common.qapair import QAPair
from services.qagen.chunk import Chunk
from services.qagen.rules.clause import parse_clause, parse_finite
from services.qagen.rules.document import MIN_DOCUMENT_SENTENCES, clean_title, document_pairs
from services.qagen.rules.facts import Fact, agent_facts, number_facts, sentence_facts, step_facts
from services.qagen.rules.paraphrase import PARAPHRASES, paraphrase_pairs, paraphrases
from services.qagen.rules.quiz import generate_pairs
from services.qagen.rules.verbs import lemma
from services.qagen.rules.wh import wh_pairs, wh_questions
from services.qagen.text import has_content

__all__ = [
    "ALL_STRATEGIES",
    "CHUNK_STRATEGIES",
    "DOCUMENT_STRATEGIES",
    "MIN_DOCUMENT_SENTENCES",
    "PARAPHRASES",
    "RULES",
    "Fact",
    "agent_facts",
    "chunk_pairs",
    "clean_title",
    "document_pairs",
    "lemma",
    "number_facts",
    "paraphrase_pairs",
    "paraphrases",
    "parse_clause",
    "parse_finite",
    "sentence_facts",
    "step_facts",
    "wh_questions",
]

CHUNK_STRATEGIES = QA_CHUNK_STRATEGIES
DOCUMENT_STRATEGIES = QA_DOCUMENT_STRATEGIES
ALL_STRATEGIES = QA_STRATEGIES
RULES: dict[str, tuple[str, ...]] = {
    "quiz": ("heading", "date", "number", "entity", "fallback"),
    "definition": ("definition",),
    "wh": ("who", "what", "when", "where", "why", "how"),
    "summary": ("summary",),
    "section_summary": ("section_summary",),
    "metadata": ("metadata",),
    "vague": ("vague",),
    "paraphrase": ("paraphrase",),
}


def chunk_pairs(
    chunk: Chunk, *, doc_title: str | None = None, strategies: Iterable[str] | None = None
) -> list[QAPair]:
    """The pairs of the selected chunk-scope strategies for one chunk, in a fixed order."""
    selected = resolve_strategies(strategies)
    rules = {r for s in selected for r in RULES[s]}
    pairs: list[QAPair] = []
    if "quiz" in selected or "definition" in selected:
        title = clean_title(doc_title)
        pairs += [p for p in generate_pairs(chunk, doc_title=title) if p.strategy in rules]
    if "wh" in selected and has_content(chunk):
        pairs += wh_pairs(chunk, {p.question for p in pairs})
    return pairs
