"""HTML to text: doclora's extractor (services/ingest/formats/html.py, stdlib `HTMLParser` and
heuristics) against `trafilatura`, on the saved pages of bench/html_pages/. A measurement, not a
switch (issue 16).

Each page `<name>.html` comes with `<name>.json`: the sentences that are the page's main text and
the sentences that are boilerplate (navigation, banners, related links, comments, footers), written
by hand. For each extractor and page it prints main-text recall (share of main sentences kept),
boilerplate kept (share of boilerplate sentences left in) and the time per page; then the totals
over all sentences. trafilatura is not a doclora dependency: without it, the bench says so and
measures doclora alone.

    .venv/bin/pip install trafilatura==2.3.1   # for the comparison only
    .venv/bin/python bench/bench_html_extract.py [--rounds 20]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
import unicodedata
from collections.abc import Callable
from html.parser import HTMLParser
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.ingest.formats.html import extract as doclora_extract  # noqa: E402

PAGES = Path(__file__).resolve().parent / "html_pages"
_QUOTES = str.maketrans({"“": '"', "”": '"', "‘": "'", "’": "'", "«": '"', "»": '"', "\xa0": " "})


def normalise(text: str) -> str:
    """Lower case, plain quotes, no Markdown emphasis or code marks, single spaces."""
    text = unicodedata.normalize("NFKC", text).translate(_QUOTES).lower()
    text = re.sub(r"[*`]+", "", text)
    return re.sub(r"\s+", " ", text).strip()


class _AllText(HTMLParser):
    """Every text node outside script/style: what a page contains at all (to check the lists)."""

    def __init__(self):
        super().__init__()
        self.parts: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag, attrs):
        self._skip += tag in ("script", "style")

    def handle_endtag(self, tag):
        self._skip -= tag in ("script", "style") and self._skip > 0

    def handle_data(self, data):
        if not self._skip:
            self.parts.append(data)


def all_text(html: bytes) -> str:
    parser = _AllText()
    parser.feed(html.decode("utf-8"))
    return "".join(parser.parts)


def load_pages() -> list[tuple[str, bytes, dict[str, list[str]]]]:
    pages = []
    for path in sorted(PAGES.glob("*.html")):
        html = path.read_bytes()
        labels = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
        everything = normalise(all_text(html))
        missing = [
            s for kind in ("main", "boilerplate") for s in labels[kind] if normalise(s) not in everything
        ]
        if missing:
            raise SystemExit(f"{path.name}: listed sentences not on the page: {missing}")
        pages.append((path.stem, html, labels))
    return pages


def extractors() -> dict[str, Callable[[bytes], str]]:
    found: dict[str, Callable[[bytes], str]] = {"doclora": lambda html: doclora_extract(html).text}
    try:
        import trafilatura
    except ImportError:
        print(
            "trafilatura is not installed: measuring doclora's extractor alone "
            "(.venv/bin/pip install trafilatura to compare)\n"
        )
        return found

    # comments are not the document's text for a QA bot; tables are (infoboxes, parameter tables)
    def plain(html: bytes, **options) -> str:
        return trafilatura.extract(html, include_comments=False, include_tables=True, **options) or ""

    found["trafilatura"] = plain
    found["trafilatura recall"] = lambda html: plain(html, favor_recall=True)
    return found


def share(sentences: list[str], text: str) -> tuple[int, int]:
    """How many of `sentences` occur in `text`, and how many there are."""
    got = normalise(text)
    return sum(normalise(s) in got for s in sentences), len(sentences)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=20, help="timed extractions per page and extractor")
    ap.add_argument("--show", default="", help="print one extractor's output for each page (a name)")
    args = ap.parse_args(argv)
    pages = load_pages()
    tools = extractors()
    header = f"{'page':<8} {'extractor':<19} {'main kept':>13} {'boilerplate kept':>17} {'ms/page':>8}"
    print(header)
    print("-" * len(header))
    totals = {name: [0, 0, 0, 0, 0.0] for name in tools}
    for page, html, labels in pages:
        for name, run in tools.items():
            text = run(html)
            times = []
            for _ in range(args.rounds):
                started = time.perf_counter()
                run(html)
                times.append(time.perf_counter() - started)
            ms = 1000 * statistics.median(times)
            main_kept, main_n = share(labels["main"], text)
            boiler_kept, boiler_n = share(labels["boilerplate"], text)
            t = totals[name]
            t[0], t[1], t[2], t[3], t[4] = (
                t[0] + main_kept,
                t[1] + main_n,
                t[2] + boiler_kept,
                t[3] + boiler_n,
                t[4] + ms,
            )
            print(
                f"{page:<8} {name:<19} {main_kept:>3}/{main_n:<3} {main_kept / main_n:>5.0%} "
                f"{boiler_kept:>5}/{boiler_n:<3} {boiler_kept / boiler_n:>6.0%} {ms:>8.2f}"
            )
            if name == args.show:
                print(f"\n--- {page} / {name} ---\n{text}\n---")
    print("-" * len(header))
    for name, (mk, mn, bk, bn, ms) in totals.items():
        print(
            f"{'overall':<8} {name:<19} {mk:>3}/{mn:<3} {mk / mn:>5.0%} {bk:>5}/{bn:<3} {bk / bn:>6.0%} "
            f"{ms / len(pages):>8.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
