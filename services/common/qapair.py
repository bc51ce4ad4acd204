"""The question-answer pair: the record qagen writes to `qa/pairs.jsonl`, people edit, the trainer
learns from and exports carry. Stored as one JSON object per pair: `QAPair.to_dict()` plus `split`
("train" or "eval", marked by qagen) and `edited` (changed by a person).
"""

from __future__ import annotations

import hashlib
from dataclasses import MISSING, asdict, dataclass, fields

from services.common import keys
from services.common.errors import FailedPrecondition, NotFound
from services.common.jsonl import from_jsonl


@dataclass(frozen=True, slots=True)
class QAPair:
    """One grounded question-answer pair; `start`/`end` is the source chunk's span in the document."""

    pair_id: str
    question: str
    answer: str
    doc_id: str
    chunk_id: str
    start: int
    end: int
    strategy: str
    # the grounding check's support of the answer in its source chunks, 0..1 (0 = not checked)
    score: float = 0.0
    # further chunks the answer draws on (a summary of a section or of the whole document)
    sources: tuple[str, ...] = ()
    # for a paraphrase: the pair_id of the pair whose question it rewords
    variant_of: str = ""

    def to_dict(self) -> dict:
        data = asdict(self)
        data["sources"] = list(self.sources)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> QAPair:
        values = {f.name: data[f.name] for f in fields(cls) if f.name in data or f.default is MISSING}
        values["start"], values["end"] = int(values["start"]), int(values["end"])
        if "score" in values:
            values["score"] = float(values["score"])
        if "sources" in values:
            values["sources"] = tuple(str(c) for c in values["sources"] or ())
        return cls(**values)


def loose_pair(pair_id: str, question: str, answer: str, doc_id: str, strategy: str) -> QAPair:
    """A pair tied to no chunk: written by a person, imported, or handed over in a QA file."""
    return QAPair(
        pair_id=pair_id, question=question, answer=answer, doc_id=doc_id, chunk_id="", start=0, end=0,
        strategy=strategy,
    )  # fmt: skip


def pair_id_for(chunk_id: str, question: str, answer: str) -> str:
    """A stable id from where the pair comes from and what it says."""
    return hashlib.sha1(f"{chunk_id}\x1f{question}\x1f{answer}".encode()).hexdigest()[:16]


def read_pairs(store, tenant: str, sid: str) -> list[dict]:
    """The session's stored pairs (blocking), or FAILED_PRECONDITION when none were generated yet."""
    try:
        return from_jsonl(store.get_bytes(keys.qa_pairs(tenant, sid)))
    except NotFound:
        raise FailedPrecondition(f"session {sid} has no question-answer pairs yet") from None
