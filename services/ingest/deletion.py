"""Deleting a session, or one document of a finished session, and sweeping up what a deletion raced.

`delete_session` stops the session's work first (it becomes CANCELLED: every worker drops its work
when it next looks at the record, and the trainer's watcher stops a run within a second), then
deletes everything of it from the store (the session folder: originals, text, chunks, pairs,
checkpoints; and the adapter of every round, `{sid}` and `{sid}-r{n}`), its record and its events,
and tells every inference replica (`keys.deleted_subject`) to drop its adapters from memory and
from their local cache. Uploads a session took are not left behind: taking one moves it into the
session folder (`sources.store_source`).

The race, and what closes it: a worker may be writing when the delete comes, e.g. ingest storing a
document's text, or the trainer storing an adapter whose last step finished just before the
cancel. Such a write can land after the folders were deleted. The trainer's own checkpoints are
not at risk (its checkpoint upload runs in the training thread, which stops after it and then
deletes the session's checkpoints itself), but the rest is: `sweep_orphans`, run periodically
(`sweep_orphans_forever`), deletes every session folder and adapter whose session record is gone
once its newest object is older than `ORPHAN_GRACE_S`, so nothing of a deleted session outlives
its deletion by more than that grace and a sweep interval. The grace keeps the sweep away from
sessions being created (their objects are stored before their record).

`delete_document` removes one document of a READY, FAILED or CANCELLED session: its entry in the
record (and its password, if any), its files, its chunks and its pairs. The bot keeps its adapter
until it is retrained."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time

from doclora.v1 import session_pb2
from services.common import access, keys
from services.common.bus import EVENTS_STREAM, event_prefix
from services.common.errors import FailedPrecondition, NotFound
from services.common.jsonl import from_jsonl, to_jsonl
from services.common.runtime import Runtime, repeat_until_stopped
from services.common.sessions import FINAL_STATES, state_name
from services.ingest.session_rules import cancel_session

log = logging.getLogger(__name__)

# a folder without a record is left alone this long after its last write (see the module docstring)
ORPHAN_GRACE_S = 3600.0
SWEEP_EVERY_S = 900.0


def session_adapter_ids(store, tenant: str, sid: str) -> list[str]:
    """Blocking: the ids of the adapters stored for any round of session `sid`."""
    folder = keys.adapters_prefix(tenant)
    # a plain S3 prefix: "{sid}" also matches "{sid}-r2/" and a longer id, which the check drops
    found = (k[len(folder) :].rstrip("/") for k in store.iter_keys(folder + sid, recursive=False))
    return [aid for aid in found if keys.session_of_adapter(aid) == sid]


def _delete_session_objects(store, tenant: str, sid: str) -> int:
    """Blocking: delete the session folder and every round's adapter; how many objects went."""
    removed = store.delete_prefix(keys.session_prefix(tenant, sid))
    for aid in session_adapter_ids(store, tenant, sid):
        removed += store.delete_prefix(keys.adapter_prefix(tenant, aid))
    return removed


async def announce_deleted(rt: Runtime, tenant: str, sid: str) -> None:
    """Tell every inference replica that session `sid` of `tenant` is gone (core NATS)."""
    body = json.dumps({"tenant": tenant, "session_id": sid}).encode()
    await rt.bus.nc.publish(keys.deleted_subject(sid), body)
    await rt.bus.nc.flush(timeout=5)


async def delete_session(rt: Runtime, sid: str) -> int:
    """Stop and delete a session of the caller's tenant with all its objects; returns how many
    objects were deleted. NOT_FOUND for an unknown id or another tenant's session."""
    rec = await rt.sessions.get(sid)
    tenant, sid = rec.tenant, rec.session_id
    if rec.state not in FINAL_STATES:
        with contextlib.suppress(FailedPrecondition):  # it ended on its own in the meantime
            await cancel_session(rt, sid)
    removed = await rt.io(_delete_session_objects, rt.store, tenant, sid)
    await rt.bus.kv_delete(sid)
    with contextlib.suppress(Exception):  # the events age out anyway (events_max_age_s)
        await rt.bus.js.purge_stream(EVENTS_STREAM, subject=event_prefix(rec.tenant, sid) + ">")
    await announce_deleted(rt, tenant, sid)
    log.info("session %s deleted (%d objects)", sid, removed)
    return removed


def _without_doc(store, tenant: str, sid: str, doc_id: str) -> tuple[list[dict], list[dict]]:
    """Blocking: rewrite the session's chunks, pairs and generation state without `doc_id`'s;
    returns the (pairs, chunk rows) kept."""
    kept: dict[str, list[dict]] = {}
    for key in (keys.chunks(tenant, sid), keys.qa_pairs(tenant, sid)):
        if not store.exists(key):
            kept[key] = []
            continue

        def without(data: bytes | None, key: str = key) -> bytes:
            # a conditional write: a pair edit on another qagen replica meanwhile is kept
            kept[key] = [r for r in from_jsonl(data or b"") if r.get("doc_id") != doc_id]
            return to_jsonl(kept[key])

        store.mutate(key, without, content_type="application/x-ndjson")
    try:
        state = store.get_json(keys.qa_state(tenant, sid))
    except NotFound:
        state = None
    if state is not None:  # qagen's record of the documents it did (services/qagen/qa_state.py)
        state["done"] = [d for d in state.get("done", []) if d != doc_id]
        for field in ("failed", "dropped"):
            state.get(field, {}).pop(doc_id, None)
        store.put_json(keys.qa_state(tenant, sid), state)
    return kept[keys.qa_pairs(tenant, sid)], kept[keys.chunks(tenant, sid)]


