"""The `metadata` strategy: the title, authors and date a document's first lines state."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from services.common.qapair import QAPair
from services.qagen.chunk import Chunk
from services.qagen.rules.base import pair_for
from services.qagen.text import AUTHOR_LINE, DATE_LINE, NAME_LIST, lower_first

_METADATA_LINES = 12


def _metadata_lines(chunk: Chunk) -> Iterator[str]:
    for line in chunk.text.splitlines()[:_METADATA_LINES]:
        line = line.strip().strip("*_").strip()
        if line:
            yield line


def metadata_pairs(chunks: Sequence[Chunk], title: str | None) -> list[QAPair]:
    """Title, authors and date, when the document's first lines state them."""
    first = [c for c in chunks[:2] if c.start < 600]
    if not first:
        return []
    about = lower_first(title) if title else "the document"
    pairs: list[QAPair] = []
    lead = first[0]
    if lead.heading and lead.part == 0 and lead.start < 300:
        pairs.append(pair_for(lead, "What is the title of the document?", lead.heading, "metadata"))
    got_authors = got_date = False
    for chunk in first:
        for line in _metadata_lines(chunk):
            if not got_authors and (m := AUTHOR_LINE.fullmatch(line)):
                names = m.group("names").strip()
                if NAME_LIST.fullmatch(names):
                    pairs.append(pair_for(chunk, f"Who wrote {about}?", names, "metadata"))
                    got_authors = True
            if not got_date and (m := DATE_LINE.fullmatch(line)):
                kind = (m.group("kind") or "").lower()
                verb = "last updated" if ("updated" in kind or "revised" in kind) else "published"
                pairs.append(pair_for(chunk, f"When was {about} {verb}?", m.group("date"), "metadata"))
                got_date = True
    return pairs
