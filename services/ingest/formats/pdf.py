"""PDF with pypdf: text in reading order, one page-map entry per page, and the cleaning a reader
would do by eye: hyphenated line breaks joined, running headers/footers and page numbers dropped,
typographic ligatures (ﬁ, ﬂ, ...) spelled out.

Every failure is an `InvalidArgument` a person can act on: password-protected, wrong password,
damaged or truncated, no text layer (a scan), or text that cannot be decoded (fonts without a
Unicode map). Run it in the sandbox: a hostile PDF can make pypdf slow or greedy.
"""

from __future__ import annotations

import io
import logging
import math
import re
import unicodedata
from collections import Counter
from contextlib import contextmanager

from services.common.errors import InvalidArgument
from services.ingest.extract import Extracted, join_pages

MAX_PAGES = 5000
NO_TEXT_LAYER = "this PDF has no text layer (scanned?); OCR is not supported yet"
UNDECODABLE = (
    "the text in this PDF cannot be decoded (its fonts have no Unicode mapping, so it would come "
    "out as garbage); OCR is not supported yet"
)
DAMAGED = "the PDF is damaged or truncated and cannot be read"

_LIGATURES = re.compile("[\ufb00-\ufb06\ufb13-\ufb17]")
# a word broken at a line end: "adip-\niscing"; a soft hyphen (U+00AD) always marks such a break
_HYPHEN_BREAK = re.compile(r"([-\u2010\u00ad])[ \t]*\n[ \t]*(?=([^\W\d_]))")
_PAGE_LABEL = re.compile(
    r"^(?:(?:page|seite|pag\.?|p\.|página|pagina)\s*\d{1,5}(?:\s*(?:of|/|von|de|sur)\s*\d{1,5})?"
    r"|\d{1,5}\s*(?:of|/|von|sur)\s*\d{1,5}"
    r"|[-–—]\s*\d{1,5}\s*[-–—])$",
    re.I,
)
_ROMAN = re.compile(r"^(?=[ivxlc])c{0,3}(?:xc|xl|l?x{0,3})(?:ix|iv|v?i{0,3})$")  # front-matter page numbers
_BARE_NUMBER = re.compile(r"^\d{1,5}$")
_EDGE_NUMBER = re.compile(r"^(?:(\d{1,5})\s+\S.*|.*\S\s+(\d{1,5}))$")
# regexes, not per-character Python loops: these run over every character of big documents
_SPACE = re.compile(r"\s")
_LETTER = re.compile(r"[^\W\d_]")
_BAD = re.compile(r"[\x00-\x08\x0b-\x1f\x7f\ufffd\ue000-\uf8ff]")
# C0 controls other than tab and newline: what pypdf gives for glyphs it cannot map (math signs)
_CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_SAMPLE = 50_000
_ZONE = 3  # lines at the top and at the bottom of a page that may be running headers/footers


@contextmanager
def _quiet_pypdf():
    """pypdf logs a warning for every oddity it repairs; they are noise in our logs."""
    logger = logging.getLogger("pypdf")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _spell_ligatures(text: str) -> str:
    # NFKC on ligature characters only: NFKC of the whole text would also rewrite ², ½, full-width
    # forms and more that carry meaning
    return _LIGATURES.sub(lambda m: unicodedata.normalize("NFKC", m.group()), text)


def _join_hyphenation(text: str) -> str:
    def join(m: re.Match) -> str:
        hyphen, after = m.groups()
        start = m.start()
        if hyphen == "\u00ad" or (start and m.string[start - 1].isalpha() and after.islower()):
            return ""
        return m.group()  # "Anglo-\nSaxon": a real hyphen before a capital

    return _HYPHEN_BREAK.sub(join, text).replace("\u00ad", "")


def _key(line: str) -> str:
    # exact text: headers that differ by a page number are caught by the page-number rules, and
    # "Chapter 1"/"Chapter 2" at the top of consecutive pages is content, not a running header
    return " ".join(line.lower().split())


