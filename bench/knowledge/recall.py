"""Retrieval lab: is the key fact in the passages chat would read? In this process, no stack and no
language model: each evaluation document is rendered and extracted as the harness gives it, chunked
as qagen chunks it (base-model tokens), and every question with a key is retrieved for by each
variant (`VARIANTS`); recall@k = the key fact is in the top k passages.

    HF_HUB_OFFLINE=1 .venv/bin/python -m bench.knowledge.recall --split tune
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from bench.knowledge import render
from bench.knowledge.run import load_docs
from bench.knowledge.score import carries
from services.common.passages import BM25, Passage, build_passages

HERE = Path(__file__).resolve().parent


def document_passages(name: str, src: Path, settings) -> list[Passage]:
    """The passages a session of this one document would have."""
    from services.common.model import load_tokenizer, resolve_base_model
    from services.ingest.extract import detect_type, extract_document
    from services.qagen.chunk import token_length
    from services.qagen.extractive import chunk_document

    filename, data, ctype = render.render(src, render.how_for(name, src))
    got = extract_document(data, detect_type(data, filename, ctype))
    length_fn = token_length(load_tokenizer(resolve_base_model(settings)))
    chunks = chunk_document(
        got.text, name, length_fn=length_fn, pages=got.pages,
        max_tokens=settings.qagen_chunk_tokens, overlap_tokens=settings.qagen_chunk_overlap,
    )  # fmt: skip
    rows = [{"chunk_id": c.chunk_id, "doc_id": name, "start": c.start, "end": c.end, "text": c.text} for c in chunks]
    return build_passages(rows, {name: got.pages}, {name: filename})


Search = Callable[[str, int], list[Passage]]


def variants(passages: list[Passage], embedder) -> dict[str, Search]:
    from services.inference.retrieve import Hybrid

    bm25 = BM25(passages)
    out: dict[str, Search] = {"bm25": lambda q, k: [h.passage for h in bm25.search(q, k)]}
    if embedder is None:
        return out
    hybrid = Hybrid(passages, embedder)

    def meaning(q, k):
        sims = hybrid.similarities(q)
        return [passages[i] for i in sorted(range(len(passages)), key=lambda i: -sims[i])[:k]]

    out["embeddings"] = meaning
    for rrf in (5, 20):
        h = Hybrid(passages, embedder, rrf_k=rrf)
        out[f"hybrid rrf_k={rrf}"] = lambda q, k, h=h: [x.passage for x in h.search(q, k)]
    for words in (40, 60, 120):
        h = Hybrid(passages, embedder, window_words=words)
        out[f"hybrid windows={words}"] = lambda q, k, h=h: [x.passage for x in h.search(q, k)]
    h0 = Hybrid(passages, embedder, min_similarity=0.0)
    out["hybrid min_sim=0"] = lambda q, k: [x.passage for x in h0.search(q, k)]
    out["hybrid"] = lambda q, k: [h.passage for h in hybrid.search(q, k)]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--split", default="tune", choices=("tune", "final", "all"))
    ap.add_argument("--docs", help="comma-separated document names (default: all)")
    ap.add_argument("--k", default="1,2,3,4")
    ap.add_argument("--misses", action="store_true", help="print the questions the last variant misses at k=3")
    args = ap.parse_args(argv)

    from services.common.config import Settings
    from services.inference.retrieve import default_embedder

    settings = Settings.from_env()
    embedder = default_embedder()
    ks = [int(k) for k in args.k.split(",")]
    totals: dict[str, list[int]] = {}
    n = 0
    for name, src, questions in load_docs(HERE / "docs", args.docs.split(",") if args.docs else None):
        passages = document_passages(name, src, settings)
        searches = variants(passages, embedder)
        qs = [q for q in questions if q.get("key") and args.split in ("all", q["split"])]
        n += len(qs)
        for vname, search in searches.items():
            row = totals.setdefault(vname, [0] * len(ks))
            for q in qs:
                got = search(q["question"], max(ks))
                for j, k in enumerate(ks):
                    row[j] += carries(" ".join(p.text for p in got[:k]), q["key"])
                if args.misses and vname == list(searches)[-1] and not carries(" ".join(p.text for p in got[:3]), q["key"]):
                    print(f"  miss {q['id']}: {q['question']} key={q['key']}")
        print(f"{name}: {len(passages)} passages, {len(qs)} questions", flush=True)
    print("\n| variant | " + " | ".join(f"recall@{k}" for k in ks) + " |")
    print("| --- | " + " | ".join("---:" for _ in ks) + " |")
    for vname, row in totals.items():
        print(f"| {vname} | " + " | ".join(f"{c}/{n} ({100 * c / max(1, n):.0f}%)" for c in row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
