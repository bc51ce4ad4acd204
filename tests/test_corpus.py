"""Real-world files from ../shared/corpus: each one yields readable text or fails with a clear reason.

Every file goes through `detect_type` and then `extract_document` in the sandbox, as the service
does, so a crash or a hang would show up here as such. Phrases below were read in the files by
hand. Skipped when the corpus folder is absent; the files are never copied into the repository.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from pathlib import Path

import pytest

from services.common.errors import InvalidArgument
from services.ingest.extract import detect_type, extract_document
from services.ingest.sandbox import run_sandboxed

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpus"
if not CORPUS.is_dir():
    pytest.skip(f"no corpus at {CORPUS}", allow_module_level=True)

FILES = sorted(p for folder in ("pdf", "docx", "paper") for p in (CORPUS / folder).glob("*") if p.is_file())

# the messages a person gets; anything else ("crashed", "took longer", "could not be parsed") fails
CLEAR_ERRORS = re.compile(
    "damaged or truncated|password-protected|password for this PDF is wrong|no text layer|cannot be decoded"
    "|the document has no text|not supported"
)

# file -> phrases its text must contain (read in the file by eye), or the error it must give
EXPECTED: dict[str, list[str] | re.Pattern] = {
    "corrupt_broken_xref_issue297.pdf": ["test example"],
    "corrupt_not_a_pdf_header_plus_eof.pdf": re.compile("the PDF is damaged or truncated"),
    "encrypted_aes256_crazyones_pw_password.pdf": ["The Crazy Ones", "The misfits. The rebels."],
    "encrypted_rc4_libreoffice_pw_openpassword.pdf": ["Lorem ipsum dolor sit amet, consetetur sadipscing elitr"],
    "fonts_truetype_no_unicode_mapping.pdf": re.compile("cannot be decoded"),
    "fonts_unusual_fontsampler.pdf": ["Roboto Mono: Hello World!", "Noto Sans Arabic: Hello World!"],
    "form_fields_libreoffice.pdf": ["Example for a Form", "Agree to privacy policy"],
    "google_docs_export_with_image.pdf": ["Beautiful is better than ugly.", "Readability counts."],
    "ligatures_pdfa_crazyones.pdf": ["The misfits.", "see things differently"],
    "long_117p_german_lecture_notes_geotopo.pdf": ["Geometrie und Topologie", "0. Auflage", "Vorwort"],
    "multipage_text_4pages_pdflatex.pdf": ["Hello, here is some text without a meaning."],
    "nonlatin_arabic_habibi.pdf": ["habibi", "حَبيبي"],
    "nonlatin_chinese_table_issue914.pdf": ["商品编码", "华联绿豆"],
    "nonlatin_multilang_hello_world.pdf": ["Hello World", "Привет, мир", "你好世界", "こんにちは世界"],
    "outline_bookmarks_pdflatex.pdf": ["Contents", "1 Foo"],
    "scanned_no_text_layer_epson_printout_wikipedia_ocr.pdf": re.compile(r"no text layer \(scanned\?\); OCR"),
    "scanned_no_text_layer_two_column_linn_brochure.pdf": re.compile(r"no text layer \(scanned\?\); OCR"),
    "scanned_with_ocr_layer_fmc_agreement_indirect_rotate.pdf": ["Agreement No. 010099-061", "APL Co. Pte Ltd."],
    "tables_geobase_nhn_data_model_19p.pdf": ["National Hydro Network", "Data Model"],
    "two_column_lorem_latex_multicolumn.pdf": ["Two-Column Document with Lorem Ipsum", "consectetuer adipiscing elit",
                                               "two columns filled"],
    "headers_footers_first_odd_even.docx": ["First page", "Second page", "Third page"],
    "heading_hierarchy_numbered.docx": ["# Test Document", "## Section 1.1", "### Section 1.2.3"],
    "headings_lists_table_image_word_sample.docx": ["# Swimming in the lake", "- Paddle about",
                                                    "| Berries | Blueberry, Strawberry, Cranberry | 150 |"],
    "inline_images_five.docx": re.compile("the document has no text"),
    "invalid_encrypted_cfb_not_zip_pw_Password1234_.docx": re.compile("password-protected DOCX is not supported"),
    "nested_bullet_numbered_lists.docx": ["- List item 2\n  - List item 1.1"],
    "paper_excerpt_headings_table_image_autogen.docx": ["# AutoGen: Enabling Next-Gen LLM Applications",
                                                        "AutoGen is an open-source framework"],
    "strict_ooxml_not_transitional.docx": ["Some text"],
    "tables_merged_cells_word_tables.docx": ["| Cell 1.0 | Merged Cell 1.1 1.2 |  |"],
    "vietnamese_numbered_headings_lists.docx": ["## Chính sách bảo hành", "ĐỐI TƯỢNG ÁP DỤNG"],
    "moba_mixture_of_block_attention_2025.pdf": ["MIXTURE OF BLOCK ATTENTION", "Mixture of Block Attention (MoBA)"],
    "deepseek_v3_2_exp_sparse_attention_2025.pdf": ["DeepSeek Sparse Attention", "lightning indexer"],
}


def password_in(name: str) -> str | None:
    """The corpus names encrypted files "..._pw_PASSWORD.ext"."""
    found = re.search(r"_pw_(.+)\.[a-z]+$", name)
    return found.group(1) if found else None


@functools.cache  # the 117-page file is read by two tests
def extract_file(path: Path, password: str | None = None):
    data = path.read_bytes()
    kind = detect_type(data, path.name)
    return run_sandboxed(extract_document, data, kind, password=password, timeout_s=120, memory_mb=1536)


def assert_readable(text: str) -> None:
    chars = [c for c in text if not c.isspace()]
    letters = sum(unicodedata.category(c).startswith("L") for c in chars)
    assert chars and letters / len(chars) > 0.2, "mostly not letters: garbage?"
    assert not [c for c in text if unicodedata.category(c) == "Cc" and c not in "\n\t"], "control characters"
    assert text.count("\ufffd") <= len(text) // 100, "replacement characters"


@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_every_corpus_file_gives_readable_text_or_a_clear_reason(path: Path):
    """No crash, no hang, no garbage: text that reads, or an InvalidArgument a person understands."""
    password = password_in(path.name)
    try:
        out = extract_file(path)
    except InvalidArgument as exc:
        if password and "password-protected; give its password" in exc.message:
            out = extract_file(path, password)  # the name tells us the password: it must open
        else:
            assert CLEAR_ERRORS.search(exc.message), f"unclear failure: {exc.message}"
            expected = EXPECTED.get(path.name)
            assert expected is None or isinstance(expected, re.Pattern), f"should have text: {exc.message}"
            if expected is not None:
                assert expected.search(exc.message), exc.message
            return
    assert_readable(out.text)
    expected = EXPECTED.get(path.name)
    assert not isinstance(expected, re.Pattern), f"should have failed with {expected.pattern!r}"
    for phrase in expected or []:
        assert phrase in out.text, phrase
    assert out.pages and out.pages[-1]["end"] <= len(out.text)


def test_an_encrypted_corpus_pdf_asks_for_its_password_and_refuses_a_wrong_one():
    """Without the password: asked for; with a wrong one: told so."""
    path = CORPUS / "pdf" / "encrypted_aes256_crazyones_pw_password.pdf"
    if not path.exists():
        pytest.skip("file not in this corpus")
    with pytest.raises(InvalidArgument, match="password-protected; give its password"):
        extract_file(path)
    with pytest.raises(InvalidArgument, match="password for this PDF is wrong"):
        extract_file(path, "not-the-password")


def test_the_long_lecture_notes_keep_one_page_map_entry_per_page_without_running_headers():
    """117 pages in, 117 page spans out; the "N SECTION TITLE" running headers are gone."""
    path = CORPUS / "pdf" / "long_117p_german_lecture_notes_geotopo.pdf"
    if not path.exists():
        pytest.skip("file not in this corpus")
    out = extract_file(path)
    assert [p["page"] for p in out.pages] == list(range(1, 118))
    assert "8 1.2. METRISCHE RÄUME" not in out.text
    assert "Metrische Räume" in out.text or "METRISCHE RÄUME" in out.text  # the section itself stays
