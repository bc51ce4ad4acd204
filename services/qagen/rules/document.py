"""The document strategies `summary`, `section_summary` and `vague` (and the `metadata` pairs of
`metadata.py`): questions about the whole document, answered with its most central sentences."""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import PurePosixPath

from services.common.options import QA_DOCUMENT_STRATEGIES, resolve_strategies
from services.common.qapair import QAPair
from services.qagen.chunk import Chunk
from services.qagen.rules.base import pair_for
from services.qagen.rules.metadata import metadata_pairs
from services.qagen.text import (
    CONTEXT_OPENING,
    MAX_ANSWER_CHARS,
    MIN_ANSWER_CHARS,
    STOPWORDS,
    list_position,
    lower_first,
    prose_sentences,
    words_of,
)

# A document needs this many prose sentences before it is summarised or asked about as a whole.
MIN_DOCUMENT_SENTENCES = 3


@dataclass(frozen=True, slots=True)
class _Placed:
    """A prose sentence of the document, with the chunk it is asked about from."""

    chunk: Chunk
    text: str
    order: int
    section: int
    first_in_section: bool
    list_position: int = 0  # `text.list_position`: 0 paragraph, 1 a list item's first sentence, 2 later
    spans_lines: bool = False  # list items without a full stop run together into one "sentence"


def _document_sentences(chunks: Sequence[Chunk]) -> list[_Placed]:
    out: list[_Placed] = []
    section = -1
    for chunk in chunks:
        if chunk.part == 0:
            section += 1
        first = chunk.part == 0
        for s in prose_sentences(chunk):
            position = list_position(chunk, s)
            spans = position > 0 and "\n" in chunk.text[s.start : s.end].strip()
            out.append(_Placed(chunk, s.text, len(out), section, first, position, spans))
            first = False
    return out


def _content_words(text: str) -> list[str]:
    return [w.lower() for w in words_of(text) if w.lower() not in STOPWORDS and len(w) > 2]


def _scores(sentences: Sequence[_Placed]) -> list[float]:
    """Centrality from word frequencies (sqrt-length normalised), with a bonus for the document's
    first sentence and each section's first: leads tend to say what a text is about."""
    tf = Counter(w for s in sentences for w in set(_content_words(s.text)))
    raw = []
    for s in sentences:
        words = set(_content_words(s.text))
        raw.append(sum(math.log1p(tf[w]) for w in words) / math.sqrt(len(words) + 1))
    top = max(raw, default=1.0) or 1.0
    return [
        r + (0.5 * top if s.order == 0 else 0.25 * top if s.first_in_section else 0.0)
        for r, s in zip(raw, sentences, strict=True)
    ]


def _select(
    sentences: Sequence[_Placed], scores: Sequence[float], budget: int, max_n: int, spread: bool = True
) -> list[_Placed]:
    """The best-scored sentences that fit `budget` characters, not repeating each other, at most one
    per section first (when `spread`), returned in document order."""
    usable = [
        (score, s)
        for score, s in zip(scores, sentences, strict=True)
        if 40 <= len(s.text) <= min(350, budget) and not s.text.endswith("?")
    ]
    ranked = sorted(usable, key=lambda x: (-x[0], x[1].order))
    chosen: list[_Placed] = []
    taken: set[int] = set()
    used = -1
    for pass_ in (0, 1) if spread else (1,):
        for _, s in ranked:
            if len(chosen) >= max_n:
                break
            if s.order in taken or used + 1 + len(s.text) > budget:
                continue
            if pass_ == 0 and any(c.section == s.section for c in chosen):
                continue
            words = set(_content_words(s.text))
            if any(_jaccard(words, set(_content_words(c.text))) > 0.5 for c in chosen):
                continue
            chosen.append(s)
            taken.add(s.order)
            used += 1 + len(s.text)
    return sorted(chosen, key=lambda s: s.order)


def _jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b) if a | b else 0.0


def _answer_pair(question: str, picked: Sequence[_Placed], strategy: str) -> QAPair | None:
    if not picked:
        return None
    answer = " ".join(s.text for s in picked)
    return pair_for(picked[0].chunk, question, answer, strategy, [s.chunk.chunk_id for s in picked])


