"""Turn an evaluation document's source into the file a user would give doclora.

- `report.md` -> a multi-page PDF written here from plain PDF objects (Helvetica, text wrapped to
  the page, tables as rows of cells placed at aligned column positions), with a running header line
  and "Page N of M" on every page, so the extractor meets the page furniture of a real report;
- `manual.md` -> a DOCX (python-docx: headings, paragraphs, bullet and numbered lists, Word tables);
- `policy.md` (and any other .md/.txt) -> uploaded as it is;
- `guide.html` -> the page as it is; `run.py` serves it over HTTP and gives the link (or uploads it).

The Markdown subset: `#` headings, paragraphs, `- ` bullets, `1. ` steps, pipe tables, and
`<!-- name -->...<!-- /name -->` blocks (authors, figure captions) whose lines stay lines.

Check a rendering by hand: `python -m bench.knowledge.render docs/report/report.md /tmp/report.pdf`
(prints the page count and the start of the text pypdf extracts).
"""

from __future__ import annotations

import io
import re
import sys
from pathlib import Path

HOW = {"report": "pdf", "manual": "docx", "policy": "md", "guide": "html"}
TYPES = {
    "pdf": "application/pdf",
    "docx": "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
    "md": "text/markdown",
    "txt": "text/plain",
    "html": "text/html",
}


def how_for(name: str, src: Path) -> str:
    """The format a document is given in: by the document's name, else by its file's suffix."""
    return HOW.get(name) or {".html": "html", ".htm": "html", ".txt": "txt"}.get(src.suffix, "md")


def render(src: Path, how: str) -> tuple[str, bytes, str]:
    """(file name, bytes, content type) of `src` given as `how` ("pdf", "docx", "md", "txt", "html")."""
    if how in ("pdf", "docx"):
        blocks = parse(src.read_text(encoding="utf-8"))
        data = to_pdf(blocks, title=_title(blocks, src)) if how == "pdf" else to_docx(blocks)
        return f"{src.stem}.{how}", data, TYPES[how]
    return src.name, src.read_bytes(), TYPES[how]


# ------------------------------------------------------------------------------------------ Markdown

_TABLE_RULE = re.compile(r"^\|?\s*:?-{2,}:?\s*(\|\s*:?-{2,}:?\s*)*\|?$")
_STEP = re.compile(r"^\d+[.)]\s+")
_MARK = re.compile(r"^<!--\s*(/?)([\w-]+)\s*-->$")


def inline(text: str) -> str:
    """Markdown emphasis, code and links as the plain text a reader sees."""
    text = re.sub(r"\[([^\]]+)\]\([^)]*\)", r"\1", text)
    return re.sub(r"(\*\*|__|`)(.+?)\1", r"\2", text).strip()


def parse(md: str) -> list[tuple]:
    """Blocks: ("h", level, text), ("p", text), ("ul"|"ol", items), ("table", rows), ("lines", lines)."""
    blocks: list[tuple] = []
    para: list[str] = []
    marked: list[str] | None = None
    prev_was_item = prev_was_row = False

    def end_para():
        if para:
            blocks.append(("p", inline(" ".join(para))))
            para.clear()

    for raw in md.splitlines():
        line = raw.strip()
        mark = _MARK.match(line)
        if mark:
            end_para()
            if mark.group(1) and marked is not None:
                blocks.append(("lines", [inline(x) for x in marked if x]))
            marked = None if mark.group(1) else []
        elif marked is not None:
            marked.append(line)
        elif not line:
            end_para()
        elif line.startswith("#"):
            end_para()
            level = len(line) - len(line.lstrip("#"))
            blocks.append(("h", level, inline(line[level:])))
        elif line.startswith(("- ", "* ")) or _STEP.match(line):
            end_para()
            kind = "ul" if line[0] in "-*" else "ol"
            item = inline(line[2:] if kind == "ul" else _STEP.sub("", line))
            if blocks and blocks[-1][0] == kind and prev_was_item:
                blocks[-1][1].append(item)
            else:
                blocks.append((kind, [item]))
        elif line.startswith("|"):
            end_para()
            if not _TABLE_RULE.match(line):
                cells = [inline(c) for c in line.strip("|").split("|")]
                if blocks and blocks[-1][0] == "table" and prev_was_row:
                    blocks[-1][1].append(cells)
                else:
                    blocks.append(("table", [cells]))
        elif raw[:1] in " \t" and blocks and blocks[-1][0] in ("ul", "ol") and not para:
            blocks[-1][1][-1] += " " + inline(line)  # a list item's continuation line
        else:
            para.append(line)
        # a list goes on across blank lines; a table ends at one
        prev_was_item = bool(blocks) and blocks[-1][0] in ("ul", "ol") and not para and not mark
        prev_was_row = bool(blocks) and blocks[-1][0] == "table" and not para and not mark and bool(line)
    end_para()
    return blocks


