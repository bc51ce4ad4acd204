"""The ingest stage, and only it: each pending document's original -> text.md + pages.json. A bad
document fails alone; the session goes on with the others, and fails only when none of them gave
text. A document's password (for an encrypted PDF) is used for its extraction only: it leaves the
record in the same compare-and-swap that records the document READY or FAILED. Its RPCs are in
`service.py`, the source intake in `sources.py`."""

from __future__ import annotations

import functools
import logging
import time

from doclora.v1 import events_pb2, session_pb2
from services.common import events, keys
from services.common.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    OutageTooLong,
    PermissionDenied,
    ResourceExhausted,
)
from services.common.jsonl import to_jsonl
from services.common.runtime import Runtime, wait_out_outage
from services.common.sessions import mark_stage

log = logging.getLogger(__name__)
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
            from services.ingest.fetch import fetch_url

            # a server that is away (refused, time-out, 5xx) is asked again with back-off within
            # the outage window; after it the document fails alone and may be tried again later
            fetched = await wait_out_outage(
                functools.partial(
                    rt.io,
                    fetch_url,
                    doc.final_url or doc.name,
                    max_bytes=rt.settings.max_fetch_bytes,
                    timeout_s=rt.settings.fetch_timeout_s,
                    allow_hosts=_fetch_allowed(rt.settings),
                ),
                window_s=rt.settings.outage_window_s,
                what=f"fetching {doc.name}",
            )
            put = await rt.io(
                rt.store.put_bytes,
                key,
                fetched.data,
                content_type=fetched.content_type or "application/octet-stream",
                metadata={"source": fetched.final_url[:500]},  # AWS allows 2 KB of metadata, encoded
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
        out_doc.status, out_doc.error, out_doc.retryable = D.DOCUMENT_STATUS_READY, "", False
    except (
        InvalidArgument,
        ResourceExhausted,
        FailedPrecondition,
        NotFound,
        PermissionDenied,
        OutageTooLong,
    ) as exc:
        # A bad or unreachable document fails alone; the session goes on with the others. The
        # object store or NATS being away (`Unavailable`) is not the document's fault: it goes up,
        # and the stage waits the outage out.
        out_doc.status, out_doc.error = D.DOCUMENT_STATUS_FAILED, exc.message
        out_doc.retryable = isinstance(exc, OutageTooLong)
        log.warning("document %s (%s) failed: %s", doc.doc_id, doc.name, exc.message)
    return out_doc


async def ingest_session(rt: Runtime, item: events_pb2.WorkItem, rec: session_pb2.Session) -> None:
    """The stage handler: extract each pending document in turn (the record is updated after each,
    so a redelivery skips the done ones), then hand the session to generation."""
    started = time.monotonic()
    sid, tenant = item.session_id, item.tenant
    docs = list(rec.documents)
    for i, doc in enumerate(docs):
        await events.progress(
            rt.bus, tenant, sid, session_pb2.STAGE_INGEST, i, len(docs), f"extracting {doc.name}"
        )
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
            # its password opened it (or failed to): it is not kept once the document's ingest ended
            r.options.passwords.pop(done.doc_id, None)

        rec = await rt.sessions.update(sid, set_doc)
    await events.progress(rt.bus, tenant, sid, session_pb2.STAGE_INGEST, len(docs), len(docs), "extracted")
    if not any(d.status == D.DOCUMENT_STATUS_READY for d in rec.documents):
        reasons = "; ".join(f"{d.name}: {d.error}" for d in rec.documents if d.error)
        raise InvalidArgument(f"no document gave text to learn from ({reasons})")
    await rt.sessions.update(sid, lambda r: mark_stage(r, session_pb2.STAGE_INGEST, finished=True))
    await rt.handoff(item, session_pb2.STAGE_INGEST, session_pb2.STAGE_QAGEN, time.monotonic() - started)
