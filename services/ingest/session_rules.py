"""The rules of a session's life as the front door applies them: creating one from its sources (the
same content twice is stored once), adding a document later (a new round), cancelling, approving
after review, retraining from the right stage, watching, and reading a document's text back.

Invariants: a record leaves the service only through `redact` (document passwords never leave it);
every change of state goes through the session repo's `transition` or the runtime's `restart` with
the states it may come from, so two requests racing cannot both win. The state names themselves and
the stage bookkeeping live in `services/common/sessions.py`; this module is the ingest service's
own use of them."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Iterable

from doclora.v1 import events_pb2, session_pb2, session_service_pb2
from services.common import access, events, keys
from services.common.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    TooManyRequests,
    Unavailable,
)
from services.common.options import check_session_options, merge_options
from services.common.queue_position import mark_train_queued, queue_positions, waiting_for_training
from services.common.runtime import Runtime
from services.common.sessions import FINAL_STATES, stage_name, state_name
from services.ingest.sources import add_source, check_source, drop_original, store_source

log = logging.getLogger(__name__)
S = session_pb2.SessionState
D = session_pb2.DocumentStatus

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


def redact(rec: session_pb2.Session) -> session_pb2.Session:
    """The record as clients see it: document passwords never leave the service."""
    if rec.options.passwords:
        rec = session_pb2.Session.FromString(rec.SerializeToString())
        rec.options.ClearField("passwords")
    return rec


def retry_documents(rec: session_pb2.Session) -> list[session_pb2.DocumentInfo]:
    """The documents that failed for a passing reason (`retryable`: a link away for longer than the
    outage window) and are worth another try."""
    return [d for d in rec.documents if d.status == session_pb2.DOCUMENT_STATUS_FAILED and d.retryable]


def restart_stage(rec: session_pb2.Session, has_pairs: bool) -> int:
    """Where a finished session runs again from: ingest when a document failed for a passing reason
    (it is fetched again), else training when its pairs are there and generation did not fail, else
    generation when a document has text, else ingest."""
    if retry_documents(rec):
        return session_pb2.STAGE_INGEST
    failed_early = rec.state == S.SESSION_STATE_FAILED and rec.error.stage in (
        session_pb2.STAGE_INGEST,
        session_pb2.STAGE_QAGEN,
    )
    if has_pairs and not failed_early:
        return session_pb2.STAGE_TRAIN
    if any(d.status == session_pb2.DOCUMENT_STATUS_READY for d in rec.documents):
        return session_pb2.STAGE_QAGEN
    return session_pb2.STAGE_INGEST


def check_key_limits(rt: Runtime, caller: access.Caller, options: session_pb2.SessionOptions) -> None:
    """Refuse what the caller's key may not ask for: more training steps than its limit (429), a
    queue priority (admins only)."""
    most = access.effective_limit(caller, "max_steps", rt.settings.key_max_steps)
    if most and options.HasField("max_steps") and options.max_steps > most:
        raise TooManyRequests(
            f"this API key may train at most {most} steps per session (asked {options.max_steps})",
            retry_after_s=3600,
        )
    if options.priority and not caller.is_admin:
        raise PermissionDenied("only an admin API key may set a session's priority")


async def check_in_flight(rt: Runtime, caller: access.Caller) -> None:
    """Refuse a new session while the caller's key has its limit of sessions not yet final (429)."""
    most = access.effective_limit(caller, "max_sessions_in_flight", rt.settings.key_max_sessions_in_flight)
    if not most or not caller.key_id:
        return
    busy = [
        s for s in await rt.sessions.list() if s.owner_key_id == caller.key_id and s.state not in FINAL_STATES
    ]
    if len(busy) >= most:
        raise TooManyRequests(
            f"this API key has {len(busy)} sessions in progress (at most {most}); try again when one "
            "has finished",
            retry_after_s=60,
        )


