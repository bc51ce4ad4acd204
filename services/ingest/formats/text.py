"""Plain text and Markdown: find the encoding (charset-normalizer for legacy code pages), refuse binary
data, normalise to NFC."""

from __future__ import annotations

import codecs
import unicodedata

from services.common.errors import InvalidArgument
from services.ingest.extract import Extracted, single_page

# longest first: the UTF-32-LE mark begins with the UTF-16-LE one
_BOMS = [
    (codecs.BOM_UTF32_LE, "utf-32-le"),
    (codecs.BOM_UTF32_BE, "utf-32-be"),
    (codecs.BOM_UTF8, "utf-8"),
    (codecs.BOM_UTF16_LE, "utf-16-le"),
    (codecs.BOM_UTF16_BE, "utf-16-be"),
]
_ALLOWED_CONTROLS = set("\t\n\r\f\v")
NOT_TEXT = "the file is not text (it looks like binary data)"


def _looks_binary(text: str) -> bool:
    sample = text[:65536]
    if not sample:
        return False
    if "\x00" in sample:
        return True
    controls = sum(1 for c in sample if c not in _ALLOWED_CONTROLS and unicodedata.category(c) == "Cc")
    return controls > max(2, len(sample) // 100)


def _utf16_without_bom(data: bytes) -> str | None:
    """Mostly-ASCII UTF-16 has a NUL in every other byte; that is how it shows without a BOM."""
    sample = data[:4096]
    if len(sample) < 4 or len(sample) % 2:
        return None
    half = len(sample) // 2
    even_nuls, odd_nuls = sample[0::2].count(0), sample[1::2].count(0)
    if odd_nuls > 0.6 * half and even_nuls < 0.1 * half:
        encoding = "utf-16-le"
    elif even_nuls > 0.6 * half and odd_nuls < 0.1 * half:
        encoding = "utf-16-be"
    else:
        return None
    try:
        return data.decode(encoding)
    except UnicodeDecodeError:
        return None


def _legacy_decode(data: bytes) -> str:
    """Bytes that are not UTF-8 in the legacy encoding charset-normalizer finds most plausible.

    Ties (short or plain Western text fits several code pages equally well) go to the likelier
    language, then to cp1252 (Windows "ANSI", the usual encoding of such text), then to the Windows
    code pages. BOM-less UTF-16/32 guesses are left to `_utf16_without_bom`; with no plausible
    encoding at all, cp1252 (latin-1 for the bytes it leaves undefined) decodes what it can.
    """
    from charset_normalizer import from_bytes

    matches = list(from_bytes(data))

    def rank(m) -> tuple:
        return (m.chaos, -m.coherence, m.language == "Unknown", not m.encoding.startswith("cp125"))

    if matches:
        top = rank(min(matches, key=rank))[:2]
        tied = [m for m in matches if rank(m)[:2] == top]
        legacy = [m for m in tied if not m.encoding.startswith(("utf_16", "utf_32"))]
        if legacy and not any("cp1252" in m.could_be_from_charset for m in tied):
            return str(min(legacy, key=rank))
    try:
        return data.decode("cp1252")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def decode_text(data: bytes, charset: str | None = None) -> str:
    """Bytes -> str: a byte-order mark, else `charset` (when it works), else UTF-8, else the legacy
    encoding charset-normalizer detects (cp1252 when the text fits it as well as any other).

    Binary data (NULs, many control characters) is refused rather than decoded into garbage.
    """
    for bom, encoding in _BOMS:
        if data.startswith(bom):
            try:
                text = data[len(bom) :].decode(encoding)
            except UnicodeDecodeError:
                raise InvalidArgument(
                    f"the text starts with a {encoding} byte-order mark but is not valid {encoding}"
                ) from None
            if _looks_binary(text):
                raise InvalidArgument(NOT_TEXT)
            return text
    candidates: list[str] = []
    if charset:
        try:
            codecs.lookup(charset)
            candidates.append(charset)
        except LookupError:
            pass
    candidates.append("utf-8")
    for encoding in candidates:
        try:
            text = data.decode(encoding)
        except UnicodeDecodeError:
            continue
        if not _looks_binary(text):
            return text
        wide = _utf16_without_bom(data)
        if wide is not None and not _looks_binary(wide):
            return wide
        raise InvalidArgument(NOT_TEXT)
    wide = _utf16_without_bom(data)
    if wide is not None and not _looks_binary(wide):
        return wide
    text = _legacy_decode(data)
    if _looks_binary(text):
        raise InvalidArgument(NOT_TEXT)
    return text


def extract(data: bytes) -> Extracted:
    """A text or Markdown file as one page; Markdown keeps its markup (it is already the target form)."""
    text = decode_text(data)
    title = next((line.lstrip("#").strip() for line in text.splitlines() if line.startswith("# ")), None)
    return single_page(text, title=title or None)
