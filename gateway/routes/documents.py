"""A session's documents (one per ingested source): listing them, reading the text extracted from
one, as the QA generator reads it, and deleting one."""

from __future__ import annotations

from fastapi import APIRouter

from doclora.v1 import ingest_pb2, session_service_pb2
from gateway.common import ClientsDep, to_json

router = APIRouter(tags=["sessions"])


@router.get("/api/v1/sessions/{session_id}/documents")
async def list_documents(session_id: str, c: ClientsDep):
    resp = await c.ingest.ListDocuments(
        ingest_pb2.ListDocumentsRequest(session_id=session_id), timeout=c.timeout
    )
    return {"documents": [to_json(d) for d in resp.documents]}


@router.get("/api/v1/sessions/{session_id}/documents/{doc_id}/text")
async def document_text(session_id: str, doc_id: str, c: ClientsDep):
    """The text extracted from one document (Markdown), as the QA generator reads it."""
    resp = await c.ingest.GetDocumentText(
        ingest_pb2.GetDocumentTextRequest(session_id=session_id, doc_id=doc_id), timeout=c.timeout
    )
    return {"doc_id": doc_id, "text": resp.text}


@router.delete("/api/v1/sessions/{session_id}/documents/{doc_id}")
async def delete_document(session_id: str, doc_id: str, c: ClientsDep):
    """Delete one document of a finished session (its files, chunks and pairs); the bot keeps its
    adapter until it is retrained."""
    resp = await c.sessions.DeleteDocument(
        session_service_pb2.DeleteDocumentRequest(session_id=session_id, doc_id=doc_id), timeout=c.timeout
    )
    return {"session": to_json(resp.session), "objects_deleted": resp.objects_deleted}
