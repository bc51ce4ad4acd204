"""Time of the bot's exam answers (the trainer's `generate_answers`): prompts batched in the order
given against batched by length, at several batch sizes, in one process on the same prompts.

The prompts are an exam set as the trainer builds it: questions about a harness document
(bench/knowledge/docs/policy) with the top passages retrieval finds for them before each (the
`exam_passages` set, ~100-1,300 tokens), the default model, greedy, 32 new tokens. Run:

    .venv/bin/python bench/bench_exam.py [--questions 16] [--threads 2]

Prints seconds per configuration and the ratio to the first (the order given, batch 8: the trainer
before answers were batched by length).
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

from services.common.config import Settings  # noqa: E402
from services.common.model import load_base_model  # noqa: E402
from services.common.passages import BM25, build_passages, with_passages  # noqa: E402
from services.qagen.chunk import token_length  # noqa: E402
from services.qagen.extractive import chunk_document  # noqa: E402
from services.trainer.evaluate import generate_answers  # noqa: E402

DOC = Path(__file__).resolve().parent / "knowledge" / "docs" / "policy"
CONFIGS = ((False, 8), (True, 8), (True, 4), (True, 2), (False, 1))


def exam_prompts(tokenizer, n: int) -> list[str]:
    """`n` questions of the document, half closed-book and half with their top-3 passages, mixed as
    the exam's sets are (short closed-book prompts and long ones with passages)."""
    text = (DOC / "policy.md").read_text()
    chunks = chunk_document(text, "policy", length_fn=token_length(tokenizer))
    index = BM25(build_passages([c.to_dict() for c in chunks], {}, {"policy": "policy.md"}))
    rows = [json.loads(line) for line in (DOC / "questions.jsonl").read_text().splitlines() if line.strip()]
    questions = [r["question"] for r in rows if r["split"] == "tune"][:n]
    return [q if i % 2 else with_passages(q, index.search(q, k=3)) for i, q in enumerate(questions)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--questions", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=32)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    model, tok = load_base_model(Settings.from_env())
    prompts = exam_prompts(tok, args.questions)
    lengths = sorted(len(tok(p)["input_ids"]) for p in prompts)
    print(
        f"{len(prompts)} prompts, {lengths[0]}-{lengths[-1]} tokens, {args.new_tokens} new, {args.threads} threads"
    )
    generate_answers(model, tok, prompts[:2], max_new_tokens=4)  # warm-up
    first = None
    answers = {}
    for by_length, batch in CONFIGS:
        started = time.perf_counter()
        got = generate_answers(
            model, tok, prompts, max_new_tokens=args.new_tokens, batch_size=batch, by_length=by_length
        )
        secs = time.perf_counter() - started
        first = first or secs
        answers[(by_length, batch)] = got
        name = f"{'by length' if by_length else 'as given'}, batch {batch}"
        print(f"{name:22} {secs:6.1f} s  {secs / first:5.2f}x")
    same = sum(a == b for a, b in zip(answers[(False, 1)], answers[(True, 4)], strict=True))
    print(f"answers equal to one-at-a-time (by length, batch 4): {same}/{len(prompts)}")


if __name__ == "__main__":
    main()
