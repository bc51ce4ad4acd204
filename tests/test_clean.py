"""Noise kept out of chunks (services/qagen/clean.py): reference lists, author blocks, figure axis
text and page furniture are found and blanked, content around them stays, and the qagen path chunks
only content while every chunk stays a slice of the original text."""

from __future__ import annotations

import logging
import re

import pytest

from services.common import keys
from services.common.errors import InvalidArgument
from services.common.jsonl import from_jsonl
from services.qagen.clean import mask_noise, noise_spans
from services.qagen.extractive import chunk_document, make_pairs
from tests.test_qagen_worker import TENANT, _pairs, _run, _session, rt  # noqa: F401

PAPER = """\
# Tidewell: Adaptive Message Batching for Solar-Powered Sensor Gateways

Teodora Vashkin (1), Rupert Altenholm (1), Mirela Okonjo-Brandt (2)

(1) Velmont Institute for Distributed Sensing, 4 Harbour Terrace, Oskarhavn

(2) Department of Marine Engineering, Carrow Bay Polytechnic, Carrow Bay

t.vashkin@velmont-ids.example, m.okonjo-brandt@carrowbay-poly.example

# Abstract

Solar-powered gateways spend most of their energy on the cellular modem. We present Tidewell, a
scheduler that holds routine traffic in batches whose length follows a forecast of the energy
budget. Tidewell lowered the mean gateway power from 2.31 W to 1.74 W on 48 gateways.

# 1. Introduction

Gateways relay readings from sensor nodes over a cellular link. Earlier measurements found that
the modem used between 41% and 63% of gateway energy, as shown in [4]. Fixed batching was studied
by Lindqvist et al. [2], who reported savings of about 30% but a tenfold rise in latency.

# 2. Results

The median alarm latency fell from 412 ms to 187 ms under Tidewell.

Figure 2: Latency by hour of day at Site B.

0 25 50 75 100

Latency (ms)

0K 32K 64K 96K 128K

Messages per day

Alarms at Site B were delivered within a second on every day of the study, and the field crews
made 37 site visits instead of 58.

| Site | Gateways | Nodes |
|---|---|---|
| Site A | 16 | 212 |

# References

[1] H. Arnesby, K. Tollund. Energy accounting for cellular backhaul. Journal of Field Instrumentation, 14(2):88-103, 2019.

[2] P. Lindqvist, R. Oyelaran. Aggregation at the edge. Proceedings of the Workshop on Embedded Sensing, 2018.

[3] S. Kerrow, D. Ballantyne-Hsu. Lightweight solar energy prediction. Transactions on Sustainable Systems, 2017.

[4] A. Pradhoma, J. Keel. Where the joules go. Proceedings of the Conference on Rural Networks, 2020.
"""


def masked_kinds(text: str) -> dict[str, str]:
    """Each kind of noise found in `text`, with the text of its spans joined."""
    found: dict[str, str] = {}
    for s, e, kind in noise_spans(text):
        found[kind] = found.get(kind, "") + text[s:e] + "\n"
    return found


@pytest.mark.parametrize(
    "text",
    [
        "# Findings\n\nThe pump failed twice in March.\n\n# References\n\n"
        "[1] A. Smith, B. Jones. Pumps and valves. Journal of Hydraulics, 12:1-9, 2019.\n\n"
        "[2] C. Lee. Valve wear in cold water. Proceedings of the Valve Conference, 2021.\n\n"
        "# Appendix A: Pump settings\n\nThe pump runs at 40 litres per minute.\n",
        "Findings\nThe pump failed twice in March.\nReferences\n"
        "1. Smith, J., Jones, B. Pumps and valves. Journal of Hydraulics, 12:1-9,\n2019.\n"
        "2. Lee, C. Valve wear in cold water. Proceedings of the Valve Conference, 2021.\n"
        "3. Park, D. Cold starts. Hydraulic Letters, 4:20-31, 2022.\n"
        "A Pump settings\nThe pump runs at 40 litres per minute.\n",
    ],
    ids=["markdown-bracketed", "plain-numbered"],
)
def test_a_reference_section_is_masked_to_its_end_and_an_appendix_after_it_is_mask_noise(text):
    """A References heading and its entries go; the appendix after it and the body before it stay."""
    out = mask_noise(text)
    assert "References" not in out and "Journal of Hydraulics" not in out and "2021" not in out
    assert "The pump failed twice in March." in out
    assert "Pump settings" in out and "The pump runs at 40 litres per minute." in out
    assert set(masked_kinds(text)) == {"references"}


