"""Cloning a shared bot: whoever holds a share link's token copies the bot into their own tenant as
a new session of theirs.

What is copied: the documents' extracted text and page maps, the chunks, the QA pairs and the QA
generation state (so adding a document to the clone later generates only the new one), and unless
`pairs_only` the adapter, under a new adapter id (the new session id), so the clone chats at once
(READY). With `pairs_only` the clone trains its own adapter from the copied pairs (queued for
training). Originals, passwords and a queue priority are never copied; the clone's owner is the
caller's key.

The source record is read without the caller's tenant filter (it is another tenant's); the share
link, checked here, is what grants it."""

from __future__ import annotations

import json
import logging

from doclora.v1 import events_pb2, session_pb2
from services.common import access, events, keys
from services.common.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
)
from services.common.queue_position import mark_train_queued
from services.common.runtime import Runtime
from services.ingest.session_rules import check_in_flight, check_key_limits

log = logging.getLogger(__name__)
S = session_pb2.SessionState
D = session_pb2.DocumentStatus


async def shared_session(rt: Runtime, share_token: str) -> session_pb2.Session:
    """The session a share token stands for; NOT_FOUND for an unknown or revoked token,
    PERMISSION_DENIED for a link whose owner did not let it show the documents (citations)."""
    if not share_token.strip().startswith(access.SHARE_PREFIX):
        raise InvalidArgument("share_token must be a share link's token (dls_...)")
    try:
        shared = await access.AccessStore(rt.bus).resolve(share_token)
    except Unauthenticated:
        raise NotFound("this share link was revoked or never existed") from None
    link = shared.share
    if not link.show_citations:  # a copy holds the documents' text: only what the link shows
        raise PermissionDenied(
            "this bot was shared without its documents (no citations), so it cannot be copied; ask its "
            "owner for a link that shows citations"
        )
    try:
        data, _ = await rt.bus.kv_get(link.session_id)
    except NotFound:
        raise NotFound("the shared bot no longer exists") from None
    rec = session_pb2.Session.FromString(data)
    if rec.tenant != link.tenant:
        raise NotFound("the shared bot no longer exists")
    return rec


def _copy_objects(store, src: session_pb2.Session, tenant: str, sid: str, adapter: bool) -> list[str]:
    """Blocking: copy the documents' text and pages, chunks, pairs and QA state (and the adapter)
    of `src` into session `sid` of `tenant`; returns the doc ids whose text was copied. What must be
    there (the pairs; the adapter unless pairs only) is checked before anything is copied, so a
    refused clone leaves nothing behind."""
    prefix = keys.adapter_prefix(src.tenant, src.adapter_id)
    names = [k[len(prefix) :] for k in store.list(prefix)] if adapter else []
    if not store.exists(keys.qa_pairs(src.tenant, src.session_id)):
        raise FailedPrecondition("the shared bot has no question-answer pairs to copy")
    if adapter and "adapter_config.json" not in names:
        raise FailedPrecondition("the shared bot has no adapter yet: clone its pairs only (pairs_only)")
    copied = []

    def copy(src_key: str, dst_key: str) -> bool:
        try:
            store.copy(src_key, dst_key)
        except NotFound:
            return False
        return True

    for doc in src.documents:
        if doc.status != D.DOCUMENT_STATUS_READY:
            continue
        if copy(
            keys.doc_text(src.tenant, src.session_id, doc.doc_id), keys.doc_text(tenant, sid, doc.doc_id)
        ):
            copy(
                keys.doc_pages(src.tenant, src.session_id, doc.doc_id),
                keys.doc_pages(tenant, sid, doc.doc_id),
            )
            copied.append(doc.doc_id)
    for key_of in (keys.chunks, keys.qa_pairs, keys.qa_state):
        copy(key_of(src.tenant, src.session_id), key_of(tenant, sid))
    if adapter:
        new_prefix = keys.adapter_prefix(tenant, sid)
        # adapter_config.json last: a reader waiting for it then finds the rest (as the trainer stores)
        for name in sorted(names, key=lambda n: n == "adapter_config.json"):
            if name == "doclora.json":
                meta = store.get_json(prefix + name)
                meta.update(adapter_id=sid, session_id=sid, cloned_from=src.adapter_id)
                store.put_bytes(new_prefix + name, json.dumps(meta).encode(), content_type="application/json")
            else:
                store.copy(prefix + name, new_prefix + name)
    return copied


async def clone_shared_bot(rt: Runtime, share_token: str, pairs_only: bool, name: str) -> session_pb2.Session:
    """Copy the bot of `share_token` into a new session of the caller's tenant (see the module
    docstring); returns the new record: READY with the copied adapter, or queued for training."""
    caller = access.acting(rt.settings)
    if caller.role == "share":
        raise PermissionDenied("a share link can only chat with its bot")
    src = await shared_session(rt, share_token)
    if not pairs_only and not src.adapter_id:
        raise FailedPrecondition("the shared bot has no adapter yet: clone its pairs only (pairs_only)")
    options = session_pb2.SessionOptions.FromString(src.options.SerializeToString())
    options.ClearField("passwords")
    options.ClearField("priority")
    if pairs_only:  # it trains under the caller's key: the key's limits apply
        check_key_limits(rt, caller, options)
        await check_in_flight(rt, caller)
    sid = keys.new_id()
    copied = await rt.io(_copy_objects, rt.store, src, caller.tenant, sid, not pairs_only)
    docs = [d for d in src.documents if d.doc_id in copied]
    rec = session_pb2.Session(
        session_id=sid,
        tenant=caller.tenant,
        name=name.strip() or src.name,
        documents=docs,
        options=options,
        qa=src.qa,
        owner_key_id=caller.key_id,
    )
    if pairs_only:
        rec.state = S.SESSION_STATE_TRAINING
        mark_train_queued(rec)
    else:
        rec.state = S.SESSION_STATE_READY
        rec.adapter_id = sid
        rec.train.CopyFrom(src.train)
    rec = await rt.sessions.create(rec)
    await events.publish(rt.bus, rec.tenant, sid, events_pb2.Event(state=events_pb2.StateChanged(state=rec.state)))
    if pairs_only:
        await rt.enqueue_for(rec, session_pb2.STAGE_TRAIN)
    log.info(
        "session %s cloned from the shared bot %s (%s)",
        sid,
        src.session_id,
        "pairs only, training" if pairs_only else "with its adapter",
    )
    return rec
