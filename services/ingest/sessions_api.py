"""SessionService: the front door. Creating a session stores each source's original bytes first, so
nothing a person handed over is lost, then writes the record and queues ingest."""

from __future__ import annotations

import contextlib
import hashlib
import logging
from urllib.parse import urlsplit

from doclora.v1 import events_pb2, session_pb2, session_service_pb2, session_service_pb2_grpc
from services.common import events, keys
from services.common.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from services.common.options import check_session_options
from services.common.queue import mark_train_queued, queue_positions, waiting_for_training
from services.common.runtime import Runtime
from services.common.sessions import FINAL_STATES, stage_name, state_name

log = logging.getLogger(__name__)
S = session_pb2.SessionState


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


def restart_stage(rec: session_pb2.Session, has_pairs: bool) -> int:
    """Where a finished session runs again from: training when its pairs are there and generation
    did not fail, else generation when a document has text, else ingest."""
    failed_early = rec.state == S.SESSION_STATE_FAILED and rec.error.stage in (
        session_pb2.STAGE_INGEST,
        session_pb2.STAGE_QAGEN,
    )
    if has_pairs and not failed_early:
        return session_pb2.STAGE_TRAIN
    if any(d.status == session_pb2.DOCUMENT_STATUS_READY for d in rec.documents):
        return session_pb2.STAGE_QAGEN
    return session_pb2.STAGE_INGEST


def redact(rec: session_pb2.Session) -> session_pb2.Session:
    """The record as clients see it: document passwords never leave the service."""
    if rec.options.passwords:
        rec = session_pb2.Session.FromString(rec.SerializeToString())
        rec.options.ClearField("passwords")
    return rec


class SessionServicer(session_service_pb2_grpc.SessionServiceServicer):
    def __init__(self, rt: Runtime):
        self.rt = rt

    async def CreateSession(self, request, context):
        if not request.sources:
            raise InvalidArgument("a session needs at least one source")
        check_session_options(request.options)
        tenant = self.rt.settings.tenant
        sid = keys.new_id()
        docs = []
        seen = set()
        passwords = {}
        for src in request.sources:
            doc = await add_source(self.rt, tenant, sid, src)
            if doc.sha256 and doc.sha256 in seen:  # the same content twice is stored once
                await self.rt.io(self.rt.store.delete, keys.doc_original(tenant, sid, doc.doc_id))
                continue
            seen.add(doc.sha256)
            docs.append(doc)
            if src.password:
                passwords[doc.doc_id] = src.password
        session = session_pb2.Session(
            session_id=sid,
            tenant=tenant,
            name=request.name.strip() or docs[0].name,
            state=S.SESSION_STATE_QUEUED,
            documents=docs,
            options=request.options,
        )
        for doc_id, password in passwords.items():
            session.options.passwords[doc_id] = password
        session = await self.rt.sessions.create(session)
        await events.publish(
            self.rt.bus,
            sid,
            events_pb2.Event(state=events_pb2.StateChanged(state=S.SESSION_STATE_QUEUED)),
        )
        await self.rt.enqueue_for(session, session_pb2.STAGE_INGEST)
        log.info("session %s created with %d document(s)", sid, len(docs))
        return session_service_pb2.CreateSessionResponse(session=redact(session))

    async def _placed(self, rec: session_pb2.Session) -> session_pb2.Session:
        """The record with its place in the training queue, when it waits for a trainer."""
        if waiting_for_training(rec):
            rec.queue_position = queue_positions(await self.rt.sessions.list()).get(rec.session_id, 0)
        return rec

    async def GetSession(self, request, context):
        rec = await self._placed(await self.rt.sessions.get(request.session_id))
        return session_service_pb2.GetSessionResponse(session=redact(rec))

    async def ListSessions(self, request, context):
        limit = request.limit or 100
        sessions = await self.rt.sessions.list()
        places = queue_positions(sessions)
        for s in sessions:
            s.queue_position = places.get(s.session_id, 0)
        return session_service_pb2.ListSessionsResponse(sessions=[redact(s) for s in sessions[:limit]])

    async def WatchSession(self, request, context):
        rec = await self.rt.sessions.get(request.session_id)
        if rec.state in FINAL_STATES:
            ev = events_pb2.Event(session_id=rec.session_id, state=events_pb2.StateChanged(state=rec.state))
            ev.time.CopyFrom(rec.updated_at)
            yield session_service_pb2.WatchSessionResponse(event=ev, session=redact(rec))
            return
        async with contextlib.aclosing(self.rt.bus.watch_events(request.session_id)) as stream:
            async for _kind, data in stream:
                ev = events.parse(data)
                rec = await self._placed(await self.rt.sessions.get(request.session_id))
                yield session_service_pb2.WatchSessionResponse(event=ev, session=redact(rec))
                if ev.WhichOneof("kind") == "state" and rec.state in FINAL_STATES:
                    return

    async def CancelSession(self, request, context):
        rec = await self.rt.sessions.transition(
            request.session_id,
            S.SESSION_STATE_CANCELLED,
            allowed_from=set(S.values()) - FINAL_STATES,
        )
        return session_service_pb2.CancelSessionResponse(session=redact(rec))

    async def ApproveSession(self, request, context):
        rec = await self.rt.sessions.get(request.session_id)
        if rec.state != S.SESSION_STATE_AWAITING_REVIEW:
            raise FailedPrecondition(
                f"only a session awaiting review can be approved; {rec.session_id} is {state_name(rec.state)}"
            )
        if rec.qa.pairs < self.rt.settings.min_pairs:
            raise FailedPrecondition(
                f"the session has {rec.qa.pairs} question-answer pairs; at least {self.rt.settings.min_pairs} "
                "are needed to train: add some before approving"
            )
        rec = await self.rt.sessions.transition(
            rec.session_id,
            S.SESSION_STATE_TRAINING,
            allowed_from={S.SESSION_STATE_AWAITING_REVIEW},
            extra=mark_train_queued,
        )
        await self.rt.enqueue_for(rec, session_pb2.STAGE_TRAIN)
        return session_service_pb2.ApproveSessionResponse(session=redact(rec))

    async def RetrainSession(self, request, context):
        rec = await self.rt.sessions.get(request.session_id)
        if rec.state not in FINAL_STATES:
            raise FailedPrecondition(
                f"session {rec.session_id} is {state_name(rec.state)}; retrain it once it is ready, "
                "failed or cancelled"
            )
        override = request.options if request.HasField("options") else None
        if override is not None:
            override = session_pb2.SessionOptions.FromString(override.SerializeToString())
            override.ClearField("passwords")
            check_session_options(override)
        try:
            await self.rt.io(self.rt.store.stat, keys.qa_pairs(rec.tenant, rec.session_id))
            has_pairs = True
        except NotFound:
            has_pairs = False
        stage = restart_stage(rec, has_pairs)
        ready = rec.state == S.SESSION_STATE_READY

        def change(r):
            if override is not None:
                r.options.MergeFrom(override)
            r.continue_from = r.adapter_id if ready and not request.from_scratch else ""

        rec = await self.rt.restart(rec.session_id, stage, allowed_from=set(FINAL_STATES), change=change)
        log.info("session %s runs again from %s (round %d)", rec.session_id, stage_name(stage), rec.round)
        return session_service_pb2.RetrainSessionResponse(session=redact(rec))
