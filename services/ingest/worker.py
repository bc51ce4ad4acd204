"""The ingest stage: each pending document's original -> text.md + pages.json. A bad document fails
alone; the session goes on with the others, and fails only when none of them gave text."""

from __future__ import annotations

import logging
import time

from doclora.v1 import events_pb2, ingest_pb2, ingest_pb2_grpc, session_pb2
from services.common import events, keys
from services.common.errors import FailedPrecondition, InvalidArgument, NotFound
from services.common.runtime import Runtime
from services.common.sessions import mark_stage, state_name
from services.ingest.extract import extract
from services.ingest.sessions_api import store_text_document

log = logging.getLogger(__name__)
S = session_pb2.SessionState
D = session_pb2.DocumentStatus


async def ingest_session(rt: Runtime, item: events_pb2.WorkItem, rec: session_pb2.Session) -> None:
    started = time.monotonic()
    sid, tenant = item.session_id, item.tenant
    docs = list(rec.documents)
    for i, doc in enumerate(docs):
        await events.progress(rt.bus, sid, session_pb2.STAGE_INGEST, i, len(docs), f"extracting {doc.name}")
        if doc.status != D.DOCUMENT_STATUS_PENDING:
            continue  # done in an earlier delivery
        status, error, chars = D.DOCUMENT_STATUS_READY, "", 0
        try:
            data = await rt.io(rt.store.get_bytes, keys.doc_original(tenant, sid, doc.doc_id))
            out = await rt.io(extract, data, doc.kind)
            await rt.io(rt.store.put_bytes, keys.doc_text(tenant, sid, doc.doc_id), out.text.encode(),
                        content_type="text/markdown; charset=utf-8")
            await rt.io(rt.store.put_json, keys.doc_pages(tenant, sid, doc.doc_id), out.pages)
            chars = len(out.text)
        except (InvalidArgument, NotFound) as exc:
            status, error = D.DOCUMENT_STATUS_FAILED, exc.message
            log.warning("document %s failed: %s", doc.doc_id, exc.message)

        def set_doc(r, doc_id=doc.doc_id, status=status, error=error, chars=chars):
            for d in r.documents:
                if d.doc_id == doc_id:
                    d.status, d.error, d.chars = status, error, chars

        rec = await rt.sessions.update(sid, set_doc)
    await events.progress(rt.bus, sid, session_pb2.STAGE_INGEST, len(docs), len(docs), "extracted")
    if not any(d.status == D.DOCUMENT_STATUS_READY for d in rec.documents):
        reasons = "; ".join(f"{d.name}: {d.error}" for d in rec.documents if d.error)
        raise InvalidArgument(f"no document gave text to learn from ({reasons})")
    await rt.sessions.update(sid, lambda r: mark_stage(r, session_pb2.STAGE_INGEST, finished=True))
    await rt.handoff(sid, tenant, session_pb2.STAGE_INGEST, session_pb2.STAGE_QAGEN, time.monotonic() - started)


class IngestServicer(ingest_pb2_grpc.IngestServiceServicer):
    def __init__(self, rt: Runtime):
        self.rt = rt

    async def AddText(self, request, context):
        rec = await self.rt.sessions.get(request.session_id)
        if rec.state != S.SESSION_STATE_QUEUED:
            raise FailedPrecondition(
                f"documents can be added only while the session is queued; it is {state_name(rec.state)}"
            )
        doc = await store_text_document(self.rt, rec.tenant, rec.session_id, request.text, request.name)

        def add(r):
            if r.state != S.SESSION_STATE_QUEUED:
                raise FailedPrecondition("the session moved on while the document was added")
            r.documents.append(doc)

        await self.rt.sessions.update(rec.session_id, add)
        return ingest_pb2.AddTextResponse(document=doc)

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
        data = await self.rt.io(self.rt.store.get_bytes, keys.doc_text(rec.tenant, rec.session_id, doc.doc_id))
        return ingest_pb2.GetDocumentTextResponse(text=data.decode("utf-8"))
