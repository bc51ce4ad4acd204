"""What every rule set builds on: a candidate question over a span of a chunk, and the pair made
from a question and an answer."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from services.common.qapair import QAPair, pair_id_for
from services.qagen.chunk import Chunk

# At most this many questions of one rule per chunk (the `number` rule has no cap).
MAX_PER_RULE = 3


@dataclass(frozen=True, slots=True)
class Candidate:
    """A question a rule asks, answered by the span `start:end` of the chunk's text."""

    question: str
    start: int  # the answer's span in chunk.text
    end: int
    strategy: str


def pair_for(chunk: Chunk, question: str, answer: str, strategy: str, sources: Sequence[str] = ()) -> QAPair:
    """A pair about `chunk` answering `question` with `answer`; `sources`: other chunks it quotes."""
    return QAPair(
        pair_id=pair_id_for(chunk.chunk_id, question, answer),
        question=question,
        answer=answer,
        doc_id=chunk.doc_id,
        chunk_id=chunk.chunk_id,
        start=chunk.start,
        end=chunk.end,
        strategy=strategy,
        sources=tuple(s for s in dict.fromkeys(sources) if s != chunk.chunk_id),
    )
