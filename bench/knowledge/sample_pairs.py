"""Draw a random sample of the QA pairs doclora's default pipeline makes from each evaluation
document, for labelling by hand (bench/knowledge/labels/<doc>.jsonl, see labels/SUMMARY.md).

    HF_HUB_OFFLINE=1 .venv/bin/python -m bench.knowledge.sample_pairs [--n 100] [--docs manual,report]

Each document is rendered as run.py gives it (render.py), extracted with ingest's own code and
taken through the qagen worker's calls in-process (chunking with its cleaning, the default
extractive generator, the quality gate, the held-out split), with Settings defaults. The doc_id
is the document's name (a session's is random, so the train/eval split of a live run differs);
the title is the file name, as the session record has it. A rerun keeps the label and note of
every sampled pair whose pair_id (a hash of chunk, question and answer) was labelled before.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from bench.knowledge import render
from bench.knowledge.run import HERE, load_docs
from services.common.config import Settings
from services.ingest.extract import detect_type, extract_document
from services.qagen import quality
from services.qagen.backends.factory import make_generator
from services.qagen.extractive import chunk_document
from services.qagen.pipeline import generate_document
from services.qagen.worker import _length_fn

FIELDS = ("pair_id", "strategy", "question", "answer", "split")


def extracted(name: str, src: Path):
    """(file name, ingest's Extracted) of the document as the harness gives it."""
    how = render.how_for(name, src)
    filename, data, ctype = render.render(src, how)
    # an upload reaches ingest with its file name only; a link (the guide) with the server's type too
    fmt = detect_type(data, filename=filename, content_type=ctype if how == "html" else None)
    return filename, extract_document(data, fmt)


def pipeline_pairs(name: str, src: Path, settings: Settings) -> tuple[list[dict], dict]:
    """The pairs (dicts with "split") the qagen worker stores for this one-document session."""
    filename, ex = extracted(name, src)
    length_fn = _length_fn(settings)
    chunks = chunk_document(
        ex.text,
        name,
        length_fn=length_fn,
        pages=ex.pages,
        max_tokens=settings.qagen_chunk_tokens,
        overlap_tokens=settings.qagen_chunk_overlap,
    )
    kept, stats = generate_document(
        make_generator(settings, ""), chunks, doc_title=filename, strategies=None, length_fn=length_fn
    )
    pairs = [{**p.to_dict(), "split": "train"} for p in kept]
    quality.mark_split(
        pairs, settings.qagen_eval_fraction, settings.train_seed, settings.qagen_eval_min_pairs
    )
    return pairs, stats


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.knowledge.sample_pairs")
    ap.add_argument("--n", type=int, default=100, help="pairs sampled per document")
    ap.add_argument("--docs", help="comma-separated document names (default: all)")
    ap.add_argument("--out", default=str(HERE / "labels"))
    args = ap.parse_args(argv)
    settings, out = Settings.from_env(), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, src, _ in load_docs(HERE / "docs", args.docs.split(",") if args.docs else None):
        pairs, stats = pipeline_pairs(name, src, settings)
        sample = random.Random(7).sample(pairs, min(args.n, len(pairs)))
        path = out / f"{name}.jsonl"
        old = [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
        known = {r["pair_id"]: {"label": r["label"], "note": r["note"]} for r in old}
        blank = {"label": "", "note": ""}
        rows = [{**{k: p[k] for k in FIELDS}, **known.get(p["pair_id"], blank)} for p in sample]
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        print(
            f"{name}: {len(pairs)} pairs from {stats['chunks']} chunks, {len(rows)} sampled "
            f"({sum(bool(r['label']) for r in rows)} labelled) -> {path}  {stats['by_strategy']}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