def _zones(lines: list[str]) -> dict[int, tuple[str, int]]:
    """The non-empty lines at the top and bottom of a page: index -> ("top"|"bottom", rank from the edge)."""
    filled = [i for i, line in enumerate(lines) if line.strip()]
    size = max(1, min(_ZONE, len(filled) // 3))  # a short page is mostly body, not furniture
    zone = {i: ("bottom", rank) for rank, i in enumerate(reversed(filled[-size:]))}
    zone.update({i: ("top", rank) for rank, i in enumerate(filled[:size])})
    return zone


def _roman(text: str) -> int | None:
    if not _ROMAN.match(text):
        return None
    values = {"i": 1, "v": 5, "x": 10, "l": 50, "c": 100}
    total = 0
    for a, b in zip(text, text[1:] + " ", strict=True):
        total += -values[a] if values.get(b, 0) > values[a] else values[a]
    return total


def _page_number(text: str) -> tuple[str, int] | None:
    """("arabic"|"roman", value) for a line that is only a number."""
    if _BARE_NUMBER.match(text):
        return "arabic", int(text)
    value = _roman(text)
    return ("roman", value) if value else None


def _edge_number(line: str) -> int | None:
    """The page number a short header/footer line starts or ends with ("8 1.2. METRIC SPACES")."""
    found = _EDGE_NUMBER.match(line.strip())
    if not found or len(line) > 100:
        return None
    return int(found.group(1) or found.group(2))


def _drop_furniture(pages: list[list[str]]) -> tuple[list[list[str]], int]:
    """Remove running headers/footers and page numbers; return the pages and how many lines went."""
    n = len(pages)
    zones = [_zones(lines) for lines in pages]

    # a running header is the same line (numbers aside) at the same place on many pages; short
    # documents must repeat it on all pages but one (the title page), long ones on 40% (odd/even
    # pages often carry different headers)
    repeated: set[tuple[str, int, str]] = set()
    if n >= 3:
        counts: Counter[tuple[str, int, str]] = Counter()
        for lines, zone in zip(pages, zones, strict=True):
            counts.update(
                {(*where, _key(lines[i])) for i, where in zone.items() if len(lines[i].strip()) <= 150}
            )
        need = max(2, math.ceil(0.4 * n), n - 1 if n <= 6 else 0)
        repeated = {key for key, count in counts.items() if count >= need and key[2]}

    # a number alone is a page number when numbers follow the page index at a fixed offset
    offsets: Counter[tuple[str, int]] = Counter()
    for index, (lines, zone) in enumerate(zip(pages, zones, strict=True), start=1):
        found = {_page_number(lines[i].strip()) for i in zone}
        offsets.update({(kind, value - index) for kind, value in filter(None, found)})
    numbering = {key for key, count in offsets.items() if count >= max(2, math.ceil(0.3 * n))}

    # "8   1.2. METRIC SPACES": a running header that starts or ends with the page number
    headed: Counter[tuple[str, int]] = Counter()
    for index, zone in enumerate(zones, start=1):
        for i, (side, rank) in zone.items():
            value = _edge_number(pages[index - 1][i]) if rank == 0 else None
            if value is not None:
                headed[(side, value - index)] += 1
    running = {key for key, count in headed.items() if count >= max(3, math.ceil(0.3 * n))}

    dropped = 0
    cleaned: list[list[str]] = []
    for index, (lines, zone) in enumerate(zip(pages, zones, strict=True), start=1):
        keep: list[str] = []
        for i, line in enumerate(lines):
            stripped = line.strip()
            number = _page_number(stripped) if i in zone else None
            if i in zone and (
                (*zone[i], _key(stripped)) in repeated
                or (n > 1 and _PAGE_LABEL.match(stripped) and not number)
                or (number and (number[0], number[1] - index) in numbering)
                or (zone[i][1] == 0 and (zone[i][0], (_edge_number(line) or -(10**6)) - index) in running)
            ):
                dropped += 1
                continue
            keep.append(line)
        cleaned.append(keep)
    return cleaned, dropped


def _join_across_pages(texts: list[str]) -> list[str]:
    """A word hyphenated over a page break moves whole onto the first page."""
    for i in range(len(texts) - 1):
        head, tail = texts[i].rstrip(), texts[i + 1].lstrip()
        if len(head) >= 2 and head[-1] in "-\u00ad" and head[-2].isalpha() and tail[:1].islower():
            word, _, rest = tail.partition(" ") if " " in tail.split("\n", 1)[0] else tail.partition("\n")
            texts[i] = head[:-1] + word
            texts[i + 1] = rest
    return texts


def _undecodable(text: str) -> bool:
    """Fonts without a Unicode map come out as punctuation soup or private-use code points."""
    if len(text) > _SAMPLE:
        text = text[:: len(text) // _SAMPLE]  # an even sample of characters: ratios are all we need
    visible = len(text) - len(_SPACE.findall(text))
    if not visible:
        return False
    letters = len(_LETTER.findall(text))
    bad = len(_BAD.findall(text))
    # 0.15: a CJK price table reads ~0.3, prose 0.8+, unmapped glyph codes ~0
    return letters / visible < 0.15 or bad / visible > 0.3


def _open(data: bytes, password: str | None):
    from pypdf import PdfReader
    from pypdf.errors import DependencyError, FileNotDecryptedError

    if b"%PDF-" not in data[:1024]:
        raise InvalidArgument("the file is not a PDF (no %PDF header)")
    if b"%%EOF" not in data[-2048:]:
        raise InvalidArgument(f"{DAMAGED}: it does not end with %%EOF, so it was probably cut off")
    try:
        reader = PdfReader(io.BytesIO(data), strict=False)
    except MemoryError:
        raise
    except Exception as exc:  # pypdf raises many types on broken input
        raise InvalidArgument(f"{DAMAGED} ({_reason(exc)})") from None
    if reader.is_encrypted:
        try:
            # an owner-password-only PDF opens with the empty user password: no need to ask
            opened = reader.decrypt(password if password is not None else "")
        except DependencyError:
            raise InvalidArgument(
                "the PDF's encryption needs a cryptography library that is not installed"
            ) from None
        except NotImplementedError as exc:
            raise InvalidArgument(
                f"the PDF uses an encryption method that is not supported ({exc})"
            ) from None
        except (FileNotDecryptedError, ValueError, KeyError) as exc:
            raise InvalidArgument(f"{DAMAGED} (its encryption data is broken: {_reason(exc)})") from None
        if not opened:
            if password is None:
                raise InvalidArgument("the PDF is password-protected; give its password to open it")
            raise InvalidArgument("the password for this PDF is wrong")
    return reader


def _reason(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def _title(reader) -> str | None:
    try:
        title = reader.metadata.title if reader.metadata else None
    except Exception:
        return None
    if (
        isinstance(title, str)
        and title.strip()
        and not title.lower().startswith(("microsoft word", "untitled"))
    ):
        return " ".join(title.split())
    return None


def extract(data: bytes, *, password: str | None = None) -> Extracted:
    """Text and page map of a PDF; see the module docstring for what is cleaned and refused."""
    with _quiet_pypdf():
        reader = _open(data, password)
        try:
            count = len(reader.pages)
        except MemoryError:
            raise
        except Exception as exc:
            raise InvalidArgument(f"{DAMAGED} (its page list is broken: {_reason(exc)})") from None
        if count == 0:
            raise InvalidArgument("the PDF has no pages")
        if count > MAX_PAGES:
            raise InvalidArgument(f"the PDF has {count} pages; at most {MAX_PAGES} are supported")
        raw: list[str] = []
        warnings: list[str] = []
        for number in range(1, count + 1):
            try:
                raw.append(reader.pages[number - 1].extract_text() or "")
            except MemoryError:
                raise
            except Exception as exc:
                warnings.append(f"page {number} could not be read ({_reason(exc)})")
                raw.append("")
        title = _title(reader)

    if len(warnings) == count:
        raise InvalidArgument(f"{DAMAGED}: no page could be read ({warnings[0]})")
    if not any(text.strip() for text in raw):
        raise InvalidArgument(NO_TEXT_LAYER)
    if _undecodable("".join(raw)):
        raise InvalidArgument(UNDECODABLE)

    lines = [
        _CONTROLS.sub("", _spell_ligatures(text).replace("\r\n", "\n").replace("\r", "\n")).split("\n")
        for text in raw
    ]
    lines, dropped = _drop_furniture(lines)
    texts = _join_across_pages(["\n".join(page) for page in lines])
    texts = [_join_hyphenation(text) for text in texts]
    if dropped:
        warnings.append(f"{dropped} header/footer/page-number lines dropped")
    return join_pages(texts, title=title, warnings=warnings)
