"""Text extraction from every document type, with files the tests write themselves (no fixtures):
PDFs from a small hand-rolled writer, DOCX with python-docx, the rest as literal bytes."""

from __future__ import annotations

import io
import json
import unicodedata
import zipfile

import pytest

from services.common.errors import InvalidArgument
from services.ingest.extract import detect_type, extract, extract_document
from services.ingest.formats import docx as docx_format

# --- a tiny PDF writer: one Helvetica text line per list item, top to bottom ------------------

# codes 128/129 are mapped to the glyphs "fi" and "fl" by the font's /Differences, like TeX does
_LIGATURE_CODES = {"\ufb01": b"\x80", "\ufb02": b"\x81"}


def _pdf_string(line: str) -> bytes:
    raw = b"".join(_LIGATURE_CODES.get(c) or c.encode("cp1252") for c in line)
    return b"(" + raw.replace(b"\\", b"\\\\").replace(b"(", b"\\(").replace(b")", b"\\)") + b")"


def make_pdf(pages: list[list[str]], title: str | None = None) -> bytes:
    """A valid PDF whose page i shows pages[i] as lines; an empty list draws a line and no text."""
    kids = [4 + 2 * i for i in range(len(pages))]
    objects = {
        1: b"<< /Type /Catalog /Pages 2 0 R >>",
        2: b"<< /Type /Pages /Kids [%s] /Count %d >>" % (b" ".join(b"%d 0 R" % k for k in kids), len(pages)),
        3: b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding << /Type /Encoding "
           b"/BaseEncoding /WinAnsiEncoding /Differences [128 /fi /fl] >> >>",
    }
    for page, lines in zip(kids, pages, strict=True):
        if lines:
            stream = b"\n".join([b"BT /F1 11 Tf 14 TL 72 760 Td", *(_pdf_string(s) + b" Tj T*" for s in lines), b"ET"])
        else:
            stream = b"0.5 w 72 72 m 540 720 l S"
        objects[page] = (b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents %d 0 R "
                         b"/Resources << /Font << /F1 3 0 R >> >> >>" % (page + 1))
        objects[page + 1] = b"<< /Length %d >>\nstream\n%s\nendstream" % (len(stream), stream)
    info = max(objects) + 1
    objects[info] = b"<< /Title %s >>" % _pdf_string(title or "")
    out = bytearray(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets = {}
    for number in sorted(objects):
        offsets[number] = len(out)
        out += b"%d 0 obj\n%s\nendobj\n" % (number, objects[number])
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (info + 1)
    out += b"".join(b"%010d 00000 n \n" % offsets[n] for n in range(1, info + 1))
    out += b"trailer\n<< /Size %d /Root 1 0 R /Info %d 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (info + 1, info, xref)
    return bytes(out)


def encrypt_pdf(data: bytes, password: str) -> bytes:
    from pypdf import PdfReader, PdfWriter

    writer = PdfWriter(clone_from=PdfReader(io.BytesIO(data)))
    writer.encrypt(user_password=password, owner_password=password + "-owner", algorithm="AES-256")
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def make_docx() -> bytes:
    import docx

    document = docx.Document()
    document.core_properties.title = "Field Guide"
    document.add_heading("Field Guide", level=0)
    document.add_paragraph("An introduction to the birds of the valley.")
    document.add_heading("Herons", level=1)
    document.add_paragraph("Herons wade in shallow water.")
    document.add_paragraph("Grey heron", style="List Bullet")
    document.add_paragraph("Purple heron", style="List Bullet")
    table = document.add_table(rows=3, cols=2)
    for r, row in enumerate([("Bird", "Length | cm"), ("Grey heron", "95"), ("Egret", "60")]):
        for c, value in enumerate(row):
            table.cell(r, c).text = value
    document.add_heading("Owls", level=2)
    document.add_paragraph("Owls hunt at night.")
    out = io.BytesIO()
    document.save(out)
    return out.getvalue()


def page_text(out, number: int) -> str:
    page = out.pages[number - 1]
    return out.text[page["start"]:page["end"]]


# --- PDF -------------------------------------------------------------------------------------


def test_a_multipage_pdf_keeps_a_page_map_and_drops_running_headers_and_footers():
    """Pages map to char spans of the text; the repeated header, footer and page numbers are gone."""
    bodies = [
        ["The river floods in spring.", "Farmers move their herds uphill.", "The water recedes by June."],
        ["Dikes were built in 1850.", "They failed twice.", "A new canal opened in 1921."],
        ["Today sensors watch the levels.", "Alerts go out by text message.", "Nobody drowned since 1990."],
        ["The report ends with advice.", "Keep a boat.", "Know your neighbours."],
    ]
    pages = [["ACME Corp - Internal Report", *body, f"Page {i} of 4"] for i, body in enumerate(bodies, start=1)]
    out = extract_document(make_pdf(pages, title="Flood Report"), "pdf")
    assert "ACME Corp" not in out.text and "of 4" not in out.text
    assert [p["page"] for p in out.pages] == [1, 2, 3, 4]
    for i, body in enumerate(bodies, start=1):
        assert page_text(out, i) == "\n".join(body)
    assert out.title == "Flood Report"


def test_bare_page_numbers_that_follow_the_page_index_are_dropped():
    """A lone "7" at the bottom of page 7 is a page number, not content."""
    pages = [[f"Chapter text number {i} about herons.", str(i)] for i in range(1, 4)]
    out = extract_document(make_pdf(pages), "pdf")
    assert [page_text(out, i) for i in (1, 2, 3)] == [f"Chapter text number {i} about herons." for i in (1, 2, 3)]


def test_hyphenated_line_breaks_are_joined_but_real_hyphens_stay():
    """"exam-/ple" becomes "example"; "Anglo-/Saxon" (capital after the break) keeps its hyphen."""
    out = extract_document(make_pdf([["This is an exam-", "ple of a broken word.", "The Anglo-", "Saxon era."]]), "pdf")
    assert "example of a broken word." in out.text
    assert "Anglo-\nSaxon" in out.text


def test_a_word_hyphenated_across_a_page_break_is_joined_on_the_first_page():
    """The word's tail moves up, so the page map stays honest about where the word is."""
    out = extract_document(make_pdf([["The first page ends with a hyphen-"], ["ated word and goes on."]]), "pdf")
    assert page_text(out, 1).endswith("hyphenated")
    assert page_text(out, 2) == "word and goes on."


def test_ligatures_are_spelled_out_and_nothing_else_is_compatibility_normalised():
    """ﬁ/ﬂ glyphs become "fi"/"fl"; a superscript two is left alone (NFKC on ligatures only)."""
    out = extract_document(make_pdf([["The \ufb01rst \ufb02oor costs 5 m\u00b2."]]), "pdf")
    assert "The first floor costs 5 m\u00b2." in out.text
    assert "\ufb01" not in out.text and "\ufb02" not in out.text


def test_an_encrypted_pdf_is_refused_without_a_password_and_opened_with_it():
    """No password: a clear request for one; the right one opens it; a wrong one says so."""
    data = encrypt_pdf(make_pdf([["Secret minutes of the heron society."]]), "s3cret")
    with pytest.raises(InvalidArgument, match="password-protected; give its password"):
        extract_document(data, "pdf")
    assert "Secret minutes" in extract_document(data, "pdf", password="s3cret").text
    with pytest.raises(InvalidArgument, match="password for this PDF is wrong"):
        extract_document(data, "pdf", password="guess")


def test_a_truncated_pdf_fails_with_a_clear_message():
    """A download cut in half is reported as damaged or truncated, not as a crash."""
    data = make_pdf([["Some text on a page."]] * 3)
    with pytest.raises(InvalidArgument, match="damaged or truncated"):
        extract_document(data[: len(data) // 2], "pdf")


def test_a_corrupt_pdf_fails_with_a_clear_message():
    """Garbage between a PDF header and %%EOF is damaged, whatever pypdf thinks of it."""
    with pytest.raises(InvalidArgument, match="damaged or truncated"):
        extract_document(b"%PDF-1.7\n" + bytes(range(256)) * 8 + b"\n%%EOF\n", "pdf")


def test_a_pdf_without_a_text_layer_says_ocr_is_not_supported():
    """Pages that only draw (a scan) give the OCR message."""
    with pytest.raises(InvalidArgument, match=r"no text layer \(scanned\?\); OCR is not supported yet"):
        extract_document(make_pdf([[], []]), "pdf")


def test_a_pdf_whose_text_decodes_to_symbol_soup_is_refused_not_returned_as_garbage():
    """Fonts without a Unicode map come out as punctuation; that is refused with a reason."""
    with pytest.raises(InvalidArgument, match="cannot be decoded"):
        extract_document(make_pdf([['"7+%-', "#$%& ()*+ ,-./ 0123"]]), "pdf")


# --- DOCX ------------------------------------------------------------------------------------


def test_docx_headings_lists_and_tables_come_out_as_markdown_in_document_order():
    """Title and headings become #, list items "- ", the table a Markdown table, all in order."""
    out = extract_document(make_docx(), "docx")
    text = out.text
    expected_order = ["# Field Guide", "An introduction", "# Herons", "Herons wade", "- Grey heron\n- Purple heron",
                      "| Bird | Length \\| cm |\n|---|---|\n| Grey heron | 95 |\n| Egret | 60 |", "## Owls",
                      "Owls hunt at night."]
    positions = [text.index(piece) for piece in expected_order]
    assert positions == sorted(positions)
    assert out.title == "Field Guide"
    assert out.pages == [{"page": 1, "start": 0, "end": len(text)}]


def test_a_docx_zip_bomb_is_refused_before_anything_is_parsed(monkeypatch):
    """A member that inflates 1000:1 is refused from the zip directory; python-docx never runs."""
    import docx

    monkeypatch.setattr(docx, "Document", lambda *a, **k: pytest.fail("parsed a zip bomb"))
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("[Content_Types].xml", "<Types/>")
        zf.writestr("word/document.xml", b" " * (8 * 1024 * 1024))
    with pytest.raises(InvalidArgument, match="zip bomb"):
        extract_document(buffer.getvalue(), "docx")


def test_a_docx_with_too_many_members_or_too_large_unpacked_is_refused(monkeypatch):
    """Member count and total unpacked size are capped too."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as zf:
        for i in range(docx_format.MAX_MEMBERS + 1):
            zf.writestr(f"word/media/{i}.bin", b"")
    with pytest.raises(InvalidArgument, match="files inside"):
        extract_document(buffer.getvalue(), "docx")
    monkeypatch.setattr(docx_format, "MAX_TOTAL_BYTES", 10_000)
    with pytest.raises(InvalidArgument, match="unpacks to"):
        extract_document(make_docx(), "docx")


def test_an_ole_file_posing_as_docx_is_reported_as_password_protected():
    """Encrypted Office files are OLE containers; both sniffing and the DOCX parser say so."""
    ole = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + b"\x00" * 1000 + "EncryptedPackage".encode("utf-16-le") + b"\x00" * 100
    with pytest.raises(InvalidArgument, match="password-protected DOCX is not supported"):
        detect_type(ole, "minutes.docx")
    with pytest.raises(InvalidArgument, match="password-protected DOCX is not supported"):
        extract_document(ole, "docx")


# --- sniffing --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "filename", "content_type", "expected"),
    [
        (make_pdf([["x"]]), None, None, "pdf"),
        (make_pdf([["x"]]), "paper.pdf", "application/pdf", "pdf"),
        (make_pdf([["x"]]), "2502.13189", "text/html", "pdf"),  # servers mislabel; content wins
        (make_docx(), None, None, "docx"),
        (b"<!DOCTYPE html><html><body><p>hi</p></body></html>", None, None, "html"),
        (b"<p>hi</p>", "page.htm", None, "html"),
        (b"# Title\n\nSome *markdown*.", None, None, "markdown"),
        (b"plain words", "notes.md", None, "markdown"),
        (b"plain words", None, "text/plain; charset=utf-8", "text"),
        (b'{"question": "q", "answer": "a"}\n', None, None, "qa_jsonl"),
        (b"question,answer\nq,a\n", None, None, "qa_csv"),
        (b"anything", "pairs.csv", None, "qa_csv"),
    ],
)
def test_detect_type_sniffs_content_first_and_uses_names_to_refine(data, filename, content_type, expected):
    """Magic bytes decide binary types; names and content types pick among textual ones."""
    assert detect_type(data, filename, content_type) == expected


@pytest.mark.parametrize(
    ("data", "filename", "content_type", "message"),
    [
        (make_pdf([["x"]]), "report.docx", None, r"'report.docx' says a Word \(DOCX\) document but the content is a PDF"),
        (b"<html><body>Login</body></html>", "paper.pdf", None, "'paper.pdf' says a PDF but the content is an HTML page"),
        (b"<html><body>Login</body></html>", None, "application/pdf", "'application/pdf' says a PDF but the content is"),
        (make_docx(), "notes.txt", None, "'notes.txt' says plain text but the content is a Word"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 50, "scan.pdf", None, "says a PDF but the file is a PNG image"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 50, None, None, "unsupported file type: the file is a PNG image"),
        (b"whatever", "sheet.xlsx", None, "spreadsheets are not supported"),
    ],
)
def test_content_that_contradicts_its_name_is_refused_naming_both(data, filename, content_type, message):
    """The refusal says what the name claimed and what the bytes are."""
    with pytest.raises(InvalidArgument, match=message):
        detect_type(data, filename, content_type)


def test_an_empty_document_is_refused_at_every_step():
    """Empty bytes, whitespace, and markup with no words all fail with a clear message."""
    with pytest.raises(InvalidArgument, match="the document is empty"):
        detect_type(b"", "empty.txt")
    with pytest.raises(InvalidArgument, match="the document is empty"):
        extract_document(b"  \n\t ", "text")
    with pytest.raises(InvalidArgument, match="the document has no text"):
        extract_document(b"<html><script>x()</script><nav>Home</nav></html>", "html")
    import docx

    buffer = io.BytesIO()
    docx.Document().save(buffer)
    with pytest.raises(InvalidArgument, match="the document has no text"):
        extract_document(buffer.getvalue(), "docx")


def test_unknown_document_types_are_refused():
    """extract_document and the old extract() only take the types they know."""
    with pytest.raises(InvalidArgument, match="unsupported document type"):
        extract_document(b"data", "pptx")
    with pytest.raises(InvalidArgument, match="unsupported source kind"):
        extract(b"data", "rtf")
    assert extract(b"pasted text", "text").text == "pasted text\n"


# --- HTML ------------------------------------------------------------------------------------


def test_html_keeps_the_title_and_main_text_without_scripts_styles_or_navigation():
    """Scripts, styles, nav, banner header, sidebar and footer go; the article and its title stay."""
    page = """<!doctype html><html><head><meta charset="utf-8"><title>Heron Facts &amp; Figures</title>
    <style>body { color: red }</style><script>var tracking = "<p>no</p>";</script></head><body>
    <header><nav><a href="/">Home</a><a href="/about">About us</a></nav></header>
    <aside>Related: buy binoculars</aside>
    <main><article><header><h1>Herons</h1></header>
    <p>Herons are <b>long-legged</b> birds.<br>They eat fish.</p>
    <ul><li>Grey heron</li><li>Great egret</li></ul>
    <table><tr><th>Bird</th><th>cm</th></tr><tr><td>Grey heron</td><td>95</td></tr></table>
    <div hidden>invisible text</div></article></main>
    <footer>Copyright 2025 Bird Site</footer><script>track()</script></body></html>"""
    out = extract_document(page.encode(), "html")
    assert out.title == "Heron Facts & Figures"
    for gone in ("tracking", "color", "Home", "About us", "binoculars", "Copyright", "invisible", "track()"):
        assert gone not in out.text
    assert out.text.startswith("# Heron Facts & Figures\n\n# Herons\n\nHerons are long-legged birds.\nThey eat fish.")
    assert "- Grey heron\n- Great egret" in out.text
    assert "| Bird | cm |\n|---|---|\n| Grey heron | 95 |" in out.text


def test_html_declared_charset_is_honoured():
    """A latin-1 page that says so in <meta> decodes right."""
    page = '<html><head><meta charset="iso-8859-1"></head><body><p>Caf\xe9 cr\xe8me</p></body></html>'
    assert "Café crème" in extract_document(page.encode("latin-1"), "html").text


# --- text encodings --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        "Café – naïve “quotes”".encode(),
        "\ufeffCafé – naïve “quotes”".encode(),
        "Café – naïve “quotes”".encode("utf-16"),  # with BOM
        "Café – naïve “quotes”".encode("utf-16-le"),  # without BOM
        "Café – naïve “quotes”".encode("utf-32"),
        "Café – naïve “quotes”".encode("cp1252"),
    ],
    ids=["utf-8", "utf-8-bom", "utf-16-bom", "utf-16-le-no-bom", "utf-32", "cp1252"],
)
def test_text_files_decode_whatever_their_encoding(data):
    """BOMs, UTF-8, BOM-less UTF-16 and Windows-1252 all give the same text."""
    assert extract_document(data, "text").text == "Café – naïve “quotes”\n"


def test_text_is_nfc_normalised_and_latin1_falls_back_cleanly():
    """Decomposed accents are composed; bytes that are not UTF-8 fall back to a legacy code page."""
    decomposed = unicodedata.normalize("NFD", "Ångström").encode()
    assert extract_document(decomposed, "text").text == "Ångström\n"
    assert extract_document("Straße".encode("latin-1"), "markdown").text == "Straße\n"


def test_binary_data_is_not_decoded_as_text():
    """Bytes full of NULs and control characters are refused, not turned into mojibake."""
    with pytest.raises(InvalidArgument, match="not text"):
        extract_document(bytes(range(32)) * 40, "text")


# --- question-answer files -------------------------------------------------------------------


def test_qa_jsonl_accepts_question_answer_and_openai_chat_lines():
    """Both shapes give pairs; system messages are skipped; the text form lists them."""
    lines = [
        {"question": "What do herons eat?", "answer": "Fish."},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where do they nest?"},
                      {"role": "assistant", "content": "In colonies."}]},
    ]
    data = ("\n".join(json.dumps(x) for x in lines) + "\n\n").encode()
    assert detect_type(data, "pairs.jsonl") == "qa_jsonl"
    out = extract_document(data, "qa_jsonl")
    assert out.qa_pairs == [
        {"question": "What do herons eat?", "answer": "Fish."},
        {"question": "Where do they nest?", "answer": "In colonies."},
    ]
    assert out.text.startswith("Q: What do herons eat?\nA: Fish.")


def test_qa_jsonl_errors_name_their_line_numbers():
    """A broken JSON line and a line without an answer are both reported with their numbers."""
    data = b'{"question": "q1", "answer": "a1"}\n\n{"question": "q3", "answer": \n{"question": "q4"}\n'
    with pytest.raises(InvalidArgument) as caught:
        extract_document(data, "qa_jsonl")
    assert "line 3: not valid JSON" in caught.value.message
    assert "line 4: 'answer' is missing or empty" in caught.value.message


def test_qa_csv_reads_pairs_with_quoted_multiline_fields():
    """The header names the columns; quoted commas and newlines survive."""
    data = b'Answer,Question\n"Fish, mostly.",What do herons eat?\n"In colonies,\nnear water.",Where do they nest?\n'
    out = extract_document(data, "qa_csv")
    assert out.qa_pairs == [
        {"question": "What do herons eat?", "answer": "Fish, mostly."},
        {"question": "Where do they nest?", "answer": "In colonies,\nnear water."},
    ]


def test_qa_csv_errors_name_their_line_numbers():
    """A row missing its answer is reported by its physical line; a missing header is explained."""
    data = b'question,answer\n"q1","a1\nstill a1"\nq2,\nq3,a3\n'
    with pytest.raises(InvalidArgument, match="line 4: 'answer' is missing or empty"):
        extract_document(data, "qa_csv")
    with pytest.raises(InvalidArgument, match="header row with 'question' and 'answer'"):
        extract_document(b"q,a\nx,y\n", "qa_csv")
