"""The ingest stage: each pending document's original -> text.md + pages.json. A bad document fails
alone; the session goes on with the others, and fails only when none of them gave text."""

from __future__ import annotations

import logging
import time

from doclora.v1 import events_pb2, ingest_pb2, ingest_pb2_grpc, session_pb2
from services.common import events, keys
from services.common.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unavailable,
)
from services.common.jsonl import to_jsonl
from services.common.runtime import Runtime
from services.common.sessions import mark_stage, state_name
from services.ingest.sessions_api import add_source
from services.ingest.uploads import receive_upload

log = logging.getLogger(__name__)
S = session_pb2.SessionState
D = session_pb2.DocumentStatus


def _fetch_allowed(settings) -> frozenset[str]:
    """Host names that may be fetched although private (`DOCLORA_FETCH_ALLOW`, comma-separated)."""
    hosts = (h.strip() for h in settings.fetch_allow.split(","))
    return frozenset(h.rsplit(":", 1)[0] if h.count(":") == 1 else h for h in hosts if h)


def _extract_blocking(
    settings, data: bytes, doc: session_pb2.DocumentInfo, password: str | None, content_type: str | None
):
    """Detect the format and extract in a sandboxed process (timeout and memory cap)."""
    from services.ingest.extract import detect_type, extract_document
    from services.ingest.sandbox import run_sandboxed

    if doc.kind == "text":
        fmt = "text"
    else:
        fmt = detect_type(data, filename=doc.name, content_type=content_type)
    out = run_sandboxed(
        extract_document,
        data,
        fmt,
        password=password,
        timeout_s=settings.parse_timeout_s,
        memory_mb=settings.parse_memory_mb,
    )
    return fmt, out


async def _ingest_document(
    rt: Runtime, tenant: str, sid: str, doc: session_pb2.DocumentInfo, password: str | None
) -> session_pb2.DocumentInfo:
    """Extract one document; returns its updated record entry (READY, or FAILED with a reason)."""
    out_doc = session_pb2.DocumentInfo()
    out_doc.CopyFrom(doc)
    key = keys.doc_original(tenant, sid, doc.doc_id)
    content_type = None
    try:
        if doc.kind == "url":
            from services.ingest.fetch import fetch_with_retries

            fetched = await rt.io(
                fetch_with_retries,
                doc.final_url or doc.name,
                max_bytes=rt.settings.max_fetch_bytes,
                timeout_s=rt.settings.fetch_timeout_s,
                allow_hosts=_fetch_allowed(rt.settings),
            )
            put = await rt.io(
                rt.store.put_bytes,
                key,
                fetched.data,
                content_type=fetched.content_type or "application/octet-stream",
                metadata={"source": fetched.final_url[:1000]},
            )
            out_doc.sha256, out_doc.size_bytes, out_doc.final_url = put.sha256, put.size, fetched.final_url
            if out_doc.name == doc.final_url and fetched.filename:
                out_doc.name = fetched.filename
            data, content_type = fetched.data, fetched.content_type
        else:
            data = await rt.io(rt.store.get_bytes, key)
        fmt, extracted = await rt.io(_extract_blocking, rt.settings, data, out_doc, password, content_type)
        del data
        if extracted.qa_pairs:
            await rt.io(
                rt.store.put_bytes,
                keys.doc_qa(tenant, sid, doc.doc_id),
                to_jsonl(extracted.qa_pairs),
                content_type="application/x-ndjson",
            )
        await rt.io(
            rt.store.put_bytes,
            keys.doc_text(tenant, sid, doc.doc_id),
            extracted.text.encode(),
            content_type="text/markdown; charset=utf-8",
        )
        await rt.io(rt.store.put_json, keys.doc_pages(tenant, sid, doc.doc_id), extracted.pages)
        out_doc.format, out_doc.chars, out_doc.pages = fmt, len(extracted.text), len(extracted.pages)
        out_doc.status, out_doc.error = D.DOCUMENT_STATUS_READY, ""
    except (
        InvalidArgument,
        ResourceExhausted,
        FailedPrecondition,
        NotFound,
        PermissionDenied,
        Unavailable,
    ) as exc:
        # A bad or unreachable document fails alone; the session goes on with the others.
        out_doc.status, out_doc.error = D.DOCUMENT_STATUS_FAILED, exc.message
        log.warning("document %s (%s) failed: %s", doc.doc_id, doc.name, exc.message)
    return out_doc


