"""Turn a source's original bytes into clean text and a page map.

The skeleton handles pasted text; PDF, DOCX and HTML come with the ingest issue.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

from services.common.errors import InvalidArgument


@dataclass
class Extracted:
    text: str
    # [{"page": 1, "start": 0, "end": N}, ...] character offsets into `text`
    pages: list[dict]


_TRAILING_WS = re.compile(r"[ \t]+\n")
_MANY_BLANKS = re.compile(r"\n{3,}")


def normalise_text(text: str) -> str:
    """NFC, one newline style, no trailing spaces, at most one blank line in a row."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    text = text.replace("\x00", "")
    text = _TRAILING_WS.sub("\n", text)
    text = _MANY_BLANKS.sub("\n\n", text)
    return text.strip() + "\n"


def extract_plain(data: bytes) -> Extracted:
    try:
        raw = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise InvalidArgument("the text is not valid UTF-8") from None
    text = normalise_text(raw)
    if not text.strip():
        raise InvalidArgument("the document has no text")
    return Extracted(text=text, pages=[{"page": 1, "start": 0, "end": len(text)}])


def extract(data: bytes, kind: str) -> Extracted:
    if kind == "text":
        return extract_plain(data)
    raise InvalidArgument(f"unsupported source kind {kind!r}")
