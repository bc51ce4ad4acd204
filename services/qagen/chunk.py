"""Split a document's text into chunks: the source of QA pairs and the retrieval index.

A chunk is a span of the original text (`text[start:end] == chunk.text`), so pairs and citations can
point back into the document. Splitting goes from coarse to fine: Markdown headings make sections,
paragraphs are packed into chunks, a paragraph that is too long is cut between sentences, and a
sentence that is too long between words. A word is cut only when one word alone is longer than a
chunk. Consecutive chunks of one section share a little text (`overlap_chars`), starting at a
sentence boundary when one is close enough to the end, else at a word boundary; chunks never
overlap across sections. Lengths are measured with `length_fn` (characters by default): pass
`token_length(tokenizer)` and every size (`max_chars`, `overlap_chars`) is counted in the base
model's tokens instead. Given the document's page map (`pages.json`), each chunk names the pages it
spans.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from services.common.sentences import BLOCK_START, split_sentences, strip_span

LengthFn = Callable[[str], int]


def token_length(tokenizer: Any) -> LengthFn:
    """A `length_fn` counting `tokenizer`'s tokens (no special tokens): token-aware chunk sizes."""

    def n_tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    return n_tokens


def _memo(length_fn: LengthFn) -> LengthFn:
    """Packing measures the same slices more than once; a tokenizer is worth not asking twice."""
    if length_fn is len:
        return len
    cache: dict[str, int] = {}

    def measured(text: str) -> int:
        n = cache.get(text)
        if n is None:
            n = cache[text] = length_fn(text)
        return n

    return measured


@dataclass(frozen=True, slots=True)
class Chunk:
    """A span of a document's text, with the nearest Markdown heading above it."""

    chunk_id: str
    doc_id: str
    start: int
    end: int
    text: str
    heading: str | None = None
    # position of the chunk within its section (0 = the section's first chunk)
    part: int = 0
    # how many characters at the start repeat the end of the previous chunk
    overlap: int = 0
    # 1-based page numbers the chunk spans, from the document's page map (empty when unknown)
    pages: tuple[int, ...] = ()

    def to_dict(self) -> dict:
        data = asdict(self)
        data["pages"] = list(self.pages)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> Chunk:
        return cls(
            chunk_id=str(data["chunk_id"]),
            doc_id=str(data["doc_id"]),
            start=int(data["start"]),
            end=int(data["end"]),
            text=str(data["text"]),
            heading=data.get("heading"),
            part=int(data.get("part", 0)),
            overlap=int(data.get("overlap", 0)),
            pages=tuple(int(p) for p in data.get("pages") or ()),
        )


def chunk_id_for(doc_id: str, start: int, end: int) -> str:
    """A stable id from the document and the span: the same text chunks to the same ids."""
    return hashlib.sha1(f"{doc_id}:{start}:{end}".encode()).hexdigest()[:16]


# --- sentences: services/common/sentences.py --------------------------------------------------

# --- sections and paragraphs -------------------------------------------------------------------

_ATX = re.compile(r" {0,3}(#{1,6})[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*$")
_ATX_EMPTY = re.compile(r" {0,3}#{1,6}[ \t]*$")
_SETEXT = re.compile(r" {0,3}(=+|-+)[ \t]*$")
_FENCE = re.compile(r" {0,3}(```|~~~)")
_LIST_ITEM = re.compile(BLOCK_START)


@dataclass(frozen=True, slots=True)
class _Section:
    heading: str | None
    start: int  # body start, after the heading line
    end: int


def _lines(text: str, start: int, end: int) -> Iterator[tuple[int, int]]:
    """`(start, end)` of each line, the newline included in `end`."""
    pos = start
    while pos < end:
        nl = text.find("\n", pos, end)
        stop = end if nl == -1 else nl + 1
        yield pos, stop
        pos = stop


def _clean_heading(raw: str) -> str:
    return raw.strip().strip("*_").strip()