def clean_title(name: str | None) -> str | None:
    """A title a person would type, from a document name: "annual_report-2021.pdf" -> "annual report
    2021"; None for names that look like ids or are empty."""
    if not name:
        return None
    name = name.strip()
    if "://" in name:
        name = name.split("://", 1)[1].split("?", 1)[0].rstrip("/")
        name = name.rsplit("/", 1)[-1] if "/" in name else name
    stem = PurePosixPath(name).name
    if re.search(r"\.(?:pdf|docx?|txt|md|markdown|html?|rtf|odt|epub|jsonl?|csv)$", stem, re.I):
        stem = stem.rsplit(".", 1)[0]
    title = re.sub(r"[\s_]+", " ", stem.replace("-", " ")).strip()
    letters = sum(c.isalpha() for c in title)
    if letters < 3 or letters < 0.5 * len(title.replace(" ", "")) or len(title) > 120:
        return None
    if not re.search(r"[aeiouy]", title, re.I) or re.fullmatch(r"[0-9a-f ]{8,}", title, re.I):
        return None
    return title


def document_pairs(
    chunks: Sequence[Chunk], *, doc_title: str | None = None, strategies: Iterable[str] | None = None
) -> list[QAPair]:
    """The pairs of the selected document-scope strategies: summaries of the whole document at three
    lengths and one that walks every section, a summary per section, metadata, and the vague
    questions a person knowing only the title would ask."""
    selected = resolve_strategies(strategies)
    if not any(s in selected for s in QA_DOCUMENT_STRATEGIES):
        return []
    sentences = _document_sentences(chunks)
    if len(sentences) < MIN_DOCUMENT_SENTENCES:
        return []  # too little text to say what it is about: nothing to summarise, nothing invented
    scores = _scores(sentences)
    lead = chunks[0]
    title = lead.heading if (lead.heading and lead.part == 0 and lead.start < 300) else clean_title(doc_title)
    title = _short_title(title)
    about = lower_first(title) if title else "the document"
    pairs: list[QAPair | None] = []
    if "summary" in selected:
        pairs += _summaries(sentences, scores, about)
    if "section_summary" in selected:
        pairs += _section_summaries(chunks, sentences, scores, title)
    if "metadata" in selected:
        pairs += metadata_pairs(chunks, title)
    if "vague" in selected:
        pairs += _vague(chunks, sentences, scores, title, about)
    return [p for p in pairs if p is not None]


def _summaries(sentences: Sequence[_Placed], scores: Sequence[float], about: str) -> list[QAPair | None]:
    """The `summary` pairs: the whole document at three lengths, then section by section."""
    pairs = [
        _answer_pair(
            f"Can you summarize {about} in one sentence?", _select(sentences, scores, 250, 1), "summary"
        ),
        _answer_pair(
            f"Can you give a short summary of {about}?", _select(sentences, scores, 450, 3), "summary"
        ),
        _answer_pair(
            f"Can you give a detailed summary of {about}?",
            _select(sentences, scores, MAX_ANSWER_CHARS, 6),
            "summary",
        ),
    ]
    sections = sorted({s.section for s in sentences})
    if len(sections) > 1:
        leads = []
        for sec in sections:
            in_section = [(sc, s) for sc, s in zip(scores, sentences, strict=True) if s.section == sec]
            best = _select([s for _, s in in_section], [sc for sc, _ in in_section], 220, 1, spread=False)
            leads += best
        walk = _fit(sorted(leads, key=lambda s: s.order), MAX_ANSWER_CHARS)
        pairs.append(
            _answer_pair("Can you summarize the whole document, section by section?", walk, "summary")
        )
    return pairs


# A section whose text is less than this share prose (the rest a table) is its table: three quoted
# sentences of it miss what it says.
MIN_SECTION_PROSE_SHARE = 0.5
# A section whose prose is list items for this share or more is a list of points (steps, notes),
# summed up by some of them. One with a smaller share of list items (but some) has a list as part of
# it, usually its core ("Contents of the box", "Your containers at a glance"): some of its items
# are a partial list, its paragraphs without the list miss it; such a section gets no summary.
LIST_SECTION_SHARE = 0.8
_ENDS_SENTENCE = re.compile(r"[.!?…][\"'”’)]*$")
# a sentence that adds to an earlier one: "You can also write to ...", "Residents can also be fined"
_ADDS_TO_EARLIER = re.compile(r"(?:[\w'’-]+\s+){1,3}also\b")


