"""Share of chunks for which the `local` QA backend (a transformers instruct model in this process,
default: the bundled SmolLM2-135M-Instruct) produced parsable output.

The chunks come from the same seeded 50-page document as `bench_qagen.py`, sized in the base
model's tokens. For each chunk every prompt's replies are recorded and parsed strictly, as the
backend does; a chunk counts as parsable when it got a parsable reply to every prompt within the
retries (first try, after retries), and its pairs then pass through the quality gate. Run:

    .venv/bin/python bench/bench_qagen_local.py [--chunks 8] [--strategies quiz] [--threads 2] [--free]

`--free` measures the unguided mode (the model writes the whole JSON reply, parsed strictly);
the default is guided decoding (the backend writes the JSON, the model fills in the texts).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench.bench_qagen import make_document  # noqa: E402
from services.common.config import Settings  # noqa: E402
from services.common.model import load_base_model  # noqa: E402
from services.qagen.backends.base import ChunkFailed, MalformedOutput  # noqa: E402
from services.qagen.backends.local import LocalGenerator  # noqa: E402
from services.qagen.backends.prompting import parse_pairs  # noqa: E402
from services.qagen.chunk import token_length  # noqa: E402
from services.qagen.extractive import chunk_document  # noqa: E402
from services.qagen.quality import filter_pairs  # noqa: E402


class Recording(LocalGenerator):
    """The local backend, keeping every reply it produced for the current chunk."""

    replies: list[str]

    def complete(self, messages, attempt=0):
        reply = super().complete(messages, attempt)
        self.replies.append(reply)
        return reply


def parsable(reply: str) -> bool:
    try:
        parse_pairs(reply)
        return True
    except MalformedOutput:
        return False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--chunks", type=int, default=8, help="chunks to generate for, spread over the document")
    ap.add_argument("--strategies", default="quiz", help="comma-separated strategies to prompt for")
    ap.add_argument("--max-new-tokens", type=int, default=384)
    ap.add_argument("--free", action="store_true", help="unguided: the model writes the whole JSON reply")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    settings = Settings.from_env()
    model, tokenizer = load_base_model(settings)
    text, pages = make_document()
    chunks = chunk_document(text, "bench", length_fn=token_length(tokenizer), max_tokens=320, overlap_tokens=40,
                            pages=pages)
    step = max(1, len(chunks) // args.chunks)
    picked = chunks[::step][: args.chunks]
    gen = Recording(model, tokenizer, max_new_tokens=args.max_new_tokens, guided=not args.free)
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]

    rows = []
    started = time.monotonic()
    for chunk in picked:
        gen.replies = []
        t0 = time.monotonic()
        try:
            pairs = gen.generate(chunk, doc_title="The Towns of the Velmora Coast", strategies=strategies)
            ok = True
        except ChunkFailed:
            pairs, ok = [], False
        kept, dropped = filter_pairs(pairs, chunks={chunk.chunk_id: chunk})
        rows.append(
            {
                "ok": ok,
                "first_try": bool(gen.replies) and parsable(gen.replies[0]),
                "attempts": len(gen.replies),
                "pairs": len(pairs),
                "kept": len(kept),
                "dropped": {k: v for k, v in dropped.items() if v},
                "seconds": round(time.monotonic() - t0, 1),
            }
        )
        print(f"chunk {len(rows)}/{len(picked)}: {rows[-1]}", file=sys.stderr, flush=True)
    n = len(rows)
    out = {
        "model": settings.base_model,
        "mode": "free" if args.free else "guided",
        "chunks": n,
        "strategies": strategies,
        "parsable_share": sum(r["ok"] for r in rows) / n,
        "parsable_first_try_share": sum(r["first_try"] for r in rows) / n,
        "pairs": sum(r["pairs"] for r in rows),
        "pairs_kept_after_quality_gate": sum(r["kept"] for r in rows),
        "chunks_with_kept_pairs_share": sum(r["kept"] > 0 for r in rows) / n,
        "seconds_per_chunk": round((time.monotonic() - started) / n, 1),
        "load_average": os.getloadavg()[0],
    }
    if args.json:
        print(json.dumps(out))
    else:
        for k, v in out.items():
            print(f"{k:32s} {v}")


if __name__ == "__main__":
    main()