def _title(blocks: list[tuple], src: Path) -> str:
    return next((b[2] for b in blocks if b[0] == "h"), src.stem)


# ------------------------------------------------------------------------------------------ PDF

# Helvetica advance widths (1/1000 em) by character class: close enough to wrap lines to the page
_NARROW = dict.fromkeys("ijl.,;:'|!I", 240) | dict.fromkeys(" ", 278) | dict.fromkeys("frt()-/[]", 333)
_WIDE = dict.fromkeys("mMW", 900) | dict.fromkeys("wOQGCDHNU", 740) | {"@": 1015, "%": 889}


def width(text: str, size: float, bold: bool = False) -> float:
    em = sum(_NARROW.get(c) or _WIDE.get(c) or (690 if c.isupper() else 556) for c in text)
    return em * size / 1000 * (1.06 if bold else 1.0)


def wrap(text: str, limit: float, size: float, bold: bool = False) -> list[str]:
    lines, cur = [], ""
    for word in text.split():
        if cur and width(cur + " " + word, size, bold) > limit:
            lines.append(cur)
            cur = word
        else:
            cur = f"{cur} {word}" if cur else word
    return [*lines, cur] if cur else lines or [""]


PAGE_W, PAGE_H, LEFT, RIGHT, TOP, BOTTOM = 612, 792, 72, 540, 716, 72
BODY, LEAD = 10.5, 14.0
HEAD = {1: 16.0, 2: 13.0, 3: 11.5}


def layout(blocks: list[tuple]) -> list[list[tuple]]:
    """Pages of (x, y, bold, size, text) runs."""
    pages: list[list[tuple]] = [[]]
    y = TOP

    def room(h: float):
        nonlocal y
        if y - h < BOTTOM:
            pages.append([])
            y = TOP

    def put(lines: list[str], size: float, bold: bool = False, x: float = LEFT, gap: float = 6):
        nonlocal y
        for line in lines:
            room(size * 1.35)
            y -= size * 1.35
            pages[-1].append((x, y, bold, size, line))
        y -= gap

    full = RIGHT - LEFT
    for b in blocks:
        if b[0] == "h":
            size = HEAD.get(b[1], BODY)
            room(size * 4)  # keep a heading with the lines after it
            y -= 6
            put(wrap(b[2], full, size, True), size, True)
        elif b[0] == "p":
            put(wrap(b[1], full, BODY), BODY)
        elif b[0] == "lines":
            for line in b[1]:
                put(wrap(line, full, BODY), BODY, gap=0)
            y -= 6
        elif b[0] in ("ul", "ol"):
            for i, item in enumerate(b[1], 1):
                mark = "-" if b[0] == "ul" else f"{i}."
                lines = wrap(item, full - 18, BODY)
                put([f"{mark} {lines[0]}"], BODY, x=LEFT + 4, gap=0)
                put(lines[1:], BODY, x=LEFT + 4 + width(mark + " ", BODY), gap=0)
            y -= 6
        elif b[0] == "table":
            ncol = max(len(r) for r in b[1])
            rows = [[*r, *[""] * (ncol - len(r))] for r in b[1]]
            natural = [max(width(r[c], BODY, i == 0) for i, r in enumerate(rows)) + 14 for c in range(ncol)]
            scale = min(1.0, full / sum(natural))
            cols = [w * scale for w in natural]
            for r, row in enumerate(rows):
                cells = [wrap(row[c], cols[c] - 10, BODY, r == 0) for c in range(ncol)]
                room(LEAD * max(len(c) for c in cells))
                for k in range(max(len(c) for c in cells)):
                    y -= LEAD
                    x = LEFT
                    for c, lines in enumerate(cells):
                        if k < len(lines) and lines[k]:
                            pages[-1].append((x, y, r == 0, BODY, lines[k]))
                        x += cols[c]
            y -= 8
    return pages


# characters WinAnsi lacks, as a typist would write them (anything else left becomes "?")
_PLAIN = str.maketrans(
    {"\u2212": "-", "\u2011": "-", "\u2264": "<=", "\u2265": ">=", "\u2192": "->", "\u2248": "~"}
)


