"""The training queue as people see it: which sessions wait for a trainer, and in what order.

Sessions wait in TRAINING until a trainer replica takes their work message; the train stage marks
its start in `Session.timings`. Higher `SessionOptions.priority` goes first (the bus puts such work
on the urgent lane, see bus.py), then the earlier `Session.train_queued_at`. Pure functions of
session records, so GetSession and ListSessions can show a position without asking NATS.
"""

from __future__ import annotations

from collections.abc import Iterable

from google.protobuf.timestamp_pb2 import Timestamp

from doclora.v1 import session_pb2

S = session_pb2.SessionState


def _key(ts: Timestamp) -> tuple[int, int]:
    return ts.seconds, ts.nanos


def mark_train_queued(rec: session_pb2.Session, now: Timestamp | None = None) -> None:
    """Record that `rec`'s training was queued now; call it where the train work is published
    (in the same record update that moves the session to TRAINING)."""
    if now is None:
        now = Timestamp()
        now.GetCurrentTime()
    rec.train_queued_at.CopyFrom(now)


def queued_at(rec: session_pb2.Session) -> Timestamp:
    """When the session's training was queued; its creation time for records that do not say."""
    return rec.train_queued_at if rec.HasField("train_queued_at") else rec.created_at


def train_started(rec: session_pb2.Session) -> bool:
    """Whether a trainer has taken this round's training: a train stage start no earlier than the
    time it was queued (a start left from an earlier round is older than that)."""
    timing = next((t for t in rec.timings if t.stage == session_pb2.STAGE_TRAIN), None)
    if timing is None or not timing.HasField("started_at"):
        return False
    if not rec.HasField("train_queued_at"):
        return True
    return _key(timing.started_at) >= _key(rec.train_queued_at)


def waiting_for_training(rec: session_pb2.Session) -> bool:
    return rec.state == S.SESSION_STATE_TRAINING and not train_started(rec)


def queue_order(sessions: Iterable[session_pb2.Session]) -> list[session_pb2.Session]:
    """The sessions waiting for a trainer, first to be taken first: priority high to low, then
    queued early to late (then session id, so the order is total)."""
    waiting = [s for s in sessions if waiting_for_training(s)]
    return sorted(waiting, key=lambda s: (-s.options.priority, _key(queued_at(s)), s.session_id))


def queue_positions(sessions: Iterable[session_pb2.Session]) -> dict[str, int]:
    """{session id: 1-based place in the training queue} for the sessions waiting for a trainer;
    sessions not waiting are absent (their `queue_position` is 0)."""
    return {s.session_id: i for i, s in enumerate(queue_order(sessions), 1)}
