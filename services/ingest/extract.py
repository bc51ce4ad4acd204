"""Turn a source's original bytes into clean text and a page map.

`detect_type` decides what a file is from its content (magic bytes first, then the name and the
declared content type); `extract_document` hands the bytes to the module in `formats/` for that type.
Both raise `InvalidArgument` with a message a person understands. Parsing untrusted files belongs in
`services.ingest.sandbox.run_sandboxed(extract_document, ...)`, never in the service process itself.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import PurePosixPath

from services.common.errors import InvalidArgument

#: every value `detect_type` returns and `extract_document` accepts
DOCUMENT_TYPES = ("pdf", "docx", "html", "text", "markdown", "qa_jsonl", "qa_csv")

NO_TEXT = "the document has no text"


@dataclass
class Extracted:
    text: str
    # [{"page": 1, "start": 0, "end": N}, ...] character offsets into `text`
    pages: list[dict]
    title: str | None = None
    # question-answer files: [{"question": ..., "answer": ...}, ...]; they skip generation
    qa_pairs: list[dict] | None = None
    # what was dropped or could not be read, for the logs (e.g. "page 3 could not be read")
    warnings: list[str] = field(default_factory=list)


_TRAILING_WS = re.compile(r"[ \t]+\n")
_MANY_BLANKS = re.compile(r"\n{3,}")


def normalise_text(text: str) -> str:
    """NFC, one newline style, no trailing spaces, at most one blank line in a row."""
    if not unicodedata.is_normalized("NFC", text):  # the quick check is much cheaper than normalising
        text = unicodedata.normalize("NFC", text)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = text.replace("\x00", "")
    text = _TRAILING_WS.sub("\n", text)
    text = _MANY_BLANKS.sub("\n\n", text)
    return text.strip() + "\n"


def single_page(text: str, **kw) -> Extracted:
    """An `Extracted` whose whole text is one page; refuses empty text."""
    text = normalise_text(text)
    if not text.strip():
        raise InvalidArgument(NO_TEXT)
    return Extracted(text=text, pages=[{"page": 1, "start": 0, "end": len(text)}], **kw)


def join_pages(page_texts: list[str], **kw) -> Extracted:
    """Join per-page texts with a blank line between pages and record each page's char span.

    Empty pages keep an entry (start == end) so that page numbers stay physical page numbers.
    """
    parts: list[str] = []
    pages: list[dict] = []
    pos = 0
    for number, raw in enumerate(page_texts, start=1):
        body = normalise_text(raw).strip()
        if body and parts:
            parts.append("\n\n")
            pos += 2
        pages.append({"page": number, "start": pos, "end": pos + len(body)})
        parts.append(body)
        pos += len(body)
    text = "".join(parts)
    if not text.strip():
        raise InvalidArgument(NO_TEXT)
    return Extracted(text=text + "\n", pages=pages, **kw)


def extract_plain(data: bytes) -> Extracted:
    """Pasted text: always UTF-8 (it came to us as a string)."""
    try:
        raw = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise InvalidArgument("the text is not valid UTF-8") from None
    return single_page(raw)


def extract(data: bytes, kind: str) -> Extracted:
    """Kind "text" is pasted text; any type of `DOCUMENT_TYPES` goes to `extract_document`."""
    if kind == "text":
        return extract_plain(data)
    if kind in DOCUMENT_TYPES:
        return extract_document(data, kind)
    raise InvalidArgument(f"unsupported source kind {kind!r}")


# --- content sniffing -----------------------------------------------------------------------

_OLE_MAGIC = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"

# other binary formats people upload by mistake: named, so the refusal says what the file is
_FOREIGN_MAGIC: list[tuple[bytes, str]] = [
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF87a", "a GIF image"),
    (b"GIF89a", "a GIF image"),
    (b"II*\x00", "a TIFF image"),
    (b"MM\x00*", "a TIFF image"),
    (b"\x1f\x8b", "a gzip archive"),
    (b"7z\xbc\xaf\x27\x1c", "a 7-Zip archive"),
    (b"Rar!\x1a\x07", "a RAR archive"),
    (b"{\\rtf", "an RTF document"),
    (b"\x7fELF", "an executable program"),
    (b"MZ", "a Windows program"),
    (b"ID3", "an MP3 audio file"),
    (b"\x00\x00\x01\x00", "an icon"),
    (b"PK\x05\x06", "an empty ZIP archive"),
]

_EXTENSIONS = {
    ".pdf": "pdf",
    ".docx": "docx",
    ".html": "html",
    ".htm": "html",
    ".xhtml": "html",
    ".txt": "text",
    ".text": "text",
    ".md": "markdown",
    ".markdown": "markdown",
    ".jsonl": "qa_jsonl",
    ".ndjson": "qa_jsonl",
    ".json": "qa_jsonl",
    ".csv": "qa_csv",
}

_CONTENT_TYPES = {
    "application/pdf": "pdf",
    "application/x-pdf": "pdf",
    "application/vnd.openxmlformats-officedocument.wordprocessingml.document": "docx",
    "text/html": "html",
    "application/xhtml+xml": "html",
    "text/plain": "text",
    "text/markdown": "markdown",
    "text/x-markdown": "markdown",
    "application/jsonl": "qa_jsonl",
    "application/x-ndjson": "qa_jsonl",
    "application/json": "qa_jsonl",
    "text/csv": "qa_csv",
}

# names that say "a type we do not take", for a clearer refusal than "unsupported"
_UNSUPPORTED_EXTENSIONS = {
    ".doc": "legacy Word .doc files are not supported; save it as .docx",
    ".xls": "spreadsheets are not supported",
    ".xlsx": "spreadsheets are not supported",
    ".ppt": "presentations are not supported",
    ".pptx": "presentations are not supported",
    ".odt": "OpenDocument text files are not supported; save it as .docx",
    ".rtf": "RTF documents are not supported; save it as .docx",
    ".epub": "EPUB books are not supported",
}

_DESCRIBE = {
    "pdf": "a PDF",
    "docx": "a Word (DOCX) document",
    "html": "an HTML page",
    "text": "plain text",
    "markdown": "Markdown text",
    "qa_jsonl": "question-answer JSON lines",
    "qa_csv": "a question-answer CSV file",
}

_TEXTUAL = {"html", "text", "markdown", "qa_jsonl", "qa_csv"}
_HTML_START = re.compile(rb"^\s*(<!--.*?-->\s*)*<(!doctype\s+html|html|head|body)[\s>]", re.I | re.S)
_HTML_ANYWHERE = re.compile(rb"<(html|head|body|title|div|p|h1|article|main)[\s>]", re.I)


def _declared(filename: str | None, content_type: str | None) -> tuple[str | None, str | None]:
    """The type the name (first) or the content type (second) claims, and which one claimed it."""
    if filename:
        suffix = PurePosixPath(filename.replace("\\", "/")).suffix.lower()
        if suffix in _UNSUPPORTED_EXTENSIONS:
            raise InvalidArgument(f"{filename!r}: {_UNSUPPORTED_EXTENSIONS[suffix]}")
        if suffix in _EXTENSIONS:
            return _EXTENSIONS[suffix], "name"
    if content_type:
        media = content_type.split(";", 1)[0].strip().lower()
        if media in _CONTENT_TYPES:
            return _CONTENT_TYPES[media], "content type"
    return None, None


def _sniff_zip(data: bytes) -> str:
    # member names appear in plain bytes in the local headers and the central directory; looking
    # for them keeps the (untrusted) archive's directory out of the service process entirely
    if b"word/document.xml" in data or b"word/_rels/" in data:
        return "docx"
    if b"xl/workbook" in data:
        raise InvalidArgument("spreadsheets (XLSX) are not supported")
    if b"ppt/presentation" in data:
        raise InvalidArgument("presentations (PPTX) are not supported")
    if data[30:38] == b"mimetype":
        raise InvalidArgument("OpenDocument and EPUB files are not supported; save it as .docx or PDF")
    raise InvalidArgument("ZIP archives are not supported; upload the documents inside it one by one")


def _sniff_text(data: bytes, declared: str | None) -> str:
    """Which textual type the bytes look like; `declared` settles the cases content cannot."""
    from services.ingest.formats.text import decode_text

    # the head is enough to tell, and keeps a 200 MB upload from being decoded in the service
    # process (64 KiB: a multiple of 4, so UTF-16/32 are never cut mid-character)
    text = decode_text(data[:65536])  # raises when the bytes are binary, not text
    head = text[:4096].encode("utf-8", "replace")
    if declared in _TEXTUAL:
        return declared
    if _HTML_START.match(head):
        return "html"
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    if first.startswith("{") and first.endswith("}"):
        import json

        try:
            obj = json.loads(first)
        except ValueError:
            obj = None
        if isinstance(obj, dict) and ({"question", "answer"} <= obj.keys() or "messages" in obj):
            return "qa_jsonl"
    header = [c.strip().strip('"').lower() for c in re.split(r"[,;\t]", first)]
    if "question" in header and "answer" in header:
        return "qa_csv"
    if _HTML_ANYWHERE.search(head) and head.lstrip().startswith(b"<"):
        return "html"
    if re.search(r"(?m)^#{1,6} \S", text[:20000]):
        return "markdown"
    return "text"


def detect_type(data: bytes, filename: str | None = None, content_type: str | None = None) -> str:
    """One of `DOCUMENT_TYPES`, from the content first; the name and content type only refine it.

    A file whose content contradicts its name (a "report.pdf" that is HTML) is refused with a
    message naming both, since parsing it as either would mislead.
    """
    if not data or not data.strip():
        raise InvalidArgument("the document is empty")
    declared, source = _declared(filename, content_type)
    label = f"the file name {filename!r}" if source == "name" else f"the content type {content_type!r}"

    sniffed: str | None = None
    if b"%PDF-" in data[:1024]:
        sniffed = "pdf"
    elif data.startswith(b"PK\x03\x04"):
        sniffed = _sniff_zip(data)
    elif data.startswith(_OLE_MAGIC):
        from services.ingest.formats.docx import ole_refusal

        raise InvalidArgument(ole_refusal(data))
    else:
        for magic, what in _FOREIGN_MAGIC:
            if data.startswith(magic):
                if declared:
                    raise InvalidArgument(f"{label} says {_DESCRIBE[declared]} but the file is {what}")
                raise InvalidArgument(f"unsupported file type: the file is {what}")

    if sniffed is None:
        if declared in ("pdf", "docx"):
            what = "an HTML page" if _HTML_ANYWHERE.search(data[:4096]) else "text"
            raise InvalidArgument(
                f"{label} says {_DESCRIBE[declared]} but the content is {what}; "
                "rename the file or upload the right one"
            )
        return _sniff_text(data, declared)

    # a server's textual content type on a PDF is a common slip; a file's name is not
    if declared is not None and declared != sniffed and (source == "name" or declared in ("pdf", "docx")):
        raise InvalidArgument(
            f"{label} says {_DESCRIBE[declared]} but the content is {_DESCRIBE[sniffed]}; "
            "rename the file or upload the right one"
        )
    return sniffed


def extract_document(data: bytes, detected_type: str, *, password: str | None = None) -> Extracted:
    """Extract text and a page map from a document of a type `detect_type` returned.

    Raises `InvalidArgument` with a message a person can act on for anything wrong with the
    document (damaged, encrypted, a zip bomb, no text, ...). `password` opens encrypted PDFs.
    """
    if not data or not data.strip():
        raise InvalidArgument("the document is empty")
    if detected_type == "pdf":
        from services.ingest.formats import pdf

        out = pdf.extract(data, password=password)
    elif detected_type == "docx":
        from services.ingest.formats import docx

        out = docx.extract(data)
    elif detected_type == "html":
        from services.ingest.formats import html

        out = html.extract(data)
    elif detected_type in ("text", "markdown"):
        from services.ingest.formats import text

        out = text.extract(data)
    elif detected_type == "qa_jsonl":
        from services.ingest.formats import qa

        out = qa.extract_jsonl(data)
    elif detected_type == "qa_csv":
        from services.ingest.formats import qa

        out = qa.extract_csv(data)
    else:
        raise InvalidArgument(f"unsupported document type {detected_type!r}")
    if not out.text.strip():
        raise InvalidArgument(NO_TEXT)
    return out
