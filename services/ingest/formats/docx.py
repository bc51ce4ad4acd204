"""DOCX with python-docx: paragraphs, headings (as Markdown headings), lists and tables (as Markdown
tables), in document order.

The archive is checked before any XML is parsed: member count, total unpacked size and per-member
compression ratio, so a zip bomb is refused from its directory alone. (Python's zipfile never
inflates a member past the size its header declares, so checking the declared sizes is enough.)
Strict OOXML, which python-docx does not read, is mapped to the transitional namespaces first.
Headers, footers, footnotes and comments are left out: they are page furniture or asides.
"""

from __future__ import annotations

import io
import re
import zipfile

from services.common.errors import InvalidArgument
from services.ingest.extract import NO_TEXT, Extracted, single_page

MAX_MEMBERS = 2000
MAX_TOTAL_BYTES = 200 * 1024 * 1024
MAX_RATIO = 200  # deflated XML is 5-30x; a bomb is 1000x and more
RATIO_FLOOR = 1024 * 1024  # small members may compress absurdly well without harm

W = "{http://schemas.openxmlformats.org/wordprocessingml/2006/main}"
_MC = "{http://schemas.openxmlformats.org/markup-compatibility/2006}"
_OLE_MAGIC = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"

# Strict OOXML namespace -> transitional namespace (ECMA-376 part 1, strict vs transitional)
_STRICT = [
    (
        b"http://purl.oclc.org/ooxml/wordprocessingml/main",
        b"http://schemas.openxmlformats.org/wordprocessingml/2006/main",
    ),
    (
        b"http://purl.oclc.org/ooxml/officeDocument/relationships",
        b"http://schemas.openxmlformats.org/officeDocument/2006/relationships",
    ),
    (
        b"http://purl.oclc.org/ooxml/officeDocument/math",
        b"http://schemas.openxmlformats.org/officeDocument/2006/math",
    ),
    (
        b"http://purl.oclc.org/ooxml/officeDocument/extendedProperties",
        b"http://schemas.openxmlformats.org/officeDocument/2006/extended-properties",
    ),
    (
        b"http://purl.oclc.org/ooxml/officeDocument/customProperties",
        b"http://schemas.openxmlformats.org/officeDocument/2006/custom-properties",
    ),
    (
        b"http://purl.oclc.org/ooxml/officeDocument/docPropsVTypes",
        b"http://schemas.openxmlformats.org/officeDocument/2006/docPropsVTypes",
    ),
    (
        b"http://purl.oclc.org/ooxml/officeDocument/sharedTypes",
        b"http://schemas.openxmlformats.org/officeDocument/2006/sharedTypes",
    ),
    (
        b"http://purl.oclc.org/ooxml/drawingml/wordprocessingDrawing",
        b"http://schemas.openxmlformats.org/drawingml/2006/wordprocessingDrawing",
    ),
    (
        b"http://purl.oclc.org/ooxml/drawingml/picture",
        b"http://schemas.openxmlformats.org/drawingml/2006/picture",
    ),
    (b"http://purl.oclc.org/ooxml/drawingml/main", b"http://schemas.openxmlformats.org/drawingml/2006/main"),
]
_HEADING_NAME = re.compile(r"^(?:heading|überschrift|titre|título|titolo|kop)\s*(\d)$", re.I)


def ole_refusal(data: bytes) -> str:
    """Why an OLE (compound file) upload is refused: encrypted OOXML or a legacy binary .doc."""
    if "EncryptedPackage".encode("utf-16-le") in data or "EncryptionInfo".encode("utf-16-le") in data:
        return (
            "password-protected DOCX is not supported: the file is encrypted (an OLE container, "
            "not a zip); remove the password in Word and upload it again"
        )
    if "WordDocument".encode("utf-16-le") in data:
        return "legacy Word .doc files are not supported; save it as .docx and upload it again"
    return "old-style Office files (OLE containers) are not supported; save it as .docx"


def check_archive(data: bytes) -> zipfile.ZipFile:
    """Open the zip and refuse bombs from the directory alone, before anything is unpacked."""
    if data.startswith(_OLE_MAGIC):
        raise InvalidArgument(ole_refusal(data))
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        members = archive.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError) as exc:
        raise InvalidArgument(f"the DOCX file is damaged or truncated and cannot be read ({exc})") from None
    if len(members) > MAX_MEMBERS:
        raise InvalidArgument(
            f"the DOCX archive has {len(members)} files inside; at most {MAX_MEMBERS} are allowed (a zip bomb?)"
        )
    total = sum(m.file_size for m in members)
    if total > MAX_TOTAL_BYTES:
        raise InvalidArgument(
            f"the DOCX unpacks to {total // (1024 * 1024)} MB; at most {MAX_TOTAL_BYTES // (1024 * 1024)} MB "
            "are allowed (a zip bomb?)"
        )
    for m in members:
        ratio = m.file_size / max(m.compress_size, 1)
        if m.file_size > RATIO_FLOOR and ratio > MAX_RATIO:
            raise InvalidArgument(
                f"the DOCX member {m.filename!r} is compressed {ratio:.0f}:1; at most {MAX_RATIO}:1 is "
                "allowed (a zip bomb?)"
            )
    return archive


