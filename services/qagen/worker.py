"""The qagen stage: each ready document's text -> chunks -> grounded QA pairs, written to the store
as `chunks.jsonl` and `qa/pairs.jsonl`; too few pairs fails the session with a clear reason."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time

from doclora.v1 import events_pb2, qagen_pb2, qagen_pb2_grpc, session_pb2
from services.common import events, keys
from services.common.errors import FailedPrecondition, InvalidArgument, NotFound
from services.common.jsonl import from_jsonl, to_jsonl
from services.common.runtime import Runtime
from services.common.sessions import mark_stage
from services.qagen.extractive import make_pairs

log = logging.getLogger(__name__)
D = session_pb2.DocumentStatus


def provided_pairs(rows: list[dict], doc_id: str) -> list[dict]:
    """QA pairs a person handed over as a file, in the shape of generated ones."""
    out = []
    for row in rows:
        q, a = row["question"].strip(), row["answer"].strip()
        pid = hashlib.sha1(f"{doc_id}\0{q}\0{a}".encode()).hexdigest()[:16]
        out.append(
            {
                "pair_id": pid,
                "question": q,
                "answer": a,
                "doc_id": doc_id,
                "chunk_id": "",
                "start": 0,
                "end": 0,
                "strategy": "provided",
            }
        )
    return out


async def generate_session(rt: Runtime, item: events_pb2.WorkItem, rec: session_pb2.Session) -> None:
    started = time.monotonic()
    sid, tenant = item.session_id, item.tenant
    docs = [d for d in rec.documents if d.status == D.DOCUMENT_STATUS_READY]
    all_pairs, all_chunks, reasons = [], [], []
    stats = session_pb2.QAStats()
    for i, doc in enumerate(docs):
        await events.progress(
            rt.bus, sid, session_pb2.STAGE_QAGEN, i, len(docs), f"generating from {doc.name}"
        )
        if doc.format.startswith("qa_"):  # the person's own pairs skip generation
            rows = from_jsonl(await rt.io(rt.store.get_bytes, keys.doc_qa(tenant, sid, doc.doc_id)))
            all_pairs += provided_pairs(rows, doc.doc_id)
            continue
        text = (await rt.io(rt.store.get_bytes, keys.doc_text(tenant, sid, doc.doc_id))).decode("utf-8")
        try:
            pages = await rt.io(rt.store.get_json, keys.doc_pages(tenant, sid, doc.doc_id))
        except NotFound:
            pages = None
        pairs, chunks, doc_stats = await rt.io(make_pairs, text, doc.doc_id, doc.name, pages=pages)
        if doc_stats.get("error"):
            log.info("%s: %s", doc.name, doc_stats["error"])
            reasons.append(f"{doc.name}: {doc_stats['error']}")
        all_pairs += [p.to_dict() for p in pairs]
        all_chunks += [dataclasses.asdict(c) for c in chunks]
        stats.chunks += doc_stats.get("chunks", len(chunks))
        stats.chunks_with_pairs += doc_stats.get("chunks_with_pairs", 0)
        for reason, n in (doc_stats.get("dropped") or {}).items():
            stats.dropped[reason] += int(n)
    stats.pairs = len(all_pairs)
    stats.coverage = stats.chunks_with_pairs / stats.chunks if stats.chunks else 0.0
    await events.progress(
        rt.bus, sid, session_pb2.STAGE_QAGEN, len(docs), len(docs), f"{len(all_pairs)} pairs"
    )
    if len(all_pairs) < rt.settings.min_pairs:
        raise InvalidArgument(
            f"not enough text to learn from: {len(all_pairs)} question-answer pairs came out of the "
            f"documents, at least {rt.settings.min_pairs} are needed"
            + (f" ({'; '.join(reasons)})" if reasons else "")
        )
    await rt.io(
        rt.store.put_bytes,
        keys.chunks(tenant, sid),
        to_jsonl(all_chunks),
        content_type="application/x-ndjson",
    )
    await rt.io(
        rt.store.put_bytes,
        keys.qa_pairs(tenant, sid),
        to_jsonl(all_pairs),
        content_type="application/x-ndjson",
    )

    def done(r):
        r.qa.CopyFrom(stats)
        mark_stage(r, session_pb2.STAGE_QAGEN, finished=True)

    await rt.sessions.update(sid, done)
    log.info(
        "generated %d pairs from %d chunks (coverage %.0f%%)", stats.pairs, stats.chunks, 100 * stats.coverage
    )
    await rt.handoff(
        sid, tenant, session_pb2.STAGE_QAGEN, session_pb2.STAGE_TRAIN, time.monotonic() - started
    )


async def load_pairs(rt: Runtime, tenant: str, sid: str) -> list[dict]:
    try:
        return from_jsonl(await rt.io(rt.store.get_bytes, keys.qa_pairs(tenant, sid)))
    except NotFound:
        raise FailedPrecondition(f"session {sid} has no question-answer pairs yet") from None


def pair_to_pb(p: dict) -> qagen_pb2.QAPair:
    return qagen_pb2.QAPair(**{f.name: p[f.name] for f in qagen_pb2.QAPair.DESCRIPTOR.fields if f.name in p})


class QAGenServicer(qagen_pb2_grpc.QAGenServiceServicer):
    def __init__(self, rt: Runtime):
        self.rt = rt

    async def ListPairs(self, request, context):
        rec = await self.rt.sessions.get(request.session_id)
        size = request.page_size or 100
        if size < 0 or size > 1000:
            raise InvalidArgument("page_size must be between 1 and 1000")
        try:
            offset = int(request.page_token or "0")
        except ValueError:
            raise InvalidArgument("page_token is not one this server gave out") from None
        pairs = await load_pairs(self.rt, rec.tenant, rec.session_id)
        page = pairs[offset : offset + size]
        nxt = str(offset + size) if offset + size < len(pairs) else ""
        return qagen_pb2.ListPairsResponse(
            pairs=[pair_to_pb(p) for p in page], next_page_token=nxt, total=len(pairs)
        )