def test_a_run_of_citation_entries_without_a_heading_is_masked():
    """Three or more citation entries in a row are a reference list even without a heading."""
    text = (
        "The survey drew on three sources.\n\n"
        "[7] N. Harrowgate, F. Odinga. Marrowby: adaptive duty cycling. Proceedings of the Symposium on Low-Power Wireless, 2019.\n"
        "[8] G. Feldt, Y. Carnaby. Storm-resilient masts for coastal telemetry. Coastal Engineering Practice, 31(4):330-341, 2020.\n"
        "[9] I. Quarrell, B. Somerton. Adapting sensing rates to harvested energy. Proceedings of the Workshop on Energy-Neutral Sensing, 2021.\n\n"
        "Each source was read twice.\n"
    )
    out = mask_noise(text)
    assert "Harrowgate" not in out and "Quarrell" not in out and "Feldt" not in out
    assert "The survey drew on three sources." in out and "Each source was read twice." in out


def test_a_sentence_that_cites_is_mask_noise():
    """In-text citations, numbered steps and dated sentences are content, not a reference list."""
    text = (
        "The modem used most of the energy, as shown in [3].\n"
        "Lindqvist et al. (2018) found savings of about 30%.\n"
        "1. Open the lid of the hub.\n"
        "2. In 2021, J. Smith replaced the battery.\n"
        "3. Close the lid.\n"
    )
    assert noise_spans(text) == []


def test_the_author_block_before_the_abstract_is_masked_but_the_title_is_mask_noise():
    """Names with markers, affiliations and e-mails before the abstract go; the title stays."""
    found = masked_kinds(PAPER)
    assert "Teodora Vashkin (1)" in found["authors"] and "Carrow Bay Polytechnic" in found["authors"]
    assert "t.vashkin@velmont-ids.example" in found["authors"]
    out = mask_noise(PAPER)
    assert out.startswith("# Tidewell: Adaptive Message Batching for Solar-Powered Sensor Gateways\n")
    assert "@" not in out and "Vashkin" not in out and "Velmont Institute" not in out
    assert "We present Tidewell" in out


def test_a_name_like_line_later_in_the_body_is_mask_noise():
    """Past the abstract, names and institutions are what the document is about."""
    text = (
        "# Field notes\n\nAbstract\n\nA season on the coast.\n\n## Crew\n\n"
        "Teodora Vashkin (1), Rupert Altenholm (1), Mirela Okonjo-Brandt (2)\n"
        "The hardware was assembled at the Velmont Institute workshop in Oskarhavn.\n"
        "Contact the crew at crew@velmont-ids.example.\n"
    )
    assert noise_spans(text) == []


def test_axis_ticks_and_their_labels_are_masked_but_the_caption_and_table_rows_are_mask_noise():
    """Tick dumps and axis titles go; the caption, table rows with words and prose stay."""
    text = (
        "Figure 2: Latency by hour of day at Site B.\n"
        "0 25 50 75 100\n"
        "Latency (ms)\n"
        "0K 32K 64K 96K 128K\n"
        "0$ 0.4$ 0.8$ 1.2$\n"
        "Cost per message\n"
        "The latency stayed low all day.\n\n"
        "E17 Door open too long 5 min\n"
        "| Site A | 16 | 212 |\n"
        "Brownout events 3 29 11\n"
    )
    found = masked_kinds(text)
    assert set(found) == {"figure"}
    for line in (
        "0 25 50 75 100",
        "Latency (ms)",
        "0K 32K 64K 96K 128K",
        "0$ 0.4$ 0.8$ 1.2$",
        "Cost per message",
    ):
        assert line in found["figure"]
    out = mask_noise(text)
    for line in (
        "Figure 2: Latency by hour of day at Site B.",
        "The latency stayed low all day.",
        "E17 Door open too long 5 min",
        "| Site A | 16 | 212 |",
        "Brownout events 3 29 11",
    ):
        assert line in out


def test_repeated_running_headers_and_page_numbers_are_masked():
    """A header line repeated down the document and "Page n of m" lines are furniture."""
    para = "The gateway forwards alarms at once and holds routine readings in batches. " * 8
    text = "".join(f"Tidewell — VIDS-TR-2023-07\n{para.strip()}\nPage {n} of 3\n\n" for n in (1, 2, 3))
    found = masked_kinds(text)
    assert set(found) == {"furniture"}
    assert found["furniture"].count("Tidewell — VIDS-TR-2023-07") == 3
    assert "Page 2 of 3" in found["furniture"]
    assert mask_noise(text).count("holds routine readings in batches") == 24


