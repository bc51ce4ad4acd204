"""The work loop shared by the ingest, qagen and trainer workers.

A stage's handler gets the work item and the current session record. Domain errors (bad input) fail
the session at once with the error's message; other exceptions are retried by redelivery and, after
`max_deliver` attempts, the message goes to `work.dead` and the session to FAILED.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable

from doclora.v1 import events_pb2, session_pb2
from services.common import metrics
from services.common.errors import DocloraError, OutageTooLong, Unavailable
from services.common.logging import session_context
from services.common.runtime import Runtime, wait_out_outage
from services.common.sessions import FINAL_STATES, STAGE_STATE, mark_stage, stage_name, state_name

log = logging.getLogger(__name__)
S = session_pb2.SessionState

STATE_ORDER = {
    S.SESSION_STATE_QUEUED: 0,
    S.SESSION_STATE_INGESTING: 1,
    S.SESSION_STATE_GENERATING: 2,
    S.SESSION_STATE_AWAITING_REVIEW: 3,
    S.SESSION_STATE_TRAINING: 4,
}
NEXT_STAGE = {
    session_pb2.STAGE_INGEST: session_pb2.STAGE_QAGEN,
    session_pb2.STAGE_QAGEN: session_pb2.STAGE_TRAIN,
}

Handler = Callable[[events_pb2.WorkItem, session_pb2.Session], Awaitable[None]]


def parse_item(data: bytes) -> events_pb2.WorkItem:
    item = events_pb2.WorkItem()
    item.ParseFromString(data)
    return item


class StageWorker:
    """Pulls `work.{stage}` and runs `handler` for each item, one at a time per replica.
    `after_ready`, when given, gets the items whose session is already READY in their round: work a
    stage does after READY (the trainer's exam) and must finish when a redelivery finds it undone."""

    def __init__(self, rt: Runtime, stage: int, handler: Handler, after_ready: Handler | None = None):
        self.rt = rt
        self.stage = stage
        self.handler = handler
        self.after_ready = after_ready
        self.name = stage_name(stage)
        self._stop = asyncio.Event()  # the run's stop event (set by `run`)

    async def run(self, stop: asyncio.Event) -> None:
        self._stop = stop
        await self.rt.bus.run_worker(
            self.name,
            self._handle,
            ack_wait_s=self.rt.settings.work_ack_wait_s,
            max_deliver=self.rt.settings.work_max_deliver,
            on_dead=self._dead,
            stop_event=stop,
        )

    async def _handle(self, work) -> None:
        """One delivery: an outage of NATS or the object store within `outage_window_s` is waited
        out here with back-off (the message stays in flight, kept alive by the bus); a longer one
        fails the session, naming what was away."""
        item = parse_item(work.data)
        started, outcome = time.perf_counter(), "retried"  # an exception: redelivered or dead-lettered
        with session_context(item.session_id):
            try:
                outcome = await wait_out_outage(
                    functools.partial(self._handle_once, item),
                    window_s=self.rt.settings.outage_window_s,
                    what=f"{self.name} of session {item.session_id}",
                    stop=self._stop,
                )
            except OutageTooLong as exc:
                log.warning("%s failed: %s", self.name, exc.message)
                await self.rt.sessions.fail(item.session_id, self.stage, exc.code, exc.message)
                outcome = "failed"
            finally:
                metrics.observe_stage(self.name, time.perf_counter() - started, outcome)

    async def _handle_once(self, item: events_pb2.WorkItem) -> str:
        """The stage for one work item, from a fresh read of the record (so a retry after an
        outage sees what the last try finished); returns its outcome for the stage metrics: ok,
        failed (the session failed) or skipped (nothing to do)."""
        try:
            rec = await self.rt.sessions.get(item.session_id)
        except Unavailable:
            raise
        except DocloraError as exc:
            log.warning("dropping %s work for unknown session: %s", self.name, exc)
            return "skipped"
        if item.round < rec.round:
            log.info(
                "dropping %s work of round %d: the session is in round %d",
                self.name,
                item.round,
                rec.round,
            )
            return "skipped"
        if rec.state == S.SESSION_STATE_READY and self.after_ready is not None:
            try:
                await self.after_ready(item, rec)
            except Unavailable:
                raise
            except DocloraError as exc:  # the session is READY: it stays so
                log.warning("%s work after READY failed: %s", self.name, exc.message)
            return "skipped"
        if rec.state in FINAL_STATES:
            log.info("skipping %s: session is %s", self.name, state_name(rec.state))
            return "skipped"
        if STATE_ORDER.get(rec.state, 0) > STATE_ORDER[STAGE_STATE[self.stage]]:
            # Done before a crash that came between the state change and the ack: make sure
            # the next stage is queued (a duplicate publish is dropped) and move on.
            nxt = NEXT_STAGE.get(self.stage)
            if nxt is not None and rec.state == STAGE_STATE[nxt]:
                await self.rt.enqueue(
                    item.session_id, item.tenant, nxt, round=item.round, priority=item.priority
                )
            return "skipped"
        log.info("%s started", self.name)
        await self.rt.sessions.update(item.session_id, lambda r: mark_stage(r, self.stage, started=True))
        await self.rt.sessions.transition(
            item.session_id,
            STAGE_STATE[self.stage],
            allowed_from=set(S.values()) - FINAL_STATES,
        )
        try:
            await self.handler(item, rec)
        except Unavailable:
            raise  # transient: let redelivery retry it
        except DocloraError as exc:
            if await self._round_moved_on(item):
                log.info(
                    "%s of round %d ended (%s); the session moved on", self.name, item.round, exc.message
                )
                return "skipped"
            log.warning("%s failed: %s", self.name, exc.message)
            await self.rt.sessions.fail(item.session_id, self.stage, exc.code, exc.message)
            return "failed"
        return "ok"

    async def _round_moved_on(self, item: events_pb2.WorkItem) -> bool:
        try:
            return (await self.rt.sessions.get(item.session_id)).round > item.round
        except DocloraError:
            return False

    async def _dead(self, data: bytes, error: BaseException) -> None:
        item = parse_item(data)
        with session_context(item.session_id):
            log.error("%s gave up after repeated failures: %s", self.name, error)
            await self.rt.sessions.fail(
                item.session_id, self.stage, "INTERNAL", f"{self.name} failed after several attempts: {error}"
            )
