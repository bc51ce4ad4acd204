"""RAFT-style training examples (Zhang et al. 2024, "RAFT: Adapting Language Model to Domain
Specific RAG"): the question comes after passages, as inference puts retrieved passages before it,
so the adapter learns the facts and also learns to read passages for them.

Per pair, drawn from a seeded generator:
- GOLD_SHARE: the pair's source chunk among distractors (the chunks BM25 ranks highest for the
  question apart from it: hard negatives, like the near misses retrieval really returns), at a
  random place, so the model learns to find the one that answers;
- DISTRACTOR_SHARE: distractors only, so it learns to answer from what it knows when retrieval
  misses;
- the rest: the plain question, as in chat without retrieval.

The user turn is built by `with_passages` from the session's passages (services/common/passages.py,
as chat reads them: same numbering, document name, page and length), so training and chat see the
same layout.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from services.common import evidence
from services.common.passages import BM25, Hit, Passage, with_passages

GOLD_SHARE = 0.7
DISTRACTOR_SHARE = 0.2


def raft_pairs(
    pairs: Sequence[Mapping[str, Any]],
    passages: Sequence[Passage],
    *,
    k: int = 3,
    seed: int = 0,
    gold_share: float = GOLD_SHARE,
    distractor_share: float = DISTRACTOR_SHARE,
) -> tuple[list[dict], dict[str, int]]:
    """Copies of `pairs` whose questions carry `k` passages (see the module doc), and how many of
    each kind were made ({"gold", "distractors", "none"}). Pairs without a known source chunk
    (uploaded QA files) get what retrieval finds for them in the gold share, and nothing otherwise.
    Deterministic for a seed and the pairs' order.
    """
    passages = list(passages)
    counts: Counter = Counter({"gold": 0, "distractors": 0, "none": 0})
    if not passages or k <= 0:
        counts["none"] = len(pairs)
        return [dict(p) for p in pairs], dict(counts)
    index = BM25(passages)
    by_chunk = {p.chunk_id: p for p in passages if p.chunk_id}
    rng = random.Random(seed)
    out: list[dict] = []
    for pair in pairs:
        question = str(pair.get("question") or "")
        draw = rng.random()
        gold = by_chunk.get(str(pair.get("chunk_id") or ""))
        if draw >= gold_share + distractor_share:
            counts["none"] += 1
            out.append(dict(pair))
            continue
        with_gold = draw < gold_share
        if gold is None:
            chosen = [h.passage for h in index.search(question, k=k)] if with_gold else []
        else:
            chosen = _distractors(index, question, gold, k - 1 if with_gold else k, rng)
            if with_gold:
                chosen.insert(rng.randrange(len(chosen) + 1), gold)
        if not chosen:
            counts["none"] += 1
            out.append(dict(pair))
            continue
        counts["gold" if with_gold else "distractors"] += 1
        out.append(dict(pair, question=with_passages(question, [Hit(p, 0.0) for p in chosen])))
    return out, dict(counts)


def _distractors(index: BM25, question: str, gold: Passage, n: int, rng: random.Random) -> list[Passage]:
    """`n` passages other than `gold`: BM25's best for the question, then random ones."""
    if n <= 0:
        return []
    ranked = [h.passage for h in index.search(question, k=n + 1) if h.passage.chunk_id != gold.chunk_id][:n]
    if len(ranked) < n:
        taken = {p.chunk_id for p in ranked} | {gold.chunk_id}
        rest = [p for p in index.passages if p.chunk_id not in taken]
        ranked += rng.sample(rest, min(n - len(ranked), len(rest)))
    return ranked


def retrieved_pairs(
    pairs: Sequence[Mapping[str, Any]],
    passages: Sequence[Passage],
    *,
    k: int = 3,
    quote: int = 0,
) -> list[dict]:
    """Copies of `pairs` with what BM25 retrieves for each question put before it, as chat does
    (inference adds embedding ranks when it has them): held-out questions asked open-book. With
    `quote` > 0 each copy's `prime` is the start of the reply chat gives: up to `quote` sentences of
    the passages quoted (evidence.py; by BM25 over the sentences, as chat without its embedding
    model). Pairs for which nothing is retrieved keep the plain question."""
    passages = list(passages)
    if not passages or k <= 0:
        return [dict(p) for p in pairs]
    index = BM25(passages)
    out = []
    for pair in pairs:
        question = str(pair.get("question") or "")
        hits = index.search(question, k=k)
        copy = dict(pair, question=with_passages(question, hits))
        if quote > 0 and hits:
            copy["prime"] = evidence.opening(evidence.pick(question, hits, None, quote))
        out.append(copy)
    return out
