"""Passages: the pieces of a session's documents that chat reads and cites, and that training puts
before questions. Training and chat must lay them out identically (numbering, document name, page,
length), so the layout lives here, with the BM25 ranking both use and the reader of a session's
`chunks.jsonl` and page maps (`pages.json`) in the store.
"""

from __future__ import annotations

import bisect
import math
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any

from services.common import keys
from services.common.errors import NotFound
from services.common.jsonl import from_jsonl

_WORD = re.compile(r"\w+", re.UNICODE)
# Words too common to say anything about relevance (English; other languages rank by IDF alone).
STOPWORDS = frozenset(
    "a an and are as at be by for from has have how in is it its of on or that the this to was were what "
    "when where which who why will with do does did can you your i me my we our they their".split()
)


def words(text: str) -> list[str]:
    """Every word of `text`, lower-cased."""
    return _WORD.findall(text.lower())


def tokens(text: str) -> list[str]:
    return [w for w in words(text) if w not in STOPWORDS]


def fold(word: str) -> str:
    """An English plural folded onto its singular ("tickets" -> "ticket", "batteries" ->
    "battery"); words ending in ss, us or is are kept ("class", "status", "analysis")."""
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    if len(word) > 3 and word.endswith("s") and not word.endswith(("ss", "us", "is")):
        return word[:-1]
    return word


def terms(text: str) -> list[str]:
    """The words BM25 matches on: `tokens` with plurals folded, so "How much is a ticket for an
    adult?" meets "Tickets cost 4 euros for adults" (measured on bench/knowledge: the key fact in
    the top 3 passages for 97 -> 99 of 104 tune questions, 44 -> 47 of 48 final ones)."""
    return [fold(w) for w in tokens(text)]


@dataclass(frozen=True)
class Passage:
    chunk_id: str
    doc_id: str
    doc_name: str
    page: int
    start: int
    end: int
    text: str


@dataclass(frozen=True)
class Hit:
    passage: Passage
    score: float


class BM25:
    """Okapi BM25 over passages (on `terms`: plurals folded); `search` returns the best hits with a
    positive score."""

    def __init__(self, passages: list[Passage], k1: float = 1.5, b: float = 0.75):
        self.passages = passages
        self.k1, self.b = k1, b
        self.tf = [Counter(terms(p.text)) for p in passages]
        self.len = [sum(tf.values()) for tf in self.tf]
        self.avg = (sum(self.len) / len(self.len)) if self.len else 0.0
        df: Counter = Counter()
        for tf in self.tf:
            df.update(tf.keys())
        n = len(passages)
        self.idf = {w: math.log(1 + (n - d + 0.5) / (d + 0.5)) for w, d in df.items()}

    def scores(self, query: str) -> list[tuple[float, int]]:
        """(score, passage index) of every passage with a positive score, best first."""
        q = set(terms(query))
        scored = []
        for i, tf in enumerate(self.tf):
            score = 0.0
            norm = self.k1 * (1 - self.b + self.b * self.len[i] / (self.avg or 1.0))
            for w in q:
                f = tf.get(w)
                if f:
                    score += self.idf[w] * f * (self.k1 + 1) / (f + norm)
            if score > 0:
                scored.append((score, i))
        scored.sort(key=lambda x: (-x[0], x[1]))
        return scored

    def ranked(self, query: str) -> list[int]:
        """Indexes of the passages sharing a word with the query, best first."""
        return [i for _, i in self.scores(query)]

    def search(self, query: str, k: int = 3) -> list[Hit]:
        return [Hit(self.passages[i], s) for s, i in self.scores(query)[:k]]


def page_of(pages: list[dict], offset: int) -> int:
    """The 1-based page whose span holds `offset` (pages.json is sorted by start)."""
    if not pages:
        return 1
    starts = [p["start"] for p in pages]
    i = max(0, bisect.bisect_right(starts, offset) - 1)
    return int(pages[i].get("page", i + 1))


def build_passages(
    chunks: list[dict], pages_by_doc: dict[str, list[dict]], names: dict[str, str]
) -> list[Passage]:
    return [
        Passage(
            chunk_id=c.get("chunk_id", ""),
            doc_id=c["doc_id"],
            doc_name=names.get(c["doc_id"], c["doc_id"]),
            page=page_of(pages_by_doc.get(c["doc_id"], []), int(c.get("start", 0))),
            start=int(c.get("start", 0)),
            end=int(c.get("end", 0)),
            text=c["text"],
        )
        for c in chunks
        if c.get("text", "").strip()
    ]


# Passages are whole chunks (qagen sizes them, ~320 tokens of the base model); together they may fill
# this much of the prompt. Measured on bench/knowledge (tune questions, top 3): cutting each passage
# to 700 characters left the key fact in 73% of prompts, whole chunks in 90%.
PASSAGES_MAX_CHARS = 4800


def _sentence_cut(text: str, limit: int) -> str:
    """`text` cut to at most `limit` characters at a sentence end (else a word), marked."""
    head = text[:limit]
    end = max(head.rfind(". "), head.rfind("? "), head.rfind("! "))
    head = head[: end + 1] if end > limit // 2 else head.rsplit(" ", 1)[0]
    return head + " …"


def with_passages(question: str, hits: list[Hit], max_chars: int = PASSAGES_MAX_CHARS) -> str:
    """The user turn with numbered passages before the question, best first. Passages are shown
    whole while they fit in `max_chars` together; one that does not fit is left out, never cut
    mid-fact. Only a first passage that alone exceeds the budget is shortened, at a sentence end."""
    if not hits:
        return question
    lines = ["Passages from the documents:"]
    used = 0
    for h in hits:
        text = " ".join(h.passage.text.split())
        if used and used + len(text) > max_chars:
            continue
        if len(text) > max_chars:
            text = _sentence_cut(text, max_chars)
        used += len(text)
        lines.append(f"[{len(lines)}] ({h.passage.doc_name}, p. {h.passage.page}) {text}")
    lines += ["", f"Question: {question}"]
    return "\n".join(lines)


def read_session_passages(store: Any, rec: Any) -> list[Passage]:
    """Blocking: the passages of a session (its `Session` record) from its stored chunks, with pages
    and document names; [] for a session without chunks (trained only on QA files)."""
    tenant, sid = rec.tenant, rec.session_id
    try:
        chunks = from_jsonl(store.get_bytes(keys.chunks(tenant, sid)))
    except NotFound:
        return []
    pages: dict[str, list[dict]] = {}
    for doc_id in sorted({c.get("doc_id", "") for c in chunks} - {""}):
        try:
            pages[doc_id] = store.get_json(keys.doc_pages(tenant, sid, doc_id))
        except NotFound:
            pages[doc_id] = []
    return build_passages(chunks, pages, {d.doc_id: d.name for d in rec.documents})