def _pdf_str(text: str) -> bytes:
    data = text.translate(_PLAIN).encode("cp1252", "replace")
    return b"(" + data.replace(b"\\", b"\\\\").replace(b"(", b"\\(").replace(b")", b"\\)") + b")"


def to_pdf(blocks: list[tuple], title: str) -> bytes:
    """A PDF of the blocks: Helvetica (WinAnsi), a running header and a page number on every page."""
    pages = layout(blocks)
    n = len(pages)
    running = title
    for sep in (" — ", ": "):  # a long title runs as its first part
        if width(running, 8.5) > RIGHT - LEFT:
            running = running.split(sep)[0]
    font = b"<< /Type /Font /Subtype /Type1 /BaseFont /%s /Encoding /WinAnsiEncoding >>"
    objects = {3: font % b"Helvetica", 4: font % b"Helvetica-Bold"}
    kids = []
    for i, runs in enumerate(pages):
        page_obj, content_obj = 5 + 2 * i, 6 + 2 * i
        kids.append(page_obj)
        header = [(LEFT, 750, False, 8.5, running)]
        footer = [(PAGE_W / 2 - 25, 40, False, 8.5, f"Page {i + 1} of {n}")]
        ops = [b"0.5 w %d 744 m %d 744 l S" % (LEFT, RIGHT)]
        for x, y, bold, size, text in header + runs + footer:
            ops.append(
                b"BT /F%d %.1f Tf %.2f %.2f Td %s Tj ET" % (2 if bold else 1, size, x, y, _pdf_str(text))
            )
        stream = b"\n".join(ops)
        objects[page_obj] = (
            b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 %d %d] /Contents %d 0 R "
            b"/Resources << /Font << /F1 3 0 R /F2 4 0 R >> >> >>" % (PAGE_W, PAGE_H, content_obj)
        )
        objects[content_obj] = b"<< /Length %d >>\nstream\n%s\nendstream" % (len(stream), stream)
    objects[1] = b"<< /Type /Catalog /Pages 2 0 R >>"
    objects[2] = b"<< /Type /Pages /Kids [%s] /Count %d >>" % (b" ".join(b"%d 0 R" % k for k in kids), n)
    info = max(objects) + 1
    objects[info] = b"<< /Title %s /Producer (doclora bench) >>" % _pdf_str(title)
    out = bytearray(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets = {}
    for num in sorted(objects):
        offsets[num] = len(out)
        out += b"%d 0 obj\n%s\nendobj\n" % (num, objects[num])
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (info + 1)
    out += b"".join(b"%010d 00000 n \n" % offsets[k] for k in range(1, info + 1))
    out += b"trailer\n<< /Size %d /Root 1 0 R /Info %d 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (
        info + 1,
        info,
        xref,
    )
    return bytes(out)


# ------------------------------------------------------------------------------------------ DOCX


def to_docx(blocks: list[tuple]) -> bytes:
    """A Word document of the blocks: real headings, list paragraphs and tables."""
    import docx

    doc = docx.Document()
    for b in blocks:
        if b[0] == "h":
            doc.add_heading(b[2], level=min(b[1], 9))
        elif b[0] == "p":
            doc.add_paragraph(b[1])
        elif b[0] == "lines":
            for line in b[1]:
                doc.add_paragraph(line)
        elif b[0] in ("ul", "ol"):
            for item in b[1]:
                doc.add_paragraph(item, style="List Bullet" if b[0] == "ul" else "List Number")
        elif b[0] == "table":
            ncol = max(len(r) for r in b[1])
            table = doc.add_table(rows=len(b[1]), cols=ncol, style="Table Grid")
            for r, row in enumerate(b[1]):
                for c, text in enumerate(row):
                    table.cell(r, c).text = text
                    if r == 0:
                        for run in table.cell(r, c).paragraphs[0].runs:
                            run.bold = True
    out = io.BytesIO()
    doc.save(out)
    return out.getvalue()


def main(argv: list[str]) -> int:
    src, dest = Path(argv[0]), Path(argv[1])
    how = dest.suffix.lstrip(".")
    _, data, _ = render(src, how)
    dest.write_bytes(data)
    if how == "pdf":
        from pypdf import PdfReader

        reader = PdfReader(io.BytesIO(data))
        text = "\n".join(p.extract_text() for p in reader.pages)
        print(f"{dest}: {len(reader.pages)} pages, {len(text.split())} words extracted")
        print(text[:600])
    elif how == "docx":
        import docx

        d = docx.Document(io.BytesIO(data))
        print(f"{dest}: {len(d.paragraphs)} paragraphs, {len(d.tables)} tables")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
