"""Property tests (hypothesis) of the text paths hostile files reach: the chunker, the noise cleaner,
the QA pair importers and exporters, and the decoding of text files. Each never fails on any input
but with its module's documented error (`InvalidArgument` and its `FormatError`, or the chunker's
ValueError for bad sizes), and keeps its invariants: chunks are in-order slices of the text within
the size limit that lose no content, cleaning keeps offsets and lets no noise into a chunk, and
pairs come back from their own export unchanged."""

from __future__ import annotations

import csv
import io
import json
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.common.errors import InvalidArgument
from services.common.jsonl import from_jsonl, to_jsonl
from services.common.pair_formats import FORMATS, export_jsonl, import_jsonl
from services.common.qapair import QAPair, loose_pair, pair_id_for
from services.ingest.formats import qa
from services.ingest.formats.text import decode_text
from services.qagen import clean
from services.qagen.chunk import chunk_text, split_sentences

# the same examples on every run (CI must not go red by chance); run with --hypothesis-seed=N or
# edit this to explore further
FAST = settings(
    max_examples=200, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)

# Markdown-ish text: words, sentence ends, list markers, headings, fences, blank lines, odd spaces
PIECES = st.sampled_from(
    ["word", "Ab", "x", "1.", "Dr.", "e.g.", "? ", "! ", ". ", " ", "  ", "\n", "\n\n", "# ", "## T\n",
     "===\n", "---\n", "- ", "* ", "> ", "| a | b |\n", "```\n", "~~~", "\t", "é", "日本", "\u2028", "🙂",
     "[3] ", "Fig. 2", "0K 32K 64K\n", "Smith, J. (2020). Title. Journal.\n"]
)  # fmt: skip
DOCS = st.one_of(st.text(max_size=400), st.lists(PIECES, max_size=120).map("".join))
# a question or answer as the importers keep it: stripped, non-empty text of any characters
FIELD = st.text(min_size=1, max_size=60).map(str.strip).filter(bool)


MARKER_ONLY = re.compile(r"(?:[-*+•]|\d{1,3}[.)]|>)+")


def _no_headings(text: str) -> bool:
    """Text whose every non-space character is body text: heading lines are left out of chunks."""
    return not any(ch in text for ch in "#=-")


@FAST
@given(DOCS, st.integers(1, 300), st.data())
def test_chunks_are_in_order_slices_within_the_limit(text, max_chars, data):
    overlap = data.draw(st.integers(0, max_chars - 1))
    chunks = chunk_text(text, doc_id="d", max_chars=max_chars, overlap_chars=overlap)
    for prev, ch in zip([None, *chunks], chunks, strict=False):
        assert 0 <= ch.start < ch.end <= len(text) and ch.text == text[ch.start : ch.end]
        assert len(ch.text) <= max_chars
        assert ch.text == ch.text.strip() != ""  # a chunk starts and ends on content
        if prev is not None:
            assert prev.start < ch.start and prev.end < ch.end  # text order, each chunk moves on
            if ch.part:
                assert ch.overlap == max(0, prev.end - ch.start) <= overlap
            else:
                assert ch.start >= prev.end  # sections never share text
    assert chunks == chunk_text(text, doc_id="d", max_chars=max_chars, overlap_chars=overlap)


@FAST
@given(DOCS.filter(_no_headings), st.integers(1, 300), st.data())
def test_chunks_lose_no_text(text, max_chars, data):
    """Without headings every non-space character lies in some chunk, but for a list or quote marker
    that a piece holds alone ("-", "1.", ">": not content, so not a chunk of its own)."""
    overlap = data.draw(st.integers(0, max_chars - 1))
    covered = set()
    for ch in chunk_text(text, doc_id="d", max_chars=max_chars, overlap_chars=overlap):
        covered.update(range(ch.start, ch.end))
    lost = "".join(c if not c.isspace() and i not in covered else " " for i, c in enumerate(text))
    assert all(MARKER_ONLY.fullmatch(run) for run in lost.split()), lost.split()


@given(st.text(max_size=50), st.integers(-5, 5), st.integers(-5, 5))
@FAST
def test_bad_chunk_sizes_are_a_value_error(text, max_chars, overlap):
    if max_chars > 0 and 0 <= overlap < max_chars:
        chunk_text(text, doc_id="d", max_chars=max_chars, overlap_chars=overlap)
    else:
        with pytest.raises(ValueError):
            chunk_text(text, doc_id="d", max_chars=max_chars, overlap_chars=overlap)


@FAST
@given(DOCS)
def test_sentences_are_ordered_trimmed_spans(text):
    pos = 0
    for s, e in split_sentences(text):
        assert pos <= s < e <= len(text)
        assert not text[s].isspace() and not text[e - 1].isspace()
        pos = e


@FAST
@given(DOCS)
def test_masking_noise_keeps_every_offset_and_every_other_character(text):
    spans = clean.noise_spans(text)
    pos = 0
    for s, e, kind in spans:
        assert pos <= s < e <= len(text) and kind in clean.KINDS
        pos = e
    masked = clean.mask_noise(text, spans)
    assert len(masked) == len(text)
    noise = {i for s, e, _ in spans for i in range(s, e)}
    for i, (a, b) in enumerate(zip(text, masked, strict=True)):
        assert b == (a if i not in noise or a == "\n" else " ")


