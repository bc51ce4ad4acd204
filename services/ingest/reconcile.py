"""The reconciler: no session stays in a working state with no work in flight for it.

A session record is written before its work message is published (creation, a hand-off from one
stage to the next, approval, a retrain). When that publish is lost (NATS away at that instant, the
process killed between the two), nothing would ever pick the session up: it would stay QUEUED,
INGESTING, GENERATING or TRAINING for good. Every `reconcile_every_s` seconds the ingest service
looks for sessions in one of those states whose record has not changed for `reconcile_idle_s`
seconds and that have no message in the WORK stream (the work queue keeps a message until it is
acked, so one being worked on is there too), and queues their stage again for the current round.

Several ingest replicas may do this at once: the publish id is derived from the stuck record
(`again=r<updated_at>`), so NATS keeps one of the copies.
"""

from __future__ import annotations

import asyncio
import logging
import time

from doclora.v1 import session_pb2
from services.common.runtime import Runtime, repeat_until_stopped
from services.common.sessions import stage_name, state_name

log = logging.getLogger(__name__)
S = session_pb2.SessionState

# the stage that moves a session on from each working state (AWAITING_REVIEW waits for a person)
RESUME_STAGE = {
    S.SESSION_STATE_QUEUED: session_pb2.STAGE_INGEST,
    S.SESSION_STATE_INGESTING: session_pb2.STAGE_INGEST,
    S.SESSION_STATE_GENERATING: session_pb2.STAGE_QAGEN,
    S.SESSION_STATE_TRAINING: session_pb2.STAGE_TRAIN,
}


async def reconcile(rt: Runtime, now: float) -> list[str]:
    """Queue again the stage of every stuck session (see the module docstring); returns their ids."""
    idle_s = rt.settings.reconcile_idle_s
    stale = [
        rec
        for rec in await rt.sessions.list()
        if rec.state in RESUME_STAGE and now - rec.updated_at.ToNanoseconds() / 1e9 >= idle_s
    ]
    if not stale:
        return []
    in_flight = await rt.bus.work_sessions()
    queued = []
    for rec in stale:
        if rec.session_id in in_flight:
            continue
        stage = RESUME_STAGE[rec.state]
        log.warning(
            "session %s is %s with no work in flight and no change for %.0f s: queuing %s again",
            rec.session_id,
            state_name(rec.state),
            now - rec.updated_at.ToNanoseconds() / 1e9,
            stage_name(stage),
        )
        await rt.enqueue_for(rec, stage, again=f"r{rec.updated_at.ToNanoseconds()}")
        queued.append(rec.session_id)
    return queued


async def reconcile_forever(rt: Runtime, stop: asyncio.Event) -> None:
    """`reconcile` every `reconcile_every_s` seconds until `stop` is set (a background job)."""
    await repeat_until_stopped(
        stop, rt.settings.reconcile_every_s, lambda: reconcile(rt, time.time()), "reconciler"
    )
