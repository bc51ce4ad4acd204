"""Grounding: a BM25 index over a bot's chunks, so answers can read the passages they need and cite
them (document, page, span). Built from the session's `chunks.jsonl` and each document's
`pages.json` on first use, then kept in a small LRU."""

from __future__ import annotations

import bisect
import math
import re
from collections import Counter, OrderedDict
from dataclasses import dataclass

_WORD = re.compile(r"\w+", re.UNICODE)
# Words too common to say anything about relevance (English; other languages rank by IDF alone).
STOPWORDS = frozenset(
    "a an and are as at be by for from has have how in is it its of on or that the this to was were what "
    "when where which who why will with do does did can you your i me my we our they their".split()
)


def tokens(text: str) -> list[str]:
    return [w for w in _WORD.findall(text.lower()) if w not in STOPWORDS]


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
    """Okapi BM25 over passages; `search` returns the best hits with a positive score."""

    def __init__(self, passages: list[Passage], k1: float = 1.5, b: float = 0.75):
        self.passages = passages
        self.k1, self.b = k1, b
        self.tf = [Counter(tokens(p.text)) for p in passages]
        self.len = [sum(tf.values()) for tf in self.tf]
        self.avg = (sum(self.len) / len(self.len)) if self.len else 0.0
        df: Counter = Counter()
        for tf in self.tf:
            df.update(tf.keys())
        n = len(passages)
        self.idf = {w: math.log(1 + (n - d + 0.5) / (d + 0.5)) for w, d in df.items()}

    def search(self, query: str, k: int = 3) -> list[Hit]:
        q = set(tokens(query))
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
        return [Hit(self.passages[i], s) for s, i in scored[:k]]


def page_of(pages: list[dict], offset: int) -> int:
    """The 1-based page whose span holds `offset` (pages.json is sorted by start)."""
    if not pages:
        return 1
    starts = [p["start"] for p in pages]
    i = max(0, bisect.bisect_right(starts, offset) - 1)
    return int(pages[i].get("page", i + 1))


def build_passages(chunks: list[dict], pages_by_doc: dict[str, list[dict]], names: dict[str, str]) -> list[Passage]:
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


def with_passages(question: str, hits: list[Hit], max_chars: int = 700) -> str:
    """The user turn with numbered passages before the question."""
    if not hits:
        return question
    lines = ["Passages from the documents:"]
    for i, h in enumerate(hits, 1):
        text = " ".join(h.passage.text.split())
        if len(text) > max_chars:
            text = text[:max_chars].rsplit(" ", 1)[0] + " …"
        lines.append(f"[{i}] ({h.passage.doc_name}, p. {h.passage.page}) {text}")
    lines += ["", f"Question: {question}"]
    return "\n".join(lines)


class IndexCache:
    """A few BM25 indexes by key (session id), least recently used dropped first."""

    def __init__(self, capacity: int = 16):
        self.capacity = capacity
        self._items: OrderedDict[str, BM25] = OrderedDict()

    def get(self, key: str) -> BM25 | None:
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        return None

    def put(self, key: str, index: BM25) -> None:
        self._items[key] = index
        self._items.move_to_end(key)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)
