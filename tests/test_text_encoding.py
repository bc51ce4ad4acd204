"""Text encodings beyond UTF-8 and cp1252 (charset-normalizer): Cyrillic in cp1251 and Japanese in
Shift-JIS come out as written, Western text in cp1252 keeps its accents, BOMs and a declared charset
win, binary data is refused; through `decode_text` and through the ingest worker's extraction
(format detection, then the sandboxed parser)."""

from __future__ import annotations

import pytest

from doclora.v1 import session_pb2
from services.common.config import Settings
from services.common.errors import InvalidArgument
from services.ingest.formats.text import decode_text
from services.ingest.worker import _extract_blocking

RUSSIAN = (
    "Москва — столица России и крупнейший город страны. Через город протекает река Москва, "
    "а в его центре стоит Кремль с соборами и башнями.\n"
)
JAPANESE = "東京は日本の首都です。春には桜が咲き、多くの人が上野公園を訪れます。秋には紅葉が美しいです。\n"
WESTERN = "L'été dernier, nous sommes allés à Nîmes ; la crème brûlée était « géniale » — 12 € seulement.\n"

CASES = {
    "cp1251-russian": (RUSSIAN.encode("cp1251"), RUSSIAN),
    "shift-jis-japanese": (JAPANESE.encode("shift_jis"), JAPANESE),
    "cp1252-western": (WESTERN.encode("cp1252"), WESTERN),
    "utf-16-bom": (RUSSIAN.encode("utf-16"), RUSSIAN),
    "utf-8": (JAPANESE.encode(), JAPANESE),
}


@pytest.mark.parametrize(("data", "text"), CASES.values(), ids=CASES.keys())
def test_decode_text_finds_the_encoding(data, text):
    assert decode_text(data) == text


def test_a_declared_charset_is_honoured_and_a_bom_wins_over_it():
    """A charset that decodes the bytes is used as declared; a byte-order mark overrides it."""
    assert decode_text("Grüße".encode("cp1250"), "iso-8859-2") == "Grüße"
    plain = RUSSIAN.replace("—", "-")  # KOI8-R has no dash
    assert decode_text(plain.encode("koi8-r"), "koi8-r") == plain
    assert decode_text("\ufeff".encode() + WESTERN.encode(), "cp1251") == WESTERN
    assert decode_text(RUSSIAN.encode("cp1251"), "no-such-charset") == RUSSIAN


@pytest.mark.parametrize(
    "data",
    [bytes(range(32)) * 40, bytes(range(256)) * 16, b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4],
    ids=["controls", "all-bytes", "png-like"],
)
def test_binary_data_is_refused(data):
    with pytest.raises(InvalidArgument, match="not text"):
        decode_text(data)


@pytest.mark.parametrize(
    ("name", "data", "text"),
    [
        ("moskva.txt", *CASES["cp1251-russian"]),
        ("tokyo.md", *CASES["shift-jis-japanese"]),
        ("nimes.txt", *CASES["cp1252-western"]),
    ],
)
def test_an_uploaded_text_file_is_ingested_in_its_own_script(name, data, text):
    """The ingest worker's extraction of an upload (detect the type, parse in the sandbox)."""
    doc = session_pb2.DocumentInfo(doc_id="d1", name=name)
    fmt, out = _extract_blocking(Settings(), data, doc, None, "text/plain")
    assert fmt in ("text", "markdown")
    assert out.text.strip() == text.strip()


def test_an_uploaded_binary_file_is_refused_by_the_ingest_path():
    doc = session_pb2.DocumentInfo(doc_id="d1", name="notes.txt")
    with pytest.raises(InvalidArgument):
        _extract_blocking(Settings(), bytes(range(256)) * 16, doc, None, "text/plain")