def _sections(text: str) -> list[_Section]:
    """Sections split at ATX (`# Title`) and setext (`Title` / `=====`) headings outside code fences."""
    headings: list[tuple[int, int, str]] = []  # (line start, line end, heading text)
    fence: str | None = None
    prev: tuple[int, int] | None = None  # the previous line, if it could be a setext heading's text
    prev_blank = True
    for ls, le in _lines(text, 0, len(text)):
        line = text[ls:le].rstrip("\n")
        fm = _FENCE.match(line)
        if fence is not None:
            if fm and fm.group(1) == fence:
                fence = None
            prev, prev_blank = None, False
            continue
        if fm:
            fence = fm.group(1)
            prev, prev_blank = None, False
            continue
        atx = _ATX.match(line)
        if atx and not _ATX_EMPTY.match(line):
            headings.append((ls, le, _clean_heading(atx.group(2))))
            prev, prev_blank = None, False
            continue
        if prev is not None and _SETEXT.match(line):
            ps, _ = prev
            headings.append((ps, le, _clean_heading(text[ps:ls])))
            prev, prev_blank = None, False
            continue
        blank = not line.strip()
        # only a one-line paragraph can be a setext heading's text (keeps "---" under prose a rule)
        prev = (ls, le) if (not blank and prev_blank and not _LIST_ITEM.match(line)) else None
        prev_blank = blank
    sections: list[_Section] = []
    first = headings[0][0] if headings else len(text)
    if first > 0:
        sections.append(_Section(None, 0, first))
    for i, (_, le, title) in enumerate(headings):
        nxt = headings[i + 1][0] if i + 1 < len(headings) else len(text)
        sections.append(_Section(title or None, le, nxt))
    return sections


def _paragraphs(text: str, start: int, end: int) -> list[tuple[int, int]]:
    """Paragraph spans in `text[start:end]`: split at blank lines, a code fence kept whole."""
    spans: list[tuple[int, int]] = []
    para_start: int | None = None
    fence: str | None = None
    for ls, le in _lines(text, start, end):
        line = text[ls:le]
        fm = _FENCE.match(line)
        if fence is not None:
            if fm and fm.group(1) == fence:
                fence = None
            continue
        if fm:
            fence = fm.group(1)
        if not line.strip():
            if para_start is not None:
                _trimmed(spans, text, para_start, ls)
                para_start = None
            continue
        if para_start is None:
            para_start = ls
    if para_start is not None:
        _trimmed(spans, text, para_start, end)
    return spans


def _trimmed(spans: list[tuple[int, int]], text: str, start: int, end: int) -> None:
    start, end = strip_span(text, start, end)
    if start < end:
        spans.append((start, end))


# --- units and packing -------------------------------------------------------------------------