async def create_session(
    rt: Runtime,
    name: str,
    sources: Iterable[session_service_pb2.Source],
    options: session_pb2.SessionOptions,
) -> session_pb2.Session:
    """Store each source's original, write the record (QUEUED) and queue ingest; returns the record."""
    sources = list(sources)
    if not sources:
        raise InvalidArgument("a session needs at least one source")
    check_session_options(options)
    caller = access.acting(rt.settings)
    check_key_limits(rt, caller, options)
    await check_in_flight(rt, caller)
    tenant = caller.tenant
    sid = keys.new_id()
    docs = []
    seen = set()
    passwords = {}
    # every source is checked before any is stored: a refused one leaves nothing behind
    checked = [await check_source(rt, tenant, src) for src in sources]
    try:
        for one in checked:
            doc = await store_source(rt, tenant, sid, one)
            if doc.sha256 and doc.sha256 in seen:  # the same content twice is stored once
                await drop_original(rt, tenant, sid, doc)
                continue
            seen.add(doc.sha256)
            docs.append(doc)
            if one.src.password:
                passwords[doc.doc_id] = one.src.password
        session = session_pb2.Session(
            session_id=sid,
            tenant=tenant,
            name=name.strip() or docs[0].name,
            state=S.SESSION_STATE_QUEUED,
            documents=docs,
            options=options,
            owner_key_id=caller.key_id,
        )
        for doc_id, password in passwords.items():
            session.options.passwords[doc_id] = password
        session = await rt.sessions.create(session)
    except BaseException:
        # the store or NATS failed half-way: what was stored has no session (the orphan sweep is
        # the backstop when this cleaning fails too)
        with contextlib.suppress(Exception):
            await rt.io(rt.store.delete_prefix, keys.session_prefix(tenant, sid))
        raise
    try:
        await events.publish(
            rt.bus, tenant, sid, events_pb2.Event(state=events_pb2.StateChanged(state=S.SESSION_STATE_QUEUED))
        )
        await rt.enqueue_for(session, session_pb2.STAGE_INGEST)
    except Unavailable as exc:
        # the session exists: answer with it; the reconciler queues its work once NATS is back
        log.warning("session %s created but its work was not queued (%s); the reconciler will", sid, exc)
    log.info("session %s created with %d document(s)", sid, len(docs))
    return session


async def add_document(rt: Runtime, sid: str, source: session_service_pb2.Source) -> session_pb2.DocumentInfo:
    """Add one source to an existing session and run it again from ingest in a new round."""
    rec = await rt.sessions.get(sid)
    if rec.state not in ADD_SOURCE_STATES:
        raise FailedPrecondition(
            f"documents can be added before training or after it; session {rec.session_id} is "
            f"{state_name(rec.state)}"
            + (": wait until generation has finished" if rec.state == S.SESSION_STATE_GENERATING else "")
        )
    doc = await add_source(rt, rec.tenant, rec.session_id, source)
    if doc.sha256 and any(d.sha256 == doc.sha256 for d in rec.documents):
        await drop_original(rt, rec.tenant, rec.session_id, doc)
        raise AlreadyExists("the session already has a document with the same content")
    ready = rec.state == S.SESSION_STATE_READY

    def add(r):
        r.documents.append(doc)
        if source.password:
            r.options.passwords[doc.doc_id] = source.password
        if ready:  # the new training continues from the bot's adapter
            r.continue_from = r.adapter_id

    # a new round: work of the old one still queued or running is dropped; ingest skips the
    # documents already done and generation the documents it already did
    await rt.restart(rec.session_id, session_pb2.STAGE_INGEST, allowed_from=ADD_SOURCE_STATES, change=add)
    return doc


async def document_text(rt: Runtime, sid: str, doc_id: str) -> str:
    """The extracted text of one of the session's documents, once ingest made it READY."""
    rec = await rt.sessions.get(sid)
    doc = next((d for d in rec.documents if d.doc_id == doc_id), None)
    if doc is None:
        raise NotFound(f"document {doc_id!r} not found in session {rec.session_id}")
    if doc.status != D.DOCUMENT_STATUS_READY:
        raise FailedPrecondition(f"document {doc.doc_id} has no text yet ({D.Name(doc.status)})")
    data = await rt.io(rt.store.get_bytes, keys.doc_text(rec.tenant, rec.session_id, doc.doc_id))
    return data.decode("utf-8")


async def placed(rt: Runtime, rec: session_pb2.Session) -> session_pb2.Session:
    """The record with its place in the training queue, when it waits for a trainer."""
    if waiting_for_training(rec):
        rec.queue_position = queue_positions(await rt.sessions.list()).get(rec.session_id, 0)
    return rec


