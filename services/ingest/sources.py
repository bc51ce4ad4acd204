"""Source intake: one source a person hands over (pasted text, a link, an upload) becomes a pending
document of a session. Its original bytes are stored before the document is returned, so nothing
handed over is lost; what can never be learned from (empty text, a link that is not http(s), an
unknown upload) is refused here, and the ingest worker checks the rest when it extracts."""

from __future__ import annotations

import hashlib
from urllib.parse import urlsplit

from doclora.v1 import session_pb2, session_service_pb2
from services.common import keys
from services.common.errors import InvalidArgument, NotFound, ResourceExhausted
from services.common.runtime import Runtime


def check_text(text: str, *, max_bytes: int, min_chars: int) -> bytes:
    """Validate pasted text and return its UTF-8 bytes."""
    data = text.encode("utf-8")
    if len(data) > max_bytes:
        raise ResourceExhausted(f"text is {len(data)} bytes; the limit is {max_bytes} bytes")
    stripped = text.strip()
    if not stripped:
        raise InvalidArgument("text is empty")
    if len(stripped) < min_chars:
        raise InvalidArgument(
            f"text is too short to learn from: {len(stripped)} characters, at least {min_chars} needed"
        )
    return data


async def store_text_document(
    rt: Runtime, tenant: str, sid: str, text: str, name: str
) -> session_pb2.DocumentInfo:
    """Validate pasted text and store it as a new document's original; returns its record entry."""
    data = check_text(text, max_bytes=rt.settings.max_text_bytes, min_chars=rt.settings.min_text_chars)
    digest = hashlib.sha256(data).hexdigest()
    doc = session_pb2.DocumentInfo(
        doc_id=keys.new_id("d"),
        name=name or "pasted text",
        kind="text",
        sha256=digest,
        size_bytes=len(data),
        status=session_pb2.DOCUMENT_STATUS_PENDING,
    )
    await rt.io(
        rt.store.put_bytes,
        keys.doc_original(tenant, sid, doc.doc_id),
        data,
        content_type="text/plain; charset=utf-8",
        metadata={"sha256": digest},
    )
    return doc


def check_url(url: str) -> str:
    """Refuse what can never be fetched before a session is made; the worker checks the rest."""
    url = url.strip()
    parsed = urlsplit(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise InvalidArgument(f"only http and https links can be learned from, got {url[:200]!r}")
    if len(url) > 4096:
        raise InvalidArgument("the link is longer than 4096 characters")
    return url


async def take_upload(
    rt: Runtime, tenant: str, sid: str, upload_id: str, name: str
) -> session_pb2.DocumentInfo:
    """Move an upload into the session as a document (a server-side copy, then the upload goes)."""
    if not keys.is_valid_id(upload_id):
        raise NotFound(f"upload {upload_id!r} not found")
    src = keys.upload(tenant, upload_id)
    info = await rt.io(rt.store.stat, src)  # NotFound for an unknown or already used upload
    doc = session_pb2.DocumentInfo(
        doc_id=keys.new_id("d"),
        name=name or info.metadata.get("filename", "upload"),
        kind="upload",
        sha256=info.sha256 or "",
        size_bytes=info.size,
        status=session_pb2.DOCUMENT_STATUS_PENDING,
    )
    await rt.io(rt.store.copy, src, keys.doc_original(tenant, sid, doc.doc_id))
    await rt.io(rt.store.delete, src)
    return doc


async def add_source(
    rt: Runtime, tenant: str, sid: str, src: session_service_pb2.Source
) -> session_pb2.DocumentInfo:
    """Turn one source into a pending document of session `sid`; its bytes are stored first."""
    kind = src.WhichOneof("kind")
    if kind == "text":
        return await store_text_document(rt, tenant, sid, src.text, src.name)
    if kind == "url":
        url = check_url(src.url)
        return session_pb2.DocumentInfo(
            doc_id=keys.new_id("d"),
            name=src.name or url,
            kind="url",
            status=session_pb2.DOCUMENT_STATUS_PENDING,
            final_url=url,
        )
    if kind == "upload_id":
        return await take_upload(rt, tenant, sid, src.upload_id, src.name)
    raise InvalidArgument("a source needs text, a url or an upload_id")


async def drop_original(rt: Runtime, tenant: str, sid: str, doc: session_pb2.DocumentInfo) -> None:
    """Delete the stored original of a document that is not kept (the same content twice)."""
    await rt.io(rt.store.delete, keys.doc_original(tenant, sid, doc.doc_id))
