"""Session records in the real NATS KV: create, read, compare-and-swap updates under concurrent
writers, guarded state transitions, and the events each transition publishes."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from doclora.v1 import session_pb2
from services.common import events, keys
from services.common.errors import FailedPrecondition, NotFound
from services.common.sessions import SessionRepo, mark_stage

S = session_pb2.SessionState


async def make(repo: SessionRepo) -> str:
    sid = keys.new_id()
    await repo.create(session_pb2.Session(session_id=sid, tenant="t", state=S.SESSION_STATE_QUEUED))
    return sid


async def test_a_created_session_reads_back(bus):
    """What was created is what is read, with timestamps set."""
    repo = SessionRepo(bus)
    sid = await make(repo)
    rec = await repo.get(sid)
    assert rec.session_id == sid and rec.state == S.SESSION_STATE_QUEUED
    assert rec.created_at.seconds > 0


async def test_unknown_and_malformed_ids_are_not_found(bus):
    """An unknown id and one that is not an id at all (path, wildcard) are both NOT_FOUND."""
    repo = SessionRepo(bus)
    for sid in ("0123456789abcdef", "../etc", "a.*", ""):
        with pytest.raises(NotFound):
            await repo.get(sid)


async def test_concurrent_updates_all_land(bus):
    """Twenty writers appending at once all land: compare-and-swap retries instead of clobbering."""
    repo = SessionRepo(bus)
    sid = await make(repo)

    async def add(i: int):
        await repo.update(sid, lambda r: r.documents.add(doc_id=f"d{i:02d}"))

    await asyncio.gather(*(add(i) for i in range(20)))
    rec = await repo.get(sid)
    assert sorted(d.doc_id for d in rec.documents) == [f"d{i:02d}" for i in range(20)]


async def test_transition_refuses_a_state_it_is_not_allowed_from(bus):
    """A guarded transition from the wrong state raises FAILED_PRECONDITION and changes nothing."""
    repo = SessionRepo(bus)
    sid = await make(repo)
    with pytest.raises(FailedPrecondition):
        await repo.transition(sid, S.SESSION_STATE_READY, allowed_from={S.SESSION_STATE_TRAINING})
    assert (await repo.get(sid)).state == S.SESSION_STATE_QUEUED


async def test_fail_is_a_no_op_on_a_finished_session(bus):
    """Failing a cancelled session leaves it cancelled."""
    repo = SessionRepo(bus)
    sid = await make(repo)
    await repo.transition(sid, S.SESSION_STATE_CANCELLED)
    assert await repo.fail(sid, session_pb2.STAGE_TRAIN, "INTERNAL", "late") is None
    assert (await repo.get(sid)).state == S.SESSION_STATE_CANCELLED


async def test_transitions_publish_state_and_failure_events(bus):
    """Each state change is an event; a failure also publishes the error."""
    repo = SessionRepo(bus)
    sid = await make(repo)
    await repo.transition(sid, S.SESSION_STATE_INGESTING)
    await repo.fail(sid, session_pb2.STAGE_INGEST, "INVALID_ARGUMENT", "no text")
    seen = []
    async with contextlib.aclosing(bus.watch_events("t", sid)) as stream:
        async for kind, data in stream:
            seen.append((kind, events.parse(data)))
            if kind == "failed":
                break
    kinds = [k for k, _ in seen]
    assert kinds == ["state", "state", "failed"]
    assert seen[0][1].state.state == S.SESSION_STATE_INGESTING
    assert seen[1][1].state.previous == S.SESSION_STATE_INGESTING
    assert seen[2][1].failed.error.message == "no text"


def test_mark_stage_keeps_one_timing_per_stage():
    """Restarting a stage resets its timing instead of adding a second one."""
    rec = session_pb2.Session()
    mark_stage(rec, session_pb2.STAGE_QAGEN, started=True)
    mark_stage(rec, session_pb2.STAGE_QAGEN, finished=True)
    mark_stage(rec, session_pb2.STAGE_QAGEN, started=True)
    assert len(rec.timings) == 1 and not rec.timings[0].HasField("finished_at")