async def ingest_session(rt: Runtime, item: events_pb2.WorkItem, rec: session_pb2.Session) -> None:
    started = time.monotonic()
    sid, tenant = item.session_id, item.tenant
    docs = list(rec.documents)
    for i, doc in enumerate(docs):
        await events.progress(rt.bus, sid, session_pb2.STAGE_INGEST, i, len(docs), f"extracting {doc.name}")
        if doc.status != D.DOCUMENT_STATUS_PENDING:
            continue  # done in an earlier delivery
        done = await _ingest_document(rt, tenant, sid, doc, rec.options.passwords.get(doc.doc_id))

        def set_doc(r, done=done):
            ready = {d.sha256 for d in r.documents if d.status == D.DOCUMENT_STATUS_READY and d.sha256}
            if done.status == D.DOCUMENT_STATUS_READY and done.kind == "url" and done.sha256 in ready:
                done.status, done.error = D.DOCUMENT_STATUS_FAILED, "the same content as another document"
            for d in r.documents:
                if d.doc_id == done.doc_id:
                    d.CopyFrom(done)

        rec = await rt.sessions.update(sid, set_doc)
    await events.progress(rt.bus, sid, session_pb2.STAGE_INGEST, len(docs), len(docs), "extracted")
    if not any(d.status == D.DOCUMENT_STATUS_READY for d in rec.documents):
        reasons = "; ".join(f"{d.name}: {d.error}" for d in rec.documents if d.error)
        raise InvalidArgument(f"no document gave text to learn from ({reasons})")
    await rt.sessions.update(sid, lambda r: mark_stage(r, session_pb2.STAGE_INGEST, finished=True))
    await rt.handoff(item, session_pb2.STAGE_INGEST, session_pb2.STAGE_QAGEN, time.monotonic() - started)


# before generation or training runs, or after the pipeline ended (not cancelled)
ADD_SOURCE_STATES = frozenset(
    {
        S.SESSION_STATE_QUEUED,
        S.SESSION_STATE_INGESTING,
        S.SESSION_STATE_AWAITING_REVIEW,
        S.SESSION_STATE_READY,
        S.SESSION_STATE_FAILED,
    }
)


class IngestServicer(ingest_pb2_grpc.IngestServiceServicer):
    def __init__(self, rt: Runtime):
        self.rt = rt

    async def Upload(self, request_iterator, context):
        return await receive_upload(self.rt, request_iterator)

    async def AddSource(self, request, context):
        rec = await self.rt.sessions.get(request.session_id)
        if rec.state not in ADD_SOURCE_STATES:
            raise FailedPrecondition(
                f"documents can be added before training or after it; session {rec.session_id} is "
                f"{state_name(rec.state)}"
                + (": wait until generation has finished" if rec.state == S.SESSION_STATE_GENERATING else "")
            )
        doc = await add_source(self.rt, rec.tenant, rec.session_id, request.source)
        if doc.sha256 and any(d.sha256 == doc.sha256 for d in rec.documents):
            await self.rt.io(self.rt.store.delete, keys.doc_original(rec.tenant, rec.session_id, doc.doc_id))
            raise AlreadyExists("the session already has a document with the same content")
        ready = rec.state == S.SESSION_STATE_READY

        def add(r):
            r.documents.append(doc)
            if request.source.password:
                r.options.passwords[doc.doc_id] = request.source.password
            if ready:  # the new training continues from the bot's adapter
                r.continue_from = r.adapter_id

        # a new round: work of the old one still queued or running is dropped; ingest skips the
        # documents already done and generation the documents it already did
        await self.rt.restart(
            rec.session_id, session_pb2.STAGE_INGEST, allowed_from=ADD_SOURCE_STATES, change=add
        )
        return ingest_pb2.AddSourceResponse(document=doc)

    async def ListDocuments(self, request, context):
        rec = await self.rt.sessions.get(request.session_id)
        return ingest_pb2.ListDocumentsResponse(documents=rec.documents)

    async def GetDocumentText(self, request, context):
        rec = await self.rt.sessions.get(request.session_id)
        doc = next((d for d in rec.documents if d.doc_id == request.doc_id), None)
        if doc is None:
            raise NotFound(f"document {request.doc_id!r} not found in session {rec.session_id}")
        if doc.status != D.DOCUMENT_STATUS_READY:
            raise FailedPrecondition(f"document {doc.doc_id} has no text yet ({D.Name(doc.status)})")
        data = await self.rt.io(
            self.rt.store.get_bytes, keys.doc_text(rec.tenant, rec.session_id, doc.doc_id)
        )
        return ingest_pb2.GetDocumentTextResponse(text=data.decode("utf-8"))
