"""The stored state of a session's QA generation, and how a document's results change it.

In the store: `qa/pairs.jsonl` (the session's pairs), `chunks.jsonl` (the chunk rows) and
`qa/state.json` (the documents done, their failed chunks, and the pairs the quality gate dropped per
document). `QAState.save` writes the state last, so a crash never marks a document done without
its pairs. A generated document's pairs replace its earlier generated ones; pairs people added or
imported stay.
"""

from __future__ import annotations

import logging

from doclora.v1 import session_pb2
from services.common import keys
from services.common.errors import NotFound
from services.common.jsonl import from_jsonl, to_jsonl
from services.common.qapair import QAPair
from services.common.runtime import Runtime
from services.qagen.chunk import Chunk
from services.qagen.pairs import provided_pairs

log = logging.getLogger(__name__)


class QAState:
    """What this session's qagen job has stored so far and adds to: the pairs, the chunk rows, the
    documents done, their failed chunks and the pairs the gate dropped (per document), and the
    reasons documents gave no pairs. `save` writes it all, the state last."""

    def __init__(
        self, rt: Runtime, tenant: str, sid: str, pairs: list[dict], chunk_rows: list[dict], state: dict
    ):
        self.rt, self.tenant, self.sid = rt, tenant, sid
        self.pairs, self.chunk_rows = pairs, chunk_rows
        self.done: set[str] = set(state.get("done", []))
        self.failed: dict[str, list[dict]] = dict(state.get("failed", {}))
        self.dropped: dict = dict(state.get("dropped", {}))
        self.reasons: list[str] = []

    @classmethod
    async def read(cls, rt: Runtime, tenant: str, sid: str) -> QAState:
        """The pairs, chunks and state of earlier deliveries and rounds; empty when there are none."""
        try:
            state = await rt.io(rt.store.get_json, keys.qa_state(tenant, sid))
        except NotFound:
            return cls(rt, tenant, sid, [], [], {"done": [], "failed": {}})
        pairs = from_jsonl(await rt.io(rt.store.get_bytes, keys.qa_pairs(tenant, sid)))
        chunks = from_jsonl(await rt.io(rt.store.get_bytes, keys.chunks(tenant, sid)))
        return cls(rt, tenant, sid, pairs, chunks, state)

    def snapshot(self) -> dict:
        return {"done": sorted(self.done), "failed": self.failed, "dropped": self.dropped}

    async def save(self) -> None:
        # state last: a crash before it leaves the document to be generated again, and pair ids
        # (hashes of chunk, question and answer) keep a rerun from adding the same pairs twice
        rt, tenant, sid = self.rt, self.tenant, self.sid
        await rt.io(
            rt.store.put_bytes,
            keys.qa_pairs(tenant, sid),
            to_jsonl(self.pairs),
            content_type="application/x-ndjson",
        )
        await rt.io(
            rt.store.put_bytes,
            keys.chunks(tenant, sid),
            to_jsonl(self.chunk_rows),
            content_type="application/x-ndjson",
        )
        await rt.io(rt.store.put_json, keys.qa_state(tenant, sid), self.snapshot())

    def add_provided(self, doc_id: str, rows: list[dict]) -> None:
        """A document of the person's own pairs: those not yet here, as they are."""
        known = {p["pair_id"] for p in self.pairs}
        self.pairs += [p for p in provided_pairs(rows, doc_id) if p["pair_id"] not in known]
        self.done.add(doc_id)

    def add_generated(
        self, doc: session_pb2.DocumentInfo, chunks: list[Chunk], kept: list[QAPair], stats: dict
    ) -> None:
        """A generated document's chunks, pairs, drops and failed chunks in place of its earlier ones."""
        if stats.get("error"):
            log.info("%s: %s", doc.name, stats["error"])
            self.reasons.append(f"{doc.name}: {stats['error']}")
        # this document's generated pairs are replaced by the new set (which holds the earlier
        # ones that passed); pairs people added or imported stay
        self.pairs = [p for p in self.pairs if not (p.get("doc_id") == doc.doc_id and p.get("chunk_id"))]
        self.pairs += [{**p.to_dict(), "split": "train"} for p in kept]
        self.chunk_rows = [c for c in self.chunk_rows if c.get("doc_id") != doc.doc_id] + [
            c.to_dict() for c in chunks
        ]
        self.done.add(doc.doc_id)
        self.dropped[doc.doc_id] = stats["dropped"]
        if stats["failed_chunks"]:
            self.failed[doc.doc_id] = stats["failed_chunks"]
        else:
            self.failed.pop(doc.doc_id, None)