def test_masking_keeps_the_length_and_every_newline():
    """The masked text has the original's length, newlines where they were, and equals it outside noise."""
    out = mask_noise(PAPER)
    assert len(out) == len(PAPER)
    assert [i for i, c in enumerate(out) if c == "\n"] == [i for i, c in enumerate(PAPER) if c == "\n"]
    spans = noise_spans(PAPER)
    inside = {i for s, e, _ in spans for i in range(s, e)}
    assert all(out[i] == PAPER[i] for i in range(len(PAPER)) if i not in inside)
    assert all(out[i] in " \n" for i in inside)


@pytest.mark.parametrize("max_chars", [1200, 160])
def test_qagen_chunks_of_a_paper_hold_no_noise_and_index_the_original_text(max_chars):
    """Chunks (large, and small enough to straddle noise) are original slices without references,
    e-mails or tick lines, and their pairs come from content alone."""
    chunks = chunk_document(PAPER, "paper", max_chars=max_chars, overlap_chars=30)
    assert chunks
    for c in chunks:
        assert PAPER[c.start : c.end] == c.text
        assert c.text == c.text.strip() and not re.search(r"[ \n]{4,}", c.text)
        assert "@" not in c.text and "Pradhoma" not in c.text and "Journal of" not in c.text
        assert "0 25 50 75 100" not in c.text and "128K" not in c.text and "Latency (ms)" not in c.text
        assert 0 <= c.overlap < len(c.text)
    assert any("Figure 2: Latency by hour of day at Site B." in c.text for c in chunks)
    assert any("as shown in [4]" in c.text for c in chunks)
    pairs, _, _ = make_pairs(PAPER, "paper", "Tidewell", max_chars=max_chars, overlap_chars=30)
    assert pairs
    assert not any("Pradhoma" in p.answer or "@" in p.answer or "Vashkin" in p.question for p in pairs)


ONLY_REFERENCES = """\
References

[1] H. Arnesby, K. Tollund. Energy accounting for cellular backhaul. Journal of Field Instrumentation, 2019.
[2] P. Lindqvist, R. Oyelaran. Aggregation at the edge. Proceedings of the Workshop on Embedded Sensing, 2018.
[3] S. Kerrow, D. Ballantyne-Hsu. Lightweight solar energy prediction. Transactions on Sustainable Systems, 2017.
"""


def test_a_document_that_is_only_references_gives_no_chunks_and_not_enough_text():
    """All noise: no chunks, no pairs, and the "not enough text to learn from" reason."""
    assert chunk_document(ONLY_REFERENCES, "refs") == []
    pairs, chunks, stats = make_pairs(ONLY_REFERENCES, "refs")
    assert pairs == [] and chunks == []
    assert stats["error"].startswith("not enough text to learn from")


async def test_the_qagen_worker_stores_chunks_without_noise_and_leaves_the_text_whole(rt, caplog):  # noqa: F811
    """Through the worker: chunks.jsonl and the pairs hold no noise, the stored text is unchanged,
    and the log says how much of each kind was left out."""
    caplog.set_level(logging.INFO, logger="services.qagen.clean")
    rec = await _session(rt, {"paper": PAPER})
    await _run(rt, rec)
    assert re.search(
        r"paper: left out of chunks as noise: references \d+ chars, authors \d+ chars", caplog.text
    )
    chunks = from_jsonl(rt.store.get_bytes(keys.chunks(TENANT, rec.session_id)))
    assert chunks and all(PAPER[c["start"] : c["end"]] == c["text"] for c in chunks)
    assert not any("@" in c["text"] or "Pradhoma" in c["text"] or "128K" in c["text"] for c in chunks)
    assert not any("Pradhoma" in p["answer"] or "@" in p["answer"] for p in _pairs(rt, rec.session_id))
    assert rt.store.get_bytes(keys.doc_text(TENANT, rec.session_id, "paper")).decode() == PAPER


async def test_the_qagen_worker_fails_a_reference_list_alone_as_not_enough_text(rt):  # noqa: F811
    """A session whose one document is a reference list fails without inventing pairs."""
    rec = await _session(rt, {"refs": ONLY_REFERENCES})
    with pytest.raises(InvalidArgument, match="not enough text to learn from"):
        await _run(rt, rec)
    assert _pairs(rt, rec.session_id) == []