def _count_pairs(qa: session_pb2.QAStats, pairs: list[dict], chunk_rows: list[dict]) -> None:
    """The record's pair and chunk counts after a document went."""
    with_pairs = {p.get("chunk_id") for p in pairs if p.get("chunk_id")}
    chunk_ids = {c.get("chunk_id") for c in chunk_rows}
    qa.pairs = len(pairs)
    qa.chunks = len(chunk_rows)
    qa.chunks_with_pairs = len(with_pairs & chunk_ids)
    qa.coverage = qa.chunks_with_pairs / qa.chunks if qa.chunks else 0.0
    qa.eval_pairs = sum(p.get("split") == "eval" for p in pairs)
    qa.exam_pairs = sum(p.get("split") == "exam" for p in pairs)


async def delete_document(rt: Runtime, sid: str, doc_id: str) -> tuple[session_pb2.Session, int]:
    """Remove one document of a finished session: its record entry, files, chunks and pairs; the
    adapter stays until the session is retrained. Returns the record and the objects deleted."""
    rec = await rt.sessions.get(sid)
    if not any(d.doc_id == doc_id for d in rec.documents):
        raise NotFound(f"document {doc_id!r} not found in session {rec.session_id}")

    def drop(r: session_pb2.Session) -> None:
        # checked again inside the compare-and-swap: a retrain racing this one cannot slip between
        if r.state not in FINAL_STATES:
            raise FailedPrecondition(
                f"documents can be deleted once the session is ready, failed or cancelled; "
                f"{r.session_id} is {state_name(r.state)}"
            )
        kept = [d for d in r.documents if d.doc_id != doc_id]
        if len(kept) == len(r.documents):  # (a NotFound here would read as the session's)
            raise FailedPrecondition(f"document {doc_id!r} was deleted meanwhile by another request")
        if not kept:
            raise FailedPrecondition("this is the session's only document: delete the session instead")
        del r.documents[:]
        r.documents.extend(kept)
        r.options.passwords.pop(doc_id, None)

    rec = await rt.sessions.update(rec.session_id, drop)
    tenant = rec.tenant
    removed = await rt.io(rt.store.delete_prefix, keys.doc_prefix(tenant, rec.session_id, doc_id))
    pairs, chunk_rows = await rt.io(_without_doc, rt.store, tenant, rec.session_id, doc_id)
    rec = await rt.sessions.update(rec.session_id, lambda r: _count_pairs(r.qa, pairs, chunk_rows))
    log.info("document %s of session %s deleted (%d objects)", doc_id, rec.session_id, removed)
    return rec, removed


# ---------------------------------------------------------------- orphans


def _newest_write(store, prefix: str) -> float:
    """Blocking: the time of the newest object under `prefix` (0 when there is none)."""
    return max((modified or 0.0 for _, modified in store.iter_modified(prefix)), default=0.0)


async def sweep_orphans(rt: Runtime, now: float, grace_s: float = ORPHAN_GRACE_S) -> int:
    """Delete session folders and adapters whose session record is gone and that nobody wrote for
    `grace_s` seconds; returns how many objects went."""
    live = set(await rt.bus.kv_keys())  # a session created after this has only fresh objects
    removed = 0
    for tenant in await rt.io(access.stored_tenants, rt.store):
        sessions, adapters = keys.sessions_prefix(tenant), keys.adapters_prefix(tenant)
        folders = [
            (folder, folder[len(sessions) :].rstrip("/"))
            for folder in await rt.io(rt.store.list, sessions, recursive=False)
        ] + [
            (folder, keys.session_of_adapter(folder[len(adapters) :].rstrip("/")))
            for folder in await rt.io(rt.store.list, adapters, recursive=False)
        ]
        for folder, sid in folders:
            if not folder.endswith("/") or sid in live:
                continue
            if now - await rt.io(_newest_write, rt.store, folder) < grace_s:
                continue
            n = await rt.io(rt.store.delete_prefix, folder)
            removed += n
            log.info("deleted %s: its session %s no longer exists (%d objects)", folder, sid, n)
    return removed


async def sweep_orphans_forever(rt: Runtime, stop: asyncio.Event, every_s: float = SWEEP_EVERY_S) -> None:
    """`sweep_orphans` every `every_s` seconds until `stop` is set (a background job)."""
    await repeat_until_stopped(stop, every_s, lambda: sweep_orphans(rt, time.time()), "orphan sweep")
