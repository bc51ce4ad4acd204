"""A session's stored QA pairs (`qa/pairs.jsonl`, one JSON object per pair) and the changes people
make to them: add, edit, delete, import, export.

Pairs are plain dicts in the store, in the shape of `QAPair.to_dict()` plus `split` ("train" or
"eval") and `edited`. The functions here are domain code on lists of dicts, pure functions of the
list they change: the servicer applies one to the stored pairs by compare-and-swap, and applies it
again to the fresh pairs when another replica wrote in between.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator

from services.common import keys
from services.common.errors import InvalidArgument, NotFound
from services.common.pair_formats import FORMATS, export_jsonl, import_jsonl
from services.common.qapair import QAPair, loose_pair
from services.qagen import quality

MAX_QUESTION_CHARS = quality.MAX_QUESTION_CHARS
MAX_ANSWER_CHARS = 4000
EXPORT_PIECE = 1024 * 1024


def provided_pairs(rows: list[dict], doc_id: str) -> list[dict]:
    """QA pairs a person handed over as a file, in the shape of generated ones."""
    out = []
    for row in rows:
        q, a = row["question"].strip(), row["answer"].strip()
        pid = hashlib.sha1(f"{doc_id}\0{q}\0{a}".encode()).hexdigest()[:16]
        out.append(loose_pair(pid, q, a, doc_id, "provided").to_dict())
    return out


def _clean(text: str, what: str, limit: int) -> str:
    text = " ".join(text.split()) if what == "question" else text.strip()
    if not text:
        raise InvalidArgument(f"the {what} is empty")
    if len(text) > limit:
        raise InvalidArgument(f"the {what} is {len(text)} characters; at most {limit} are allowed")
    return text


def checked(question: str, answer: str) -> tuple[str, str]:
    """A person's question and answer, cleaned, or INVALID_ARGUMENT saying what is wrong."""
    q = _clean(question, "question", MAX_QUESTION_CHARS)
    a = _clean(answer, "answer", MAX_ANSWER_CHARS)
    reason = quality.malformed_reason(q, a)
    if reason is not None:
        raise InvalidArgument(f"the pair is malformed: {reason}")
    return q, a


def _key(question: str, answer: str) -> tuple:
    """Two pairs with this equal say the same thing (word order and case of the question aside)."""
    return quality.question_tokens(question), answer.casefold()


def add_pair(pairs: list[dict], question: str, answer: str, doc_id: str = "") -> dict:
    q, a = checked(question, answer)
    if _key(q, a) in {_key(p["question"], p["answer"]) for p in pairs}:
        raise InvalidArgument("the same question and answer are already there")
    pair = loose_pair(keys.new_id("p"), q, a, doc_id, "person").to_dict()
    pair.update(split="train", edited=True)
    pairs.append(pair)
    return pair


def find(pairs: list[dict], pair_id: str) -> dict:
    for p in pairs:
        if p.get("pair_id") == pair_id:
            return p
    raise NotFound(f"pair {pair_id!r} not found")


def update_pair(pairs: list[dict], pair_id: str, question: str | None, answer: str | None) -> dict:
    pair = find(pairs, pair_id)
    if question is None and answer is None:
        raise InvalidArgument("give a new question, a new answer or both")
    q, a = checked(
        pair["question"] if question is None else question, pair["answer"] if answer is None else answer
    )
    pair.update(question=q, answer=a, edited=True, score=0.0)
    return pair


def delete_pair(pairs: list[dict], pair_id: str) -> None:
    pair = find(pairs, pair_id)
    pairs.remove(pair)


def import_pairs(pairs: list[dict], text: str, fmt: str | None, *, replace: bool) -> tuple[int, int]:
    """Add the pairs of a JSON-lines file (any export format); returns (imported, duplicates).
    The whole file is refused when one line is bad."""
    incoming = import_jsonl(text, fmt)
    if not incoming:
        raise InvalidArgument("the file holds no question-answer pairs")
    if replace:
        pairs.clear()
    seen = {_key(p["question"], p["answer"]) for p in pairs}
    ids = {p["pair_id"] for p in pairs}
    added = dupes = 0
    for pair in incoming:
        q, a = checked(pair.question, pair.answer)
        key = _key(q, a)
        if key in seen or pair.pair_id in ids:
            dupes += 1
            continue
        seen.add(key)
        ids.add(pair.pair_id)
        row = pair.to_dict()
        row.update(question=q, answer=a, split="train", edited=True)
        pairs.append(row)
        added += 1
    return added, dupes


def export_pieces(
    pairs: Iterable[dict], fmt: str, *, system: str | None, include_meta: bool
) -> Iterator[bytes]:
    """The pairs as JSON lines in `fmt`, in pieces of at most `EXPORT_PIECE` bytes."""
    if fmt not in FORMATS:
        raise InvalidArgument(f"unknown QA format {fmt!r}; use one of {', '.join(FORMATS)}")
    raw = export_jsonl(
        [QAPair.from_dict(p) for p in pairs], fmt, system=system, include_meta=include_meta
    ).encode("utf-8")
    for i in range(0, len(raw), EXPORT_PIECE):
        yield raw[i : i + EXPORT_PIECE]
