"""Keep what is not a document's content out of its chunks: reference lists, author blocks, figure
axis text and page furniture.

Chunks are both what QA pairs are generated from and the passages chat retrieves and reads. A
reference list teaches the bot "Who is Machine Learning?", and an axis dump ("0K 32K 64K 96K 128K")
fills a passage without saying anything. `noise_spans` finds such lines by their shape alone
(deterministic, no model); `mask_noise` blanks them to whitespace of the same length, so chunking
the masked text gives spans that are still offsets into the original; `chunk_clean` does that and
cuts any chunk that straddles a blanked region, so a chunk's text is always the original's slice and
never holds noise. The stored document text is never changed: a person still sees all of it.

The rules lean towards keeping text: a table row with words, a sentence that cites "[3]", a figure
caption or a numbered step stays; only lines that carry nothing to ask or answer about go.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import replace

from services.qagen.chunk import Chunk, chunk_id_for, pages_of

log = logging.getLogger(__name__)

KINDS = ("references", "authors", "figure", "furniture")
# authors are looked for only in a paper's or report's front matter, never in its body
FRONT_MATTER_CHARS = 3000

_YEAR = re.compile(r"(?<![\d.])(?:1[89]|20)\d\d[a-z]?(?![\d.]\d)")
_ATX = re.compile(r" {0,3}#{1,6}\s")
_FENCE = re.compile(r" {0,3}(?:```|~~~)")
_NUMBERED = r"(?:(?:\d{1,2}(?:\.\d{1,2})*|[IVX]{1,4})\.?\s+)?"
_REF_HEADING = re.compile(_NUMBERED + r"(?:references?|bibliography|(?:works|literature)\s+cited)", re.I)
_APPENDIX = re.compile(_NUMBERED + r"(?:appendix|appendices|supplement\w*|acknowledge?ments?)\b.{0,80}", re.I)
# "A Proofs", "B.2 Additional results": how appendices after a reference list are usually headed
_LETTERED = re.compile(r"[A-H](?:\.\d{1,2})*\.?\s+[A-Z][\w-]*(?:\s+[\w-]+){0,9}")
_ENTRY = re.compile(r"\s*(?:\[\d{1,3}\]|\(\d{1,3}\)|\d{1,3}\.)\s+\S|\s*[A-Z][\w'’-]+,\s+(?:[A-Z]\.\s?)+")
_AUTHORISH = re.compile(r"\b[A-Z]\.\s?(?:[A-Z]\.\s?)*[A-Z][\w'’-]+|\b[A-Z][\w'’-]+,\s+[A-Z]\.|\bet\s+al\b")
_VENUE = re.compile(
    r"\b(?:Proc\w*|Journal|Conference|Workshop|Symposium|Transactions|arXiv|doi|pp\.|vol\.)", re.I
)
_FRONT_END = re.compile(r"abstract\b.*|(?:[\dI]\.?\s*)?(?:introduction|(?:executive\s+)?summary)", re.I)
_EMAIL = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")
_AFFILIATION = re.compile(
    r"\b(?:Universit\w*|Institut\w*|Department|Dept\.|Laborator(?:y|ies)|Polytechnic\w*|College|"
    r"School\s+of|Faculty\s+of|Cent(?:er|re)\s+for|Academy|Inc\.|Ltd\b|GmbH|LLC|Corporation)(?!\w)"
)
_FOOTNOTE = re.compile(r"[*†‡\d\s]*(?:equal\s+contribution|corresponding\s+author|work\s+done\s+)", re.I)
_SUP = r"\d*†‡§¹²³⁴⁵⁶⁷⁸⁹⁰"  # affiliation markers after a name: 1,2 or * or ¹
_MARKER = re.compile(rf"\(\d{{1,2}}(?:\s*,\s*\d{{1,2}})*\)|(?<=[^\W\d_])[{_SUP}]+(?:,[{_SUP}]+)*")
_NAME = re.compile(r"[A-ZÀ-Þ][\w'’.-]*(?:\s+(?:[A-ZÀ-Þ][\w'’.-]*|van|von|de[nrl]?|d[aiu]|l[ae])){1,3}")
_BYLINE = re.compile(r"(?:by|authors?|written|prepared|compiled|date|published)\b", re.I)
_NUMBER = re.compile(r"[-+−]?[$€£]?(\d+(?:[.,:]\d+)*)([A-Za-zµ%$€£×]{0,3})")
_SCALE = {"k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9, "B": 1e9, "T": 1e12}
_SECTION_NUMBER = re.compile(r"\d{1,2}(?:\.\d{1,2})*\.?\s+[A-Z]")
# "Page 3 of 13", "- 3 -", the arXiv stamp in a preprint's margin, and a comment no reader sees
_PAGE_LABEL = re.compile(
    r"(?:page|p\.|pg\.?)\s*\d{1,4}(?:\s*(?:of|/)\s*\d{1,4})?|[-–—]\s*\d{1,4}\s*[-–—]|<!--.*-->"
    r"|arXiv:\d{4}\.\d{4,5}(?:v\d+)?\s*\[[\w.-]+\]\s*\d{1,2}\s*\w{3}\s*\d{4}",
    re.I,
)


def _bare(line: str) -> str:
    """A line without Markdown heading marks, emphasis and a trailing colon."""
    return line.strip().lstrip("#").strip().strip("*_").rstrip(":").strip()


def _value(token: str) -> float | None:
    if not (m := _NUMBER.fullmatch(token)):
        return None
    digits, unit = m.groups()
    if ":" in digits:  # a clock time: 06:00
        h, _, rest = digits.partition(":")
        return int(h) * 60 + float(rest.replace(":", ".").replace(",", ""))
    digits = digits.replace(",", "") if re.search(r",\d{3}(?!\d)", digits) else digits.replace(",", ".")
    try:
        return float(digits) * _SCALE.get(unit[:1], 1.0)
    except ValueError:
        return None


def _is_ticks(line: str) -> bool:
    """An axis: at least 4 numbers (units allowed: 32K, 0.4$, 10%), few words, in a monotonic run."""
    tokens = line.split()
    values = [v for v in map(_value, tokens) if v is not None]
    steps = [b - a for a, b in zip(values, values[1:], strict=False)]
    monotonic = all(s > 0 for s in steps) or all(s < 0 for s in steps)
    return len(values) >= 4 and len(values) >= 0.75 * len(tokens) and monotonic


def _is_label(line: str, upwards: bool) -> bool:
    """A short axis title or legend next to tick lines: "Latency (ms)", "Tidewell FixedFwd"."""
    s, words = line.strip(), line.split()
    if len(s) > 60 or len(words) > 6 or s[-1] in ".!?:;," or _ATX.match(line) or _SECTION_NUMBER.match(s):
        return False
    if sum(_value(w) is not None for w in words) > 1 or re.match(r"fig\.|figure|table|[-*+•|]\s", s, re.I):
        return False
    # above the ticks a lower-case line ends a caption, and "Example 5" heads what the figure shows
    return not (upwards and (s[0].islower() or _value(words[-1]) is not None))


def _is_author(line: str) -> bool:
    s = line.strip()
    if not s or len(s) > 300:
        return False
    if _EMAIL.search(s) or _FOOTNOTE.match(s):
        return True
    if _BYLINE.match(s):  # "By Jane Doe" is left to the metadata strategy, which asks about it
        return False
    if _AFFILIATION.search(s) and len(s) <= 200:
        return True
    bare, marked = _MARKER.subn("", s)
    parts = [p.strip() for p in re.split(r"\s*(?:,|;|&|\band\b)\s*", bare) if p.strip()]
    return bool(parts) and all(_NAME.fullmatch(p) for p in parts) and (len(parts) >= 3 or marked > 0)


def _entry(body: list[str], i: int, protected: list[bool]) -> tuple[int, int, bool]:
    """`(first, last, is_citation)` of the list entry at line `i`, which runs on over at most 3 lines
    until it has shown its year; `(i, i, False)` when no entry starts there."""
    if protected[i] or not _ENTRY.match(body[i]):
        return i, i, False
    j, text = i, body[i]
    while not _YEAR.search(text) and j + 1 < len(body) and j - i < 3:
        if not body[j + 1].strip() or _ENTRY.match(body[j + 1]) or protected[j + 1]:
            break
        j, text = j + 1, f"{text} {body[j + 1]}"
    return i, j, bool(_YEAR.search(text) and _AUTHORISH.search(text))


def _ends_references(line: str) -> bool:
    """Whether a line inside a reference list heads what follows it: any other Markdown heading, an
    appendix, acknowledgements, a lettered section."""
    if _ATX.match(line):
        return not _REF_HEADING.fullmatch(_bare(line))
    return bool(
        _APPENDIX.fullmatch(_bare(line)) or (_LETTERED.fullmatch(line.strip()) and not _YEAR.search(line))
    )


def _furniture_key(s: str) -> str | None:
    """What a running header repeats; None for a line shaped like content: a sentence or a piece of
    one, a caption, a list item, a table row (numbers with few words), a two-word phrase."""
    if len(s) > 80 or s[0].islower() or s[-1] in ".!?:;," or re.search(r"[.!?]\s", s) or _ATX.match(s):
        return None
    if re.match(r"[-*+•>]\s|\d{1,3}[.)]\s|(?:fig\.|figure|table|abb\.|abbildung|tabelle)\b", s, re.I):
        return None
    tokens = s.split()
    words = sum(1 for t in tokens if re.search(r"[^\W\d_]{2,}", t))
    numbers = sum(1 for t in tokens if re.fullmatch(r"[\d.,%]+", t))
    if words < 2 or numbers > 1 or (len(tokens) < 3 and not re.search(r"[—–|·:/-]", s)):
        return None
    return " ".join(s.lower().split())


def noise_spans(text: str) -> list[tuple[int, int, str]]:
    """Character spans `(start, end, kind)` of noise in `text`, whole lines, in order; kinds as in
    `KINDS`. Code blocks and Markdown table rows are never noise, except inside a reference list."""
    body = text.split("\n")
    n, starts, fenced = len(body), [0], False
    for line in body:
        starts.append(starts[-1] + len(line) + 1)
    kinds: list[str | None] = [None] * n
    protected = [False] * n
    for i, line in enumerate(body):
        fence = _FENCE.match(line) is not None
        fenced ^= fence
        protected[i] = fenced or fence or line.lstrip().startswith("|")

    _mark_references(body, kinds, protected)
    _mark_authors(body, kinds, starts)
    _mark_figures(body, kinds, protected)
    _mark_furniture(body, kinds, protected, starts)

    spans: list[tuple[int, int, str]] = []
    for i, kind in enumerate(kinds):
        s, e = starts[i], starts[i] + len(body[i])
        if kind and spans and spans[-1][2] == kind and not text[spans[-1][1] : s].strip():
            spans[-1] = (spans[-1][0], e, kind)
        elif kind:
            spans.append((s, e, kind))
    return spans


def _mark_references(body: list[str], kinds: list[str | None], protected: list[bool]) -> None:
    """Mark reference lists in `kinds`: under a references heading, and runs of citation entries."""
    n = len(body)
    # references: a heading up to an appendix (or the end), when what follows reads as citations
    for i in [k for k, line in enumerate(body) if _REF_HEADING.fullmatch(_bare(line))]:
        j = i + 1
        while j < n and not _ends_references(body[j]):
            j += 1
        entries = [line for line in body[i + 1 : j] if line.strip()]
        citing = [
            line for line in entries if _YEAR.search(line) or _AUTHORISH.search(line) or _VENUE.search(line)
        ]
        if sum(1 for line in entries if _YEAR.search(line)) >= 2 and len(citing) >= 0.5 * len(entries):
            kinds[i:j] = ["references"] * (j - i)

    # citation entries without a heading: runs of at least 3 in a row (blank lines between allowed)
    run: list[tuple[int, int, bool]] = []
    i = 0
    while i <= n:
        entry = _entry(body, i, protected) if i < n and kinds[i] is None else (i, i, False)
        if entry[2]:
            run.append(entry)
        elif i == n or body[i].strip():
            for first, last, _ in run if len(run) >= 3 else ():
                kinds[first : last + 1] = ["references"] * (last + 1 - first)
            run = []
        i = entry[1] + 1


def _mark_authors(body: list[str], kinds: list[str | None], starts: list[int]) -> None:
    """Mark author lines of the front matter in `kinds`."""
    n = len(body)
    # authors: in the front matter, before the abstract or introduction, never the title line
    title = next((k for k, line in enumerate(body) if line.strip()), n)
    front = next((k for k, line in enumerate(body) if k > title and _FRONT_END.fullmatch(_bare(line))), 0)
    zone = [
        k
        for k in range(title + 1, front)
        if body[k].strip() and starts[k] < FRONT_MATTER_CHARS and not _ATX.match(body[k])
    ]
    marks = {k for k in zone if _is_author(body[k])}
    # a short line between two author lines is a wrapped affiliation or name list
    marks |= {
        b for a, b, c in zip(zone, zone[1:], zone[2:], strict=False) if {a, c} <= marks and len(body[b]) <= 80
    }
    for k in marks:
        kinds[k] = kinds[k] or "authors"


def _mark_figures(body: list[str], kinds: list[str | None], protected: list[bool]) -> None:
    """Mark figure text in `kinds`: axis tick lines and the labels next to them."""
    n = len(body)
    # figure text: axis tick lines, and the short labels and legends next to them
    for i in [k for k in range(n) if not protected[k] and kinds[k] is None and _is_ticks(body[k])]:
        kinds[i] = "figure"
        for step, limit in ((1, 4), (-1, 1)):
            k, taken = i + step, 0
            while 0 <= k < n and taken < limit and kinds[k] in (None, "figure") and not protected[k]:
                if body[k].strip() and not (_is_ticks(body[k]) or _is_label(body[k], step < 0)):
                    break
                if body[k].strip() and kinds[k] is None:
                    kinds[k], taken = "figure", taken + 1
                k += step


def _mark_furniture(
    body: list[str], kinds: list[str | None], protected: list[bool], starts: list[int]
) -> None:
    """Mark page furniture in `kinds`: page labels and short lines repeated down the document."""
    # furniture: page labels, and short lines repeated down the document (running headers) that the
    # PDF extractor did not recognise as such (or text that came from elsewhere)
    repeats: dict[str, list[int]] = {}
    for i, line in enumerate(body):
        if kinds[i] or protected[i] or not line.strip():
            continue
        if _PAGE_LABEL.fullmatch(line.strip()):
            kinds[i] = "furniture"
        elif key := _furniture_key(line.strip()):
            repeats.setdefault(key, []).append(i)
    for found in repeats.values():
        if len(found) >= 3 and starts[found[-1]] - starts[found[0]] >= 500 * (len(found) - 1):
            for i in found:
                kinds[i] = "furniture"


def mask_noise(text: str, spans: Sequence[tuple[int, int, str]] | None = None) -> str:
    """`text` with its noise (`noise_spans`, or the given spans) blanked: every character but a
    newline becomes a space, so the length and every offset stay the same."""
    parts, pos = [], 0
    for s, e, _ in noise_spans(text) if spans is None else spans:
        parts += [text[pos:s], re.sub(r"[^\n]", " ", text[s:e])]
        pos = e
    return "".join([*parts, text[pos:]])


def left_out(spans: Sequence[tuple[int, int, str]]) -> dict[str, int]:
    """Characters of each kind of noise in `spans`."""
    counts: Counter[str] = Counter()
    for s, e, kind in spans:
        counts[kind] += e - s
    return {k: counts[k] for k in KINDS if counts[k]}


def chunk_clean(
    text: str, chunker: Callable[[str], list[Chunk]], *, doc_id: str, pages: Sequence[dict] | None = None
) -> list[Chunk]:
    """`chunker`'s chunks of `text` with its noise left out: the masked text is chunked, then each
    chunk is cut at the noise it straddles, so every chunk is `text[start:end]` and holds none."""
    spans = noise_spans(text)
    if not spans:
        return chunker(text)
    log.info(
        "%s: left out of chunks as noise: %s",
        doc_id,
        ", ".join(f"{k} {n} chars" for k, n in left_out(spans).items()),
    )
    out: list[Chunk] = []
    for chunk in chunker(mask_noise(text, spans)):
        # a chunk starts and ends on content, so the noise it meets lies wholly inside it
        cuts = [x for s, e, _ in spans if chunk.start < e and s < chunk.end for x in (s, e)]
        bounds, pieces = [chunk.start, *cuts, chunk.end], 0
        for start, end in zip(bounds[::2], bounds[1::2], strict=True):
            m = re.search(r"\S(?:[\s\S]*\S)?", text[start:end])
            if not m or not any(ch.isalnum() for ch in m.group()):
                continue
            s, e = start + m.start(), start + m.end()
            # the pieces of a cut chunk go on in its section, numbered and overlapping as chunks do
            part = out[-1].part + 1 if chunk.part > 0 or pieces else 0
            pieces += 1
            overlap = max(0, out[-1].end - s) if part else 0
            fields = {"start": s, "end": e, "text": text[s:e], "part": part, "overlap": overlap}
            fields.update(chunk_id=chunk_id_for(doc_id, s, e), pages=pages_of(pages or (), s, e))
            out.append(replace(chunk, **fields))
    return out