def _summary_sentences(members: Sequence[_Placed], section_chunks: Sequence[Chunk]) -> list[_Placed] | None:
    """The sentences of one section a summary may quote, or None when the section cannot be summed
    up by quoting a few of them (it is mostly a table, a list is part of it, or it is questions and
    answers). Left out: list items run together, a list item's later sentences (which have lost
    the item's label) and lines without a full stop (captions); a sentence that leans on the one before it ("They accept ...", "Otherwise
    ...", "You can also ...") is quoted only together with it, or not at all."""
    text = sum(len(c.text[c.overlap :].strip()) for c in section_chunks)
    prose = sum(len(s.text) for s in members)
    if not text or prose < MIN_SECTION_PROSE_SHARE * text:
        return None
    if 0 < sum(len(s.text) for s in members if s.list_position) < LIST_SECTION_SHARE * prose:
        return None
    if sum(s.text.endswith("?") for s in members) >= 2:
        return None  # questions and answers (an FAQ): each answer leans on its question
    usable: list[_Placed] = []
    for s in members:
        if s.spans_lines or s.list_position == 2 or not _ENDS_SENTENCE.search(s.text):
            continue  # run-together items, an item's later sentence, a caption or heading line
        if CONTEXT_OPENING.match(s.text) or _ADDS_TO_EARLIER.match(s.text):
            # "They accept far more ...": quoted only with the sentence it leans on, as one
            joined = f"{usable[-1].text} {s.text}" if usable else ""
            if usable and usable[-1].order == s.order - 1 and not s.list_position and len(joined) <= 350:
                usable[-1] = replace(usable[-1], text=joined)
            continue
        usable.append(s)
    return usable


def _section_summaries(
    chunks: Sequence[Chunk], sentences: Sequence[_Placed], scores: Sequence[float], title: str | None
) -> list[QAPair | None]:
    """The `section_summary` pairs: one per named section of two or more sentences that can stand
    alone (see `_summary_sentences`)."""
    pairs: list[QAPair | None] = []
    sections: list[list[Chunk]] = []
    for chunk in chunks:  # numbered as `_document_sentences` numbers them
        if chunk.part == 0 or not sections:
            sections.append([])
        sections[-1].append(chunk)
    for sec in sorted({s.section for s in sentences}):
        members = [(sc, s) for sc, s in zip(scores, sentences, strict=True) if s.section == sec]
        heading = _section_name(members[0][1].chunk.heading)
        if not heading or len(members) < 2 or _short_title(heading) == title:
            continue
        usable = _summary_sentences([s for _, s in members], sections[sec])
        if usable is None:
            continue
        by_order = {s.order: s for s in usable}
        members = [(sc, by_order[s.order]) for sc, s in members if s.order in by_order]
        picked = _select([s for _, s in members], [sc for sc, _ in members], 450, 3, spread=False)
        if len(picked) >= 2:
            pairs.append(
                _answer_pair(
                    f"Can you summarize the section on {lower_first(heading)}?",
                    picked,
                    "section_summary",
                )
            )
    return pairs


def _vague(
    chunks: Sequence[Chunk],
    sentences: Sequence[_Placed],
    scores: Sequence[float],
    title: str | None,
    about: str,
) -> list[QAPair | None]:
    """The `vague` pairs: what a person knowing only the title asks, and the topics it covers."""
    pairs = [
        _answer_pair(f"What is {about} about?", _select(sentences, scores, 300, 2), "vague"),
        _answer_pair(f"Can you tell me about {about}?", _select(sentences, scores, 450, 3), "vague"),
        _answer_pair(f"What should I know about {about}?", _select(sentences, scores, 600, 4), "vague"),
    ]
    headings = [c for c in chunks if c.part == 0 and c.heading and _short_title(c.heading) != title]
    names = list(dict.fromkeys(c.heading for c in headings))
    if len(names) >= 2:
        firsts = [next(c for c in headings if c.heading == n) for n in names]
        names = [_section_name(n) for n in names]
        answer = "; ".join(names)
        if len(answer) <= MAX_ANSWER_CHARS and len(answer) >= MIN_ANSWER_CHARS:
            pairs.append(
                pair_for(
                    firsts[0],
                    f"What topics does {about} cover?",
                    answer,
                    "vague",
                    [c.chunk_id for c in firsts],
                )
            )
    return pairs


def _short_title(title: str | None) -> str | None:
    """The title a person would say: no site name after "|", no subtitle after a dash, and no
    subtitle after a colon when the whole is long ("Tidewell: Adaptive Message Batching ... Sites")."""
    if not title:
        return title
    title = re.split(r"\s+[|—–]\s+|\s+-\s+", title)[0].strip()
    if len(title) > 60 and ":" in title:
        title = title.split(":")[0].strip()
    return title or None


def _section_name(heading: str | None) -> str | None:
    """A heading without its number: "5.2 Mounting steps" -> "Mounting steps"."""
    return re.sub(r"^\s*(?:\d+(?:\.\d+)*\.?|[IVX]+\.)\s+", "", heading).strip() if heading else heading


def _fit(sentences: Sequence[_Placed], budget: int) -> list[_Placed]:
    out, used = [], -1
    for s in sentences:
        if used + 1 + len(s.text) <= budget:
            out.append(s)
            used += 1 + len(s.text)
    return out