def _transitional(archive: zipfile.ZipFile, data: bytes) -> bytes:
    """The package as python-docx can read it: Strict OOXML namespaces mapped to transitional ones."""
    try:
        rels = archive.read("_rels/.rels")
    except KeyError:
        raise InvalidArgument("the file is a zip archive but not a Word document (no _rels/.rels)") from None
    if b"purl.oclc.org/ooxml" not in rels:
        return data
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as rewritten:
        for member in archive.infolist():
            body = archive.read(member)
            if member.filename.endswith((".xml", ".rels")):
                for strict, transitional in _STRICT:
                    body = body.replace(strict, transitional)
            rewritten.writestr(member, body)
    return out.getvalue()


def _local(el) -> tuple[str, str]:
    tag = el.tag
    if not isinstance(tag, str):  # comments, processing instructions
        return "", ""
    if tag.startswith("{"):
        ns, _, local = tag[1:].partition("}")
        return "{" + ns + "}", local
    return "", tag


def _run_text(el, out: list[str]) -> None:
    """Text of a paragraph's inline content, in order; deleted text and field codes left out."""
    for child in el:
        ns, local = _local(child)
        if not local:
            continue
        if ns == _MC and local == "AlternateContent":
            # the same text box appears in the Choice and again in the VML Fallback: read one
            choice = next((c for c in child if _local(c)[1] == "Choice"), None)
            _run_text(choice if choice is not None else child, out)
        elif local == "t":
            out.append(child.text or "")
        elif ns != W:
            _run_text(child, out)  # drawings hold text boxes; math holds m:t
        elif local == "tab":
            out.append("\t")
        elif local in ("br", "cr"):
            out.append("\n")
        elif local == "noBreakHyphen":
            out.append("-")
        elif local in (
            "del",
            "delText",
            "instrText",
            "pPr",
            "rPr",
            "moveFrom",
            "fldData",
            "commentReference",
        ):
            continue
        elif local == "txbxContent":
            for p in child.iter(W + "p"):
                out.append("\n")
                _run_text(p, out)
            out.append("\n")
        else:
            _run_text(child, out)  # r, hyperlink, ins, smartTag, sdt, fldSimple, customXml, ...


def _paragraph_text(p) -> str:
    out: list[str] = []
    _run_text(p, out)
    return "".join(out).strip()


class _Styles:
    """Style id -> heading level and list-ness, following basedOn chains."""

    def __init__(self, document) -> None:
        self._styles: dict[str, tuple[str, int | None, bool, str | None]] = {}
        try:
            root = document.styles.element
        except Exception:
            return
        for style in root.iter(W + "style"):
            sid = style.get(W + "styleId")
            if not sid:
                continue
            name_el = style.find(W + "name")
            name = (name_el.get(W + "val") if name_el is not None else sid) or sid
            ppr = style.find(W + "pPr")
            outline = _outline(ppr)
            numbered = _numbered(ppr)
            based = style.find(W + "basedOn")
            self._styles[sid] = (name, outline, numbered, based.get(W + "val") if based is not None else None)

    def _chain(self, sid: str | None):
        seen: set[str] = set()
        while sid and sid in self._styles and sid not in seen:
            seen.add(sid)
            yield self._styles[sid]
            sid = self._styles[sid][3]

    def heading_level(self, sid: str | None) -> int | None:
        for i, (name, outline, _, _) in enumerate(self._chain(sid)):
            lowered = name.strip().lower()
            if i == 0 and lowered == "title":
                return 1
            if i == 0 and lowered == "subtitle":
                return None
            found = _HEADING_NAME.match(lowered)
            if found:
                return int(found.group(1))
            if outline is not None:
                return outline
        return None

    def is_list(self, sid: str | None) -> bool:
        for i, (name, _, numbered, _) in enumerate(self._chain(sid)):
            if numbered or (i == 0 and name.lower().startswith("list") and name.lower() != "list paragraph"):
                return True
        return False


def _numbered(ppr) -> bool:
    """A paragraph (or style) is in a list when it names a numbering; numId 0 means "none"."""
    numpr = ppr.find(W + "numPr") if ppr is not None else None
    numid = numpr.find(W + "numId") if numpr is not None else None
    return numid is not None and numid.get(W + "val", "0") != "0"


def _outline(ppr) -> int | None:
    if ppr is None:
        return None
    el = ppr.find(W + "outlineLvl")
    if el is None:
        return None
    try:
        level = int(el.get(W + "val", "9"))
    except ValueError:
        return None
    return level + 1 if 0 <= level < 9 else None  # 9 means "body text"


