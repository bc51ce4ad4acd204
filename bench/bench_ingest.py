"""Pages per second extracting a generated 100-page text PDF: a plain pypdf page loop vs doclora's
`extract_document` (cleaning included) in process and in the sandbox. Prints the figures.

    .venv/bin/python bench/bench_ingest.py [--pages 100] [--rounds 7]

Runs are interleaved (plain, in-process, sandbox, plain, ...) so that load from other processes
hits all three alike; the median and the best round are reported (on a shared machine the best
round is the truer measure of the work itself).
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.ingest.extract import extract_document  # noqa: E402
from services.ingest.sandbox import run_sandboxed, warm_up  # noqa: E402

WORDS = ("the river floods every spring and farmers move their herds to the hills while engineers "
         "measure levels along the dikes and canals that were built over two centuries of careful work").split()


def _line(page: int, row: int) -> str:
    start = (page * 7 + row * 3) % len(WORDS)
    words = (WORDS * 3)[start:start + 13]
    return " ".join(words).capitalize() + "."


def _pdf_string(text: str) -> bytes:
    return b"(" + text.encode("cp1252").replace(b"\\", b"\\\\").replace(b"(", b"\\(").replace(b")", b"\\)") + b")"


def make_text_pdf(pages: int, lines_per_page: int = 45) -> bytes:
    """A text PDF like a report: a running header, body lines (some hyphenated), a page number."""
    kids = [4 + 2 * i for i in range(pages)]
    objects = {
        1: b"<< /Type /Catalog /Pages 2 0 R >>",
        2: b"<< /Type /Pages /Kids [%s] /Count %d >>" % (b" ".join(b"%d 0 R" % k for k in kids), pages),
        3: b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>",
    }
    for index, page in enumerate(kids, start=1):
        lines = ["River Authority - Annual Flood Report"]
        lines += [_line(index, row) + (" Embank-" if row % 9 == 4 else "") for row in range(lines_per_page)]
        lines.append(str(index))
        body = [b"BT /F1 10 Tf 12 TL 60 770 Td", *(_pdf_string(s) + b" Tj T*" for s in lines), b"ET"]
        stream = b"\n".join(body).replace(b"Embank-) Tj T*\n(", b"Embank-) Tj T*\n(ment ")
        objects[page] = (b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents %d 0 R "
                         b"/Resources << /Font << /F1 3 0 R >> >> >>" % (page + 1))
        objects[page + 1] = b"<< /Length %d >>\nstream\n%s\nendstream" % (len(stream), stream)
    out = bytearray(b"%PDF-1.4\n")
    offsets = {}
    for number in sorted(objects):
        offsets[number] = len(out)
        out += b"%d 0 obj\n%s\nendobj\n" % (number, objects[number])
    xref = len(out)
    size = max(objects) + 1
    out += b"xref\n0 %d\n0000000000 65535 f \n" % size
    out += b"".join(b"%010d 00000 n \n" % offsets[n] for n in range(1, size))
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (size, xref)
    return bytes(out)


def plain_pypdf(data: bytes) -> int:
    from pypdf import PdfReader

    return sum(len(page.extract_text() or "") for page in PdfReader(io.BytesIO(data)).pages)


def timed(fn, *args, **kwargs) -> float:
    started = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pages", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()

    data = make_text_pdf(args.pages)
    out = extract_document(data, "pdf")
    assert len(out.pages) == args.pages and "Annual Flood Report" not in out.text and "Embankment" in out.text

    cold = timed(warm_up)
    first = timed(run_sandboxed, extract_document, data, "pdf")
    plain, inproc, sandboxed, roundtrip = [], [], [], []
    for _ in range(args.rounds):
        plain.append(timed(plain_pypdf, data))
        inproc.append(timed(extract_document, data, "pdf"))
        sandboxed.append(timed(run_sandboxed, extract_document, data, "pdf"))
        roundtrip.append(timed(run_sandboxed, len, data))

    def rate(seconds: list[float], pick=statistics.median) -> float:
        return args.pages / pick(seconds)

    print(f"document: {args.pages}-page generated text PDF, {len(data) / 1e3:.0f} kB, "
          f"{len(out.text)} chars out; cpus: {os.cpu_count()}; load average {os.getloadavg()[0]:.1f}; "
          f"{args.rounds} interleaved rounds")
    print("                                          median      best  (pages/s)")
    for label, runs in (("plain pypdf page loop (same process)", plain),
                        ("extract_document in process", inproc),
                        ("extract_document in the sandbox (warm)", sandboxed)):
        print(f"{label:<40}{rate(runs):8.1f}  {rate(runs, min):8.1f}")
    for pick, name in ((statistics.median, "median"), (min, "best")):
        ratio = rate(sandboxed, pick) / rate(plain, pick)
        print(f"ratio sandbox / plain ({name}):{'':<11}{ratio:8.3f}  (cost {100 * (1 - ratio):.1f}%; target < 20%)")
    print(f"ratio in-process / plain (best):{'':<8}{rate(inproc, min) / rate(plain, min):8.3f}  (cleaning alone)")
    print(f"sandbox round trip with the PDF bytes:  {1000 * statistics.median(roundtrip):8.2f} ms")
    print(f"sandbox start (forkserver + worker):    {1000 * cold:8.1f} ms; first parse {1000 * first:.0f} ms")


if __name__ == "__main__":
    main()
