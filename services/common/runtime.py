"""What every service process holds: settings, the bus, the artifact store and the session records.
Built once at start-up and handed to servicers and workers through their constructors."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from doclora.v1 import events_pb2, session_pb2
from services.common import events
from services.common.bus import Bus, sleep_unless
from services.common.config import Settings
from services.common.errors import DocloraError, FailedPrecondition, OutageTooLong, Unavailable
from services.common.queue_position import mark_train_queued
from services.common.sessions import STAGE_STATE, SessionRepo, stage_name
from services.common.store import ArtifactStore

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class Runtime:
    settings: Settings
    bus: Bus
    store: ArtifactStore
    sessions: SessionRepo

    @classmethod
    async def connect(cls, settings: Settings, name: str) -> Runtime:
        bus = await Bus.connect(
            settings.nats_url,
            name=name,
            user=settings.nats_user or None,
            password=settings.nats_password.get_secret_value() or None,
        )
        await bus.ensure_streams(events_max_age_s=settings.events_max_age_s)
        store = ArtifactStore.from_settings(settings)
        await asyncio.to_thread(store.ensure_bucket)
        return cls(settings=settings, bus=bus, store=store, sessions=SessionRepo(bus))

    async def close(self) -> None:
        await self.bus.close()

    async def io(self, fn, /, *args, **kwargs):
        """Run blocking work (store calls, parsing) in a thread, off the event loop."""
        return await asyncio.to_thread(functools.partial(fn, *args, **kwargs))

    async def enqueue(
        self, sid: str, tenant: str, stage: int, *, round: int = 0, priority: int = 0, again: str = ""
    ) -> None:
        """Queue `stage` for a session's `round`; a retried publish of the same stage and round is
        dropped by NATS (`Nats-Msg-Id`), a later round's is not. `again` names a deliberate second
        publish of the same stage and round (the reconciler's), with its own id."""
        item = events_pb2.WorkItem(session_id=sid, tenant=tenant, stage=stage, round=round, priority=priority)
        await self.bus.publish_work(
            stage_name(stage),
            item.SerializeToString(),
            msg_id=f"{sid}:{stage_name(stage)}:{round}" + (f":{again}" if again else ""),
            session_id=sid,
            priority=priority,
        )

    async def enqueue_for(self, rec: session_pb2.Session, stage: int, *, again: str = "") -> None:
        """Queue `stage` for the session's current round and priority (`again`: see `enqueue`)."""
        await self.enqueue(
            rec.session_id, rec.tenant, stage, round=rec.round, priority=rec.options.priority, again=again
        )

    async def handoff(
        self, item: events_pb2.WorkItem, from_stage: int, to_stage: int, seconds: float
    ) -> None:
        """Finish `from_stage` and queue `to_stage` of the same round: event, state change, then
        the work message."""
        sid = item.session_id
        await events.publish(
            self.bus,
            item.tenant,
            sid,
            events_pb2.Event(finished=events_pb2.StageFinished(stage=from_stage, seconds=seconds)),
        )
        await self.sessions.transition(
            sid,
            STAGE_STATE[to_stage],
            allowed_from={STAGE_STATE[from_stage], STAGE_STATE[to_stage]},
            extra=functools.partial(_moved_on, round=item.round, stage=to_stage),
        )
        await self.enqueue(sid, item.tenant, to_stage, round=item.round, priority=item.priority)

    async def restart(
        self,
        sid: str,
        stage: int,
        *,
        allowed_from: set[int],
        change: Callable[[session_pb2.Session], None] | None = None,
    ) -> session_pb2.Session:
        """Run the pipeline again from `stage` in a new round: work of the old round still queued or
        running is dropped when it next looks at the record."""

        def bump(r: session_pb2.Session) -> None:
            r.round += 1
            r.queue_position = 0
            r.ClearField("error")
            if stage == session_pb2.STAGE_TRAIN:
                mark_train_queued(r)
            if change is not None:
                change(r)

        state = session_pb2.SESSION_STATE_QUEUED if stage == session_pb2.STAGE_INGEST else STAGE_STATE[stage]
        rec = await self.sessions.transition(sid, state, allowed_from=allowed_from, extra=bump)
        await self.enqueue_for(rec, stage)
        return rec


class StaleRound(FailedPrecondition):
    """The session started a new round while this work of an older one ran; the work is dropped."""


def check_round(rec: session_pb2.Session, round: int) -> None:
    if rec.round != round:
        raise StaleRound(
            f"session {rec.session_id} moved on to round {rec.round}; dropping work of round {round}"
        )


def _moved_on(rec: session_pb2.Session, round: int, stage: int) -> None:
    """The record change of a hand-off to `stage`: still the same round, and for training the time
    it was queued (its place in the training queue)."""
    check_round(rec, round)
    if stage == session_pb2.STAGE_TRAIN:
        mark_train_queued(rec)


# back-off between tries while a dependency is away: 1, 2, 4 ... seconds, at most 30
OUTAGE_FIRST_DELAY_S = 1.0
OUTAGE_MAX_DELAY_S = 30.0


async def wait_out_outage(
    call: Callable[[], Awaitable[T]],
    *,
    window_s: float,
    what: str,
    stop: asyncio.Event | None = None,
) -> T:
    """`await call()`, tried again with back-off while it raises `Unavailable` (the object store,
    NATS or a linked server away), until `window_s` seconds have passed since the first failure:
    then `OutageTooLong` names the last error. A set `stop` ends the waiting with the `Unavailable`
    itself, so the work goes back to the queue for another replica."""
    first_failure: float | None = None
    delay = OUTAGE_FIRST_DELAY_S
    while True:
        try:
            return await call()
        except Unavailable as exc:
            now = time.monotonic()
            first_failure = now if first_failure is None else first_failure
            waited = now - first_failure
            if stop is not None and stop.is_set():
                raise
            if waited + delay > window_s:
                raise OutageTooLong(
                    f"{what}: still unavailable after {waited:.0f} s (the outage window is "
                    f"{window_s:g} s): {exc.message}"
                ) from exc
            log.warning(
                "%s: %s; trying again in %.0f s (away for %.0f s so far)", what, exc.message, delay, waited
            )
            if stop is not None:
                await sleep_unless(stop, delay)
            else:
                await asyncio.sleep(delay)
            delay = min(delay * 2, OUTAGE_MAX_DELAY_S)


async def repeat_until_stopped(stop: asyncio.Event, every_s: float, job: Callable, what: str) -> None:
    """Run `await job()` now and every `every_s` seconds until `stop` is set (a background job);
    a domain error (the store or NATS away) is logged and the next round tries again."""
    while not stop.is_set():
        try:
            await job()
        except DocloraError as exc:
            log.warning("%s failed: %s", what, exc)
        await sleep_unless(stop, every_s)