def _paragraph_block(p, styles: _Styles) -> tuple[str, str] | None:
    text = _paragraph_text(p)
    if not text:
        return None
    ppr = p.find(W + "pPr")
    style_el = ppr.find(W + "pStyle") if ppr is not None else None
    sid = style_el.get(W + "val") if style_el is not None else None
    level = _outline(ppr) or styles.heading_level(sid)
    if level:
        return "heading", "#" * min(level, 6) + " " + " ".join(text.split())
    numpr = ppr.find(W + "numPr") if ppr is not None else None
    if _numbered(ppr) or styles.is_list(sid):
        ilvl = numpr.find(W + "ilvl") if numpr is not None else None
        try:
            depth = min(int(ilvl.get(W + "val", "0")), 8) if ilvl is not None else 0
        except ValueError:
            depth = 0
        return "item", "  " * depth + "- " + " ".join(text.split())
    return "para", text


def _cell_text(tc) -> str:
    parts: list[str] = []
    for p in tc.iter(W + "p"):  # nested tables' paragraphs included, flattened
        text = _paragraph_text(p)
        if text:
            parts.append(" ".join(text.split()))
    return " ".join(parts).replace("|", "\\|")


def _cells(tr):
    for child in tr:
        ns, local = _local(child)
        if ns == W and local == "tc":
            yield child
        elif ns == W and local in ("sdt", "sdtContent", "customXml"):
            yield from _cells(child)


def _int_val(el, default: int) -> int:
    if el is None:
        return default
    try:
        return max(0, min(int(el.get(W + "val", default)), 64))
    except ValueError:
        return default


def _table_block(tbl) -> tuple[str, str] | None:
    rows: list[list[str]] = []
    for tr in tbl.iter(W + "tr"):
        if tr.getparent() is not tbl and _local(tr.getparent())[1] not in ("sdtContent", "customXml"):
            continue  # a nested table's row; its text is in the outer cell
        trpr = tr.find(W + "trPr")
        row = [""] * _int_val(trpr.find(W + "gridBefore") if trpr is not None else None, 0)
        for tc in _cells(tr):
            tcpr = tc.find(W + "tcPr")
            span = _int_val(tcpr.find(W + "gridSpan") if tcpr is not None else None, 1) or 1
            vmerge = tcpr.find(W + "vMerge") if tcpr is not None else None
            # a vertically merged cell's text lives in its first row; later rows repeat nothing
            continued = vmerge is not None and vmerge.get(W + "val", "continue") != "restart"
            row.append("" if continued else _cell_text(tc))
            row.extend([""] * (span - 1))
        rows.append(row)
    if not any(cell for row in rows for cell in row):
        return None
    width = max(len(row) for row in rows)
    lines = ["| " + " | ".join(row + [""] * (width - len(row))) + " |" for row in rows]
    lines.insert(1, "|" + "---|" * width)
    return "table", "\n".join(lines)


def _blocks(container, styles: _Styles):
    for child in container:
        ns, local = _local(child)
        if ns == W and local == "p":
            block = _paragraph_block(child, styles)
        elif ns == W and local == "tbl":
            block = _table_block(child)
        elif ns == W and local in ("sdt", "sdtContent", "customXml", "ins", "moveTo"):
            yield from _blocks(child, styles)
            continue
        elif ns == _MC and local == "AlternateContent":
            choice = next((c for c in child if _local(c)[1] == "Choice"), None)
            yield from _blocks(choice if choice is not None else child, styles)
            continue
        else:
            continue
        if block:
            yield block


def extract(data: bytes) -> Extracted:
    """Markdown-ish text of a DOCX body; the page map is one "page" (Word has no fixed pages)."""
    import docx
    from lxml.etree import LxmlError

    with check_archive(data) as archive:
        package = _transitional(archive, data)
    try:
        document = docx.Document(io.BytesIO(package))
    except MemoryError:
        raise
    except (ValueError, KeyError, LxmlError, zipfile.BadZipFile, AttributeError, TypeError) as exc:
        reason = str(exc).replace("<_io.BytesIO object>", "").strip() or type(exc).__name__
        raise InvalidArgument(f"the DOCX file is damaged or not a Word document ({reason[:200]})") from None
    except Exception as exc:  # python-docx's own PackageNotFoundError and friends
        raise InvalidArgument(
            f"the DOCX file cannot be read ({type(exc).__name__}: {str(exc)[:200]})"
        ) from None

    styles = _Styles(document)
    out: list[str] = []
    previous = None
    title = None
    for kind, text in _blocks(document.element.body, styles):
        if kind == "item" and previous == "item":
            out[-1] += "\n" + text
        else:
            out.append(text)
        if kind == "heading" and title is None:
            title = text.lstrip("#").strip()
        previous = kind
    if not out:
        raise InvalidArgument(NO_TEXT)
    try:
        core_title = (document.core_properties.title or "").strip()
    except Exception:
        core_title = ""
    return single_page("\n\n".join(out), title=core_title or title)
