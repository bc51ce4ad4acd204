"""The session record: protobuf `Session` in the NATS KV bucket `sessions`, changed only by
compare-and-swap so replicas never clobber each other. Every state change is also published as an
event, so watchers see it."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from google.protobuf.timestamp_pb2 import Timestamp

from doclora.v1 import events_pb2, session_pb2
from services.common import access, events, keys
from services.common.errors import FailedPrecondition, NotFound

log = logging.getLogger(__name__)

S = session_pb2.SessionState
FINAL_STATES = frozenset({S.SESSION_STATE_READY, S.SESSION_STATE_FAILED, S.SESSION_STATE_CANCELLED})
STAGE_STATE = {
    session_pb2.STAGE_INGEST: S.SESSION_STATE_INGESTING,
    session_pb2.STAGE_QAGEN: S.SESSION_STATE_GENERATING,
    session_pb2.STAGE_TRAIN: S.SESSION_STATE_TRAINING,
}


def state_name(state: int) -> str:
    """"READY" for SESSION_STATE_READY."""
    return S.Name(state).removeprefix("SESSION_STATE_")


def stage_name(stage: int) -> str:
    """"ingest" for STAGE_INGEST."""
    return session_pb2.Stage.Name(stage).removeprefix("STAGE_").lower()


def now_ts() -> Timestamp:
    ts = Timestamp()
    ts.GetCurrentTime()
    return ts


class SessionRepo:
    """Read and change session records; `bus` is a connected `services.common.bus.Bus`."""

    def __init__(self, bus):
        self.bus = bus

    async def create(self, session: session_pb2.Session) -> session_pb2.Session:
        session.created_at.CopyFrom(now_ts())
        session.updated_at.CopyFrom(session.created_at)
        await self.bus.kv_create(session.session_id, session.SerializeToString())
        return session

    async def get(self, sid: str) -> session_pb2.Session:
        """The record; NotFound for an unknown id and, within a call, for a record of another tenant
        than the caller's (`access.bound_tenant`), so a guess cannot tell the two apart."""
        if not keys.is_valid_id(sid):
            raise NotFound(f"session {sid!r} not found")
        try:
            data, _ = await self.bus.kv_get(sid)
        except NotFound:
            raise NotFound(f"session {sid!r} not found") from None
        out = session_pb2.Session()
        out.ParseFromString(data)
        tenant = access.bound_tenant()
        if tenant is not None and out.tenant != tenant:
            raise NotFound(f"session {sid!r} not found")
        return out

    async def list(self) -> list[session_pb2.Session]:
        """Every record (within a call: the caller's tenant's), newest first."""
        out = []
        for sid in await self.bus.kv_keys():
            try:
                out.append(await self.get(sid))
            except NotFound:  # deleted between the listing and the read, or another tenant's
                continue
        out.sort(key=lambda s: (s.created_at.seconds, s.created_at.nanos), reverse=True)
        return out

    async def update(self, sid: str, fn: Callable[[session_pb2.Session], None]) -> session_pb2.Session:
        """Apply `fn` to the current record and write it back by compare-and-swap, retrying on races."""
        if not keys.is_valid_id(sid):
            raise NotFound(f"session {sid!r} not found")
        result: list[session_pb2.Session] = []

        tenant = access.bound_tenant()

        def mutate(data: bytes) -> bytes:
            rec = session_pb2.Session()
            rec.ParseFromString(data)
            if tenant is not None and rec.tenant != tenant:
                raise NotFound(f"session {sid!r} not found")
            fn(rec)
            rec.updated_at.CopyFrom(now_ts())
            result[:] = [rec]
            return rec.SerializeToString()

        try:
            await self.bus.kv_mutate(sid, mutate)
        except NotFound:
            raise NotFound(f"session {sid!r} not found") from None
        return result[0]

    async def transition(
        self,
        sid: str,
        state: int,
        *,
        allowed_from: Iterable[int] | None = None,
        error: session_pb2.StageError | None = None,
        extra: Callable[[session_pb2.Session], None] | None = None,
    ) -> session_pb2.Session:
        """Move a session to `state` (if it is in one of `allowed_from`) and publish the change."""
        allowed = None if allowed_from is None else set(allowed_from)
        previous: list[int] = []

        def change(rec: session_pb2.Session) -> None:
            if allowed is not None and rec.state not in allowed:
                raise FailedPrecondition(
                    f"session {sid} is {state_name(rec.state)}, cannot become {state_name(state)}"
                )
            previous[:] = [rec.state]
            rec.state = state
            if error is not None:
                rec.error.CopyFrom(error)
            if extra is not None:
                extra(rec)

        rec = await self.update(sid, change)
        if previous and previous[0] != state:
            await events.publish(
                self.bus,
                rec.tenant,
                sid,
                events_pb2.Event(state=events_pb2.StateChanged(state=state, previous=previous[0])),
            )
        if state == S.SESSION_STATE_FAILED and error is not None:
            await events.publish(self.bus, rec.tenant, sid, events_pb2.Event(failed=events_pb2.Failed(error=error)))
        return rec

    async def fail(self, sid: str, stage: int, code: str, message: str) -> session_pb2.Session | None:
        """Mark a session FAILED unless it already ended; returns the record, or None if it had ended."""
        err = session_pb2.StageError(code=code, message=message, stage=stage)
        try:
            return await self.transition(
                sid, S.SESSION_STATE_FAILED, allowed_from=set(S.values()) - FINAL_STATES, error=err
            )
        except FailedPrecondition:
            return None


def mark_stage(rec: session_pb2.Session, stage: int, *, started: bool = False, finished: bool = False) -> None:
    """Record when `stage` started or finished in `rec.timings` (one entry per stage)."""
    timing = next((t for t in rec.timings if t.stage == stage), None)
    if timing is None:
        timing = rec.timings.add(stage=stage)
    if started:
        timing.started_at.CopyFrom(now_ts())
        timing.ClearField("finished_at")
    if finished:
        timing.finished_at.CopyFrom(now_ts())
