"""Sentences: where a text's sentences start and end. QA generation cuts chunks and picks answers by
them (services/qagen), chat picks the sentences that answer a question from its passages
(services/common/evidence.py).
"""

from __future__ import annotations

import re

# A line that starts a new block even without a blank line before it: list item, quote, table, fence.
BLOCK_START = r"[ \t]*(?:[-*+•][ \t]|\d{1,3}[.)][ \t]|>|\||```|~~~)"
_BLOCK_BREAK = re.compile(r"\n[ \t]*\n\s*|\n(?=" + BLOCK_START + ")")
_SENTENCE_END = re.compile(r"[.!?…]([\"'”’)\]]*)\s+")
_LEADING_MARKER = re.compile(r"(?:[-*+•][ \t]+|\d{1,3}[.)][ \t]+|>[ \t]?)")
_ABBREVIATIONS = frozenset(
    """mr mrs ms dr prof sr jr st mt no nos vs etc fig figs inc ltd co corp dept est approx ca cf
    vol vols pp ch sec eq gen col lt sgt capt cmdr rev hon jan feb mar apr jun jul aug sep sept oct
    nov dec""".split()
)


def _is_abbreviation(text: str, dot: int) -> bool:
    """Whether the word ending at `text[dot] == "."` is an abbreviation or an initial, not a sentence end."""
    begin = dot
    while begin > 0 and not text[begin - 1].isspace() and text[begin - 1] not in "([\"'“‘":
        begin -= 1
    word = text[begin:dot]
    if not word:
        return False
    if len(word) == 1 and word.isalpha():  # an initial: "J. R. Smith"
        return True
    if "." in word:  # "e.g", "U.S"
        return True
    return word.lower() in _ABBREVIATIONS


def strip_span(text: str, start: int, end: int) -> tuple[int, int]:
    """`(start, end)` moved inwards past white space at both ends (start == end: only spaces)."""
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


def _add_span(spans: list[tuple[int, int]], text: str, start: int, end: int) -> None:
    start, end = strip_span(text, start, end)
    # list and quote markers are layout, not part of the sentence
    while start < end:
        m = _LEADING_MARKER.match(text, start, end)
        if not m or m.end() == start:
            break
        start = m.end()
        while start < end and text[start].isspace():
            start += 1
    if start < end:
        spans.append((start, end))


def split_sentences(text: str, start: int = 0, end: int | None = None) -> list[tuple[int, int]]:
    """Sentence spans `(start, end)` in `text[start:end]`, trimmed of spaces and list/quote markers.

    Blank lines and new list items, quotes, table rows and fences always end a sentence; `.`, `!`, `?`
    end one when followed by space and a word that does not start in lower case, unless the word before
    the dot is an abbreviation or an initial.
    """
    end = len(text) if end is None else end
    spans: list[tuple[int, int]] = []
    block_start = start
    breaks = [(m.start(), m.end()) for m in _BLOCK_BREAK.finditer(text, start, end)]
    for block_end, next_start in [*breaks, (end, end)]:
        pos = block_start
        for m in _SENTENCE_END.finditer(text, block_start, block_end):
            after = m.end()
            if after < block_end and text[after].islower():
                continue
            if text[m.start()] == "." and _is_abbreviation(text, m.start()):
                continue
            _add_span(spans, text, pos, m.start() + 1 + len(m.group(1)))
            pos = after
        _add_span(spans, text, pos, block_end)
        block_start = next_start
    return spans
