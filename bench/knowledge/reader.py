"""The reader lab: how well does the base model read the passages retrieval gives it, laid out one
way or another? In this process, no stack: each document's passages are built as a session's are
(`recall.document_passages`), chat's retrieval (BM25 + MiniLM) finds the top 3 for each question,
and the base model answers greedily from each layout of them; scored as the harness scores.

    HF_HUB_OFFLINE=1 .venv/bin/python -m bench.knowledge.reader --layouts default,top2 --split tune

Layouts (`LAYOUTS`): `default` is chat's own (`services.common.passages.with_passages`, best first);
the others change one thing each. Prints key-fact % per layout (all questions, and those whose key
fact was in the prompt) and saves the answers to `--out`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

from bench.knowledge.score import carries, score
from services.common.passages import Hit, with_passages

Messages = list[dict[str, str]]


def plain(question: str, hits: list[Hit], k: int | None = None) -> Messages:
    return [{"role": "user", "content": with_passages(question, hits[:k])}]


LAYOUTS: dict[str, Callable[[str, list[Hit]], Messages]] = {
    "default": plain,
    "top1": lambda q, h: plain(q, h, 1),
    "top2": lambda q, h: plain(q, h, 2),
}


# One worked example before the real question: the turn a reader should give, on an invented text.
DEMO_PASSAGES = [
    "The Harrowgate ferry leaves Calder Quay at 07:15 and 17:40 on weekdays and takes 25 minutes to "
    "cross. Tickets cost £6 for adults and £3 for children; bicycles travel free.",
    "The ferry does not run on public holidays. In high winds the skipper may cancel a crossing; "
    "cancellations are posted on the quay notice board.",
]
DEMO_QUESTION = "How long is the crossing?"
DEMO_ANSWER = "The crossing takes 25 minutes [1]."


def demo(question: str, hits: list[Hit]) -> Messages:
    from services.common.passages import Passage

    shown = [Hit(Passage("", "ferry", "ferry.pdf", 1, 0, 0, t), 0.0) for t in DEMO_PASSAGES]
    return [
        {"role": "user", "content": with_passages(DEMO_QUESTION, shown)},
        {"role": "assistant", "content": DEMO_ANSWER},
        *plain(question, hits),
    ]


LAYOUTS["demo"] = demo

EMBEDDER: list = []  # set by main: MiniLM, for the layouts that pick sentences


def quote(question: str, hits: list[Hit], n: int = 1) -> Messages:
    """Chat's own evidence-first reply (services/common/evidence.py): `n` sentences quoted."""
    from services.common import evidence

    opening = evidence.opening(evidence.pick(question, hits, EMBEDDER[0], n))
    return [*plain(question, hits), *([{"role": "assistant", "content": opening}] if opening else [])]


def most_relevant(question: str, hits: list[Hit], n: int = 2) -> Messages:
    """The passages, then the `n` best sentences again right before the question."""
    from services.common import evidence

    picked = evidence.pick(question, hits, EMBEDDER[0], n)
    head, tail = plain(question, hits)[0]["content"].rsplit("\n\nQuestion: ", 1)
    said = " ".join(t for _, t in picked)
    return [{"role": "user", "content": f"{head}\n\nMost relevant: {said}\n\nQuestion: {tail}"}]


LAYOUTS["quote1"] = quote
LAYOUTS["quote2"] = lambda q, h: quote(q, h, 2)
LAYOUTS["quote3"] = lambda q, h: quote(q, h, 3)
LAYOUTS["relevant2"] = most_relevant


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layouts", default="default")
    ap.add_argument("--split", default="tune", choices=("tune", "final", "all"))
    ap.add_argument("--docs", help="comma-separated document names (default: all in the run)")
    ap.add_argument("--limit", type=int, default=0, help="questions per document (0: all)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--out", default="/tmp/reader-lab.json")
    args = ap.parse_args(argv)

    from bench.knowledge.recall import HERE, document_passages
    from bench.knowledge.run import load_docs
    from bench.knowledge.script import Baseline
    from services.common.config import Settings
    from services.inference.retrieve import build_index, default_embedder

    settings = Settings.from_env()
    embedder = default_embedder()
    rows = []
    for name, src, questions in load_docs(HERE / "docs", args.docs.split(",") if args.docs else None):
        index = build_index(document_passages(name, src, settings), embedder)
        qs = [q for q in questions if q.get("key") and args.split in ("all", q["split"])]
        for q in qs[: args.limit or None]:
            rows.append({**q, "doc": name, "hits": index.search(q["question"], k=settings.retrieval_top_k)})
    layouts = args.layouts.split(",")
    unknown = [name for name in layouts if name not in LAYOUTS]
    if unknown:
        ap.error(f"unknown layouts {unknown}; known: {sorted(LAYOUTS)}")
    reader = Baseline()
    EMBEDDER.append(embedder)
    out_path = Path(args.out)
    saved = json.loads(out_path.read_text()) if out_path.exists() else []
    table = []
    for name in layouts:
        hit = hit_recalled = recalled = 0
        started = time.monotonic()
        for r in rows:
            messages = LAYOUTS[name](r["question"], r["hits"])
            got = reader.reply(messages, args.max_tokens)
            s = score({**r, "answer": got})
            in_prompt = carries(" ".join(m["content"] for m in messages), r["key"])
            hit += s["key_fact"]
            recalled += in_prompt
            hit_recalled += s["key_fact"] and in_prompt
            saved.append(
                {"layout": name, "id": r["id"], "doc": r["doc"], "answer": got, **s, "in_prompt": in_prompt}
            )
            print(
                f"  {name} {r['id']} {'+' if s['key_fact'] else '-'}{' (in prompt)' if in_prompt else ''}",
                flush=True,
            )
        secs = time.monotonic() - started
        table.append((name, hit, len(rows), hit_recalled, recalled, secs / max(1, len(rows))))
        out_path.write_text(json.dumps(saved, indent=1, ensure_ascii=False))
    print("\n| layout | key fact | fact in prompt | key fact when in prompt | s/answer |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, hit, n, hr, rec, spa in table:
        print(
            f"| {name} | {hit}/{n} ({100 * hit / max(1, n):.0f}%) | {rec}/{n} | {hr}/{rec} ({100 * hr / max(1, rec):.0f}%) | {spa:.1f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
