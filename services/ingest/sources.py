"""Source intake: one source a person hands over (pasted text, a link, an upload) becomes a pending
document of a session. Its original bytes are stored before the document is returned, so nothing
handed over is lost; what can never be learned from (empty text, a link that is not http(s), an
unknown upload) is refused here, and the ingest worker checks the rest when it extracts. A new
session's sources are all checked before any is stored (`check_source`, then `store_source`), so a
refused source leaves nothing of the others behind."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from urllib.parse import urlsplit

from doclora.v1 import session_pb2, session_service_pb2
from services.common import keys
from services.common.errors import InvalidArgument, NotFound, ResourceExhausted
from services.common.runtime import Runtime
from services.common.store import ObjectInfo


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


def check_url(url: str) -> str:
    """Refuse what can never be fetched before a session is made; the worker checks the rest."""
    url = url.strip()
    parsed = urlsplit(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise InvalidArgument(f"only http and https links can be learned from, got {url[:200]!r}")
    if len(url) > 4096:
        raise InvalidArgument("the link is longer than 4096 characters")
    return url


@dataclass
class CheckedSource:
    """A source that passed every check that needs no storing: its bytes (pasted text), its link,
    or its upload's stored object."""

    src: session_service_pb2.Source
    data: bytes = b""
    url: str = ""
    upload: ObjectInfo | None = None


async def check_source(rt: Runtime, tenant: str, src: session_service_pb2.Source) -> CheckedSource:
    """Refuse a source that can never be learned from (empty or over-size text, a link that is not
    http(s), an unknown upload) before anything is stored."""
    kind = src.WhichOneof("kind")
    if kind == "text":
        data = check_text(
            src.text, max_bytes=rt.settings.max_text_bytes, min_chars=rt.settings.min_text_chars
        )
        return CheckedSource(src, data=data)
    if kind == "url":
        return CheckedSource(src, url=check_url(src.url))
    if kind == "upload_id":
        if not keys.is_valid_id(src.upload_id):
            raise NotFound(f"upload {src.upload_id!r} not found")
        # NotFound for an unknown or already used upload
        return CheckedSource(src, upload=await rt.io(rt.store.stat, keys.upload(tenant, src.upload_id)))
    raise InvalidArgument("a source needs text, a url or an upload_id")


async def store_source(
    rt: Runtime, tenant: str, sid: str, checked: CheckedSource
) -> session_pb2.DocumentInfo:
    """Make a checked source a pending document of session `sid`: pasted text is stored, an upload
    moved into the session (a server-side copy, then the upload goes); a link is fetched later."""
    src = checked.src
    doc = session_pb2.DocumentInfo(doc_id=keys.new_id("d"), status=session_pb2.DOCUMENT_STATUS_PENDING)
    if checked.url:
        doc.name, doc.kind, doc.final_url = src.name or checked.url, "url", checked.url
    elif checked.upload is not None:
        info = checked.upload
        doc.name, doc.kind = src.name or info.metadata.get("filename", "upload"), "upload"
        doc.sha256, doc.size_bytes = info.sha256 or "", info.size
        upload = keys.upload(tenant, src.upload_id)
        await rt.io(rt.store.copy, upload, keys.doc_original(tenant, sid, doc.doc_id))
        await rt.io(rt.store.delete, upload)
    else:
        digest = hashlib.sha256(checked.data).hexdigest()
        doc.name, doc.kind = src.name or "pasted text", "text"
        doc.sha256, doc.size_bytes = digest, len(checked.data)
        await rt.io(
            rt.store.put_bytes,
            keys.doc_original(tenant, sid, doc.doc_id),
            checked.data,
            content_type="text/plain; charset=utf-8",
            metadata={"sha256": digest},
        )
    return doc


async def add_source(
    rt: Runtime, tenant: str, sid: str, src: session_service_pb2.Source
) -> session_pb2.DocumentInfo:
    """Turn one source into a pending document of session `sid`; its bytes are stored first."""
    return await store_source(rt, tenant, sid, await check_source(rt, tenant, src))


async def drop_original(rt: Runtime, tenant: str, sid: str, doc: session_pb2.DocumentInfo) -> None:
    """Delete the stored original of a document that is not kept (the same content twice)."""
    await rt.io(rt.store.delete, keys.doc_original(tenant, sid, doc.doc_id))