async def get_session(rt: Runtime, sid: str) -> session_pb2.Session:
    """The session's record, with its place in the training queue."""
    return await placed(rt, await rt.sessions.get(sid))


async def list_sessions(rt: Runtime, limit: int) -> list[session_pb2.Session]:
    """The first `limit` records, each with its place in the training queue."""
    if limit < 1:
        raise InvalidArgument(f"limit must be at least 1, got {limit}")
    sessions = await rt.sessions.list()
    places = queue_positions(sessions)
    for s in sessions:
        s.queue_position = places.get(s.session_id, 0)
    return sessions[:limit]


async def watch_session(rt: Runtime, sid: str) -> AsyncIterator[tuple[events_pb2.Event, session_pb2.Session]]:
    """Each event of the session with the record as it is after it, until a final state; a session
    already in a final state gives that state once."""
    rec = await rt.sessions.get(sid)
    if rec.state in FINAL_STATES:
        ev = events_pb2.Event(session_id=rec.session_id, state=events_pb2.StateChanged(state=rec.state))
        ev.time.CopyFrom(rec.updated_at)
        yield ev, rec
        return
    async with contextlib.aclosing(rt.bus.watch_events(rec.tenant, sid)) as stream:
        async for _kind, data in stream:
            ev = events.parse(data)
            rec = await placed(rt, await rt.sessions.get(sid))
            yield ev, rec
            if ev.WhichOneof("kind") == "state" and rec.state in FINAL_STATES:
                return


async def cancel_session(rt: Runtime, sid: str) -> session_pb2.Session:
    """Stop a session in any state but a final one."""
    return await rt.sessions.transition(
        sid,
        S.SESSION_STATE_CANCELLED,
        allowed_from=set(S.values()) - FINAL_STATES,
    )


async def approve_session(rt: Runtime, sid: str) -> session_pb2.Session:
    """Send a reviewed session to training, when it has enough question-answer pairs."""
    rec = await rt.sessions.get(sid)
    if rec.state != S.SESSION_STATE_AWAITING_REVIEW:
        raise FailedPrecondition(
            f"only a session awaiting review can be approved; {rec.session_id} is {state_name(rec.state)}"
        )
    if rec.qa.pairs < rt.settings.min_pairs:
        raise FailedPrecondition(
            f"the session has {rec.qa.pairs} question-answer pairs; at least {rt.settings.min_pairs} "
            "are needed to train: add some before approving"
        )
    rec = await rt.sessions.transition(
        rec.session_id,
        S.SESSION_STATE_TRAINING,
        allowed_from={S.SESSION_STATE_AWAITING_REVIEW},
        extra=mark_train_queued,
    )
    await rt.enqueue_for(rec, session_pb2.STAGE_TRAIN)
    return rec


async def retrain_session(
    rt: Runtime, sid: str, override: session_pb2.SessionOptions | None, from_scratch: bool
) -> session_pb2.Session:
    """Run a finished session again in a new round, from `restart_stage`, with `override` merged
    into its options (passwords cannot be changed this way); a READY bot's training continues from
    its adapter unless `from_scratch`."""
    rec = await rt.sessions.get(sid)
    if rec.state not in FINAL_STATES:
        raise FailedPrecondition(
            f"session {rec.session_id} is {state_name(rec.state)}; retrain it once it is ready, "
            "failed or cancelled"
        )
    if override is not None:
        override = session_pb2.SessionOptions.FromString(override.SerializeToString())
        override.ClearField("passwords")
        check_session_options(override)
        check_key_limits(rt, access.acting(rt.settings), override)
    try:
        await rt.io(rt.store.stat, keys.qa_pairs(rec.tenant, rec.session_id))
        has_pairs = True
    except NotFound:
        has_pairs = False
    stage = restart_stage(rec, has_pairs)
    ready = rec.state == S.SESSION_STATE_READY

    def change(r):
        if override is not None:
            merge_options(r.options, override)
        r.continue_from = r.adapter_id if ready and not from_scratch else ""
        for d in retry_documents(r):  # pending again: the ingest of this round tries it
            d.status, d.error, d.retryable = session_pb2.DOCUMENT_STATUS_PENDING, "", False

    rec = await rt.restart(rec.session_id, stage, allowed_from=set(FINAL_STATES), change=change)
    log.info("session %s runs again from %s (round %d)", rec.session_id, stage_name(stage), rec.round)
    return rec