@FAST
@given(DOCS, st.integers(20, 300))
def test_clean_chunks_are_slices_that_hold_no_noise(text, max_chars):
    spans = clean.noise_spans(text)

    def chunker(t: str):
        return chunk_text(t, doc_id="d", max_chars=max_chars, overlap_chars=max_chars // 8)

    chunks = clean.chunk_clean(text, chunker, doc_id="d")
    for ch in chunks:
        assert ch.text == text[ch.start : ch.end] and len(ch.text) <= max_chars
        assert not any(ch.start < e and s < ch.end for s, e, _ in spans), (ch, spans)


def _generated(q: str, a: str, n: int) -> QAPair:
    """A pair generated from chunk `n` of document "d"."""
    chunk = f"c{n}"
    return QAPair(pair_id_for(chunk, q, a), q, a, "d", chunk, n, n + 10, "factual", 0.5, (chunk,))


@FAST
@given(st.lists(st.tuples(FIELD, FIELD), min_size=1, max_size=5), st.sampled_from(FORMATS), st.booleans())
def test_pairs_come_back_from_their_own_export(raw, fmt, detect):
    """import(export(pairs)) == pairs, in each format, given or detected, for any text (U+2028, U+0085
    and other line separators included); without the metadata they come back as imported pairs."""
    pairs = [_generated(q, a, n) for n, (q, a) in enumerate(raw)]
    given_fmt = None if detect else fmt
    exported = export_jsonl(pairs, fmt, include_meta=True)
    for ending in ("\n", "\r\n", "\r"):  # a file saved on Windows or an old Mac reads the same
        assert import_jsonl(exported.replace("\n", ending), given_fmt, doc_id="d") == pairs
    bare = [loose_pair(pair_id_for("d:imported", q, a), q, a, "d", "imported") for q, a in raw]
    assert import_jsonl(export_jsonl(pairs, fmt), given_fmt, doc_id="d") == bare


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)
KEYS = st.sampled_from(["messages", "conversations", "instruction", "input", "output", "doclora", "role",
                        "content", "from", "value", "question", "answer", "prompt", "completion", "text"])  # fmt: skip
RECORDS = st.dictionaries(
    KEYS, JSON | st.lists(st.dictionaries(KEYS, JSON, max_size=3), max_size=3), max_size=5
)
LINES = st.lists(st.one_of(RECORDS.map(json.dumps), JSON.map(json.dumps), st.text(max_size=30)), max_size=6)


@FAST
@given(LINES, st.sampled_from([None, *FORMATS]))
def test_importing_any_lines_gives_pairs_or_a_format_error(lines, fmt):
    try:
        pairs = import_jsonl("\n".join(lines), fmt, doc_id="d")
    except InvalidArgument as exc:
        assert str(exc)
        return
    assert all(p.question and p.answer for p in pairs)


@FAST
@given(st.one_of(LINES.map(lambda ls: "\n".join(ls).encode()), st.binary(max_size=200)))
def test_the_qa_file_formats_take_any_bytes_with_at_most_an_invalid_argument(data):
    for extract in (qa.extract_jsonl, qa.extract_csv):
        try:
            out = extract(data)
        except InvalidArgument as exc:
            assert str(exc)
            continue
        assert out.qa_pairs and all(p["question"] and p["answer"] for p in out.qa_pairs)


def _nfc_fields() -> st.SearchStrategy[str]:
    import unicodedata

    # no control characters: a CSV file full of them is refused as binary data (`decode_text`)
    chars = st.characters(blacklist_categories=("Cc", "Cs"))
    return (
        st.text(chars, min_size=1, max_size=60)
        .map(lambda s: unicodedata.normalize("NFC", s).strip())
        .filter(bool)
    )


@FAST
@given(st.lists(st.tuples(_nfc_fields(), _nfc_fields()), min_size=1, max_size=5))
def test_a_person_s_qa_file_gives_back_its_pairs_as_jsonl_json_and_csv(raw):
    want = [{"question": q, "answer": a} for q, a in raw]
    as_lines = "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in want)
    assert qa.extract_jsonl(as_lines.encode()).qa_pairs == want
    assert qa.extract_jsonl(json.dumps(want).encode()).qa_pairs == want
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["question", "answer"])
    writer.writerows(raw)
    assert qa.extract_csv(out.getvalue().encode()).qa_pairs == want


@FAST
@given(st.binary(max_size=300), st.sampled_from([None, "utf-8", "latin-1", "cp1252", "utf-16", "no-such"]))
def test_any_bytes_decode_to_text_or_an_invalid_argument(data, charset):
    try:
        text = decode_text(data, charset)
    except InvalidArgument as exc:
        assert str(exc)
        return
    assert isinstance(text, str)
    text.encode("utf-8")  # whatever comes back can be stored and sent over gRPC


@FAST
@given(
    st.text(st.characters(blacklist_categories=("Cc", "Cs")), max_size=200).filter(
        lambda t: not t.startswith("\ufeff")
    )
)
def test_utf8_text_decodes_to_itself(text):
    assert decode_text(text.encode("utf-8")) == text


@FAST
@given(st.lists(st.dictionaries(st.text(max_size=8), st.text(max_size=40), max_size=3), max_size=5))
def test_stored_json_lines_come_back_as_written(rows):
    """Chunks and pairs in the store (services/common/jsonl.py) survive any text, U+2028 and
    U+0085 included (str.splitlines cut such a row in two: a session's pairs became unreadable)."""
    assert from_jsonl(to_jsonl(rows)) == rows