def _word_pieces(text: str, start: int, end: int, max_len: int, length_fn: LengthFn) -> list[tuple[int, int]]:
    """Cut a too-long span between words; a single word longer than `max_len` is cut inside."""
    pieces: list[tuple[int, int]] = []
    cur: tuple[int, int] | None = None
    for m in re.finditer(r"\S+", text[start:end]):
        ws, we = start + m.start(), start + m.end()
        if cur is not None and length_fn(text[cur[0] : we]) <= max_len:
            cur = (cur[0], we)
            continue
        if cur is not None:
            pieces.append(cur)
        cur = None
        while length_fn(text[ws:we]) > max_len:
            cut = ws + max(1, min(we - ws - 1, max_len))
            while cut > ws + 1 and length_fn(text[ws:cut]) > max_len:
                cut = ws + max(1, (cut - ws) * 9 // 10)
            pieces.append((ws, cut))
            ws = cut
        cur = (ws, we)
    if cur is not None:
        pieces.append(cur)
    return pieces


def _units(text: str, sec: _Section, max_len: int, length_fn: LengthFn) -> list[tuple[int, int]]:
    """The pieces chunks are packed from: paragraphs, or the sentences or word runs of long ones."""
    units: list[tuple[int, int]] = []
    for ps, pe in _paragraphs(text, sec.start, sec.end):
        if length_fn(text[ps:pe]) <= max_len:
            units.append((ps, pe))
            continue
        for ss, se in _sentence_pieces(text, ps, pe):
            if length_fn(text[ss:se]) <= max_len:
                units.append((ss, se))
            else:
                units.extend(_word_pieces(text, ss, se, max_len, length_fn))
    return units


def _sentence_pieces(text: str, start: int, end: int) -> list[tuple[int, int]]:
    """Sentence spans that together cover `text[start:end]` (list markers kept with their item)."""
    spans = split_sentences(text, start, end)
    if not spans:
        return [(start, end)]
    # extend each sentence back to the end of the previous one, so a list marker stays in the chunk
    covered: list[tuple[int, int]] = []
    prev_end = start
    for ss, se in spans:
        s = prev_end
        while s < ss and text[s].isspace():
            s += 1
        covered.append((s, se))
        prev_end = se
    return covered


def _overlap_start(
    text: str, start: int, end: int, next_end: int, overlap: int, max_len: int, length_fn: LengthFn
) -> int | None:
    """Where the next chunk starts inside `text[start:end]`, repeating at most `overlap` of it and
    leaving room for the next unit (which ends at `next_end`).

    The earliest sentence start that fits, else the earliest word start that fits; None if none does.
    """
    if overlap <= 0:
        return None

    def fits(p: int) -> bool:
        return length_fn(text[p:end]) <= overlap and length_fn(text[p:next_end]) <= max_len

    for ss, _ in split_sentences(text, start, end):
        if ss > start and fits(ss):
            return ss
    starts = [start + m.start() for m in re.finditer(r"(?<=\s)\S", text[start:end])]
    lo, hi = 0, len(starts)
    while lo < hi:  # both lengths shrink as the start moves right: find the first start that fits
        mid = (lo + hi) // 2
        if fits(starts[mid]):
            hi = mid
        else:
            lo = mid + 1
    return starts[lo] if lo < len(starts) else None


def _pack(
    text: str, units: list[tuple[int, int]], max_len: int, overlap: int, length_fn: LengthFn
) -> list[tuple[int, int]]:
    spans: list[tuple[int, int]] = []
    i = 0
    start = units[0][0] if units else 0
    while i < len(units):
        end = units[i][1]
        j = i + 1
        while j < len(units) and length_fn(text[start : units[j][1]]) <= max_len:
            end = units[j][1]
            j += 1
        spans.append((start, end))
        if j >= len(units):
            break
        ov = _overlap_start(text, start, end, units[j][1], overlap, max_len, length_fn)
        start = ov if ov is not None else units[j][0]
        i = j
    return spans


def pages_of(pages: Sequence[dict], start: int, end: int) -> tuple[int, ...]:
    """The page numbers whose `{"page", "start", "end"}` span overlaps `[start, end)`."""
    return tuple(sorted({int(p["page"]) for p in pages if int(p["start"]) < end and start < int(p["end"])}))


def chunk_text(
    text: str,
    *,
    doc_id: str,
    max_chars: int = 1200,
    overlap_chars: int = 150,
    length_fn: LengthFn = len,
    pages: Sequence[dict] | None = None,
) -> list[Chunk]:
    """Split `text` into chunks of at most `max_chars` (as measured by `length_fn`), in text order.

    Both sizes are in `length_fn`'s unit: characters by default, tokens with `token_length(tok)`.
    Each chunk's `text` is `text[start:end]`; its `heading` is the nearest Markdown heading above it
    (heading lines themselves are not part of any chunk); with `pages` (the document's page map:
    `[{"page": 1, "start": 0, "end": 1234}, ...]`) it lists the pages it spans. Deterministic: the
    same input gives the same chunks and ids.
    """
    if max_chars <= 0:
        raise ValueError("max_chars must be positive")
    if not 0 <= overlap_chars < max_chars:
        raise ValueError("overlap_chars must be at least 0 and less than max_chars")
    length_fn = _memo(length_fn)
    chunks: list[Chunk] = []
    for sec in _sections(text):
        units = _units(text, sec, max_chars, length_fn)
        prev_end: int | None = None
        for part, (start, end) in enumerate(_pack(text, units, max_chars, overlap_chars, length_fn)):
            chunks.append(
                Chunk(
                    chunk_id=chunk_id_for(doc_id, start, end),
                    doc_id=doc_id,
                    start=start,
                    end=end,
                    text=text[start:end],
                    heading=sec.heading,
                    part=part,
                    overlap=max(0, prev_end - start) if prev_end is not None else 0,
                    pages=pages_of(pages, start, end) if pages else (),
                )
            )
            prev_end = end
    return chunks
