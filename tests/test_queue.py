"""The training queue: positions computed from session records (services/common/queue_position.py), and
urgent work jumping the queue on a real nats-server (services/common/bus.py)."""

from __future__ import annotations

import asyncio

from google.protobuf.timestamp_pb2 import Timestamp

from doclora.v1 import session_pb2
from services.common.bus import Bus
from services.common.queue_position import mark_train_queued, queue_order, queue_positions

S = session_pb2.SessionState


def _ts(seconds: int) -> Timestamp:
    return Timestamp(seconds=seconds)


def _session(
    sid: str,
    state: int = S.SESSION_STATE_TRAINING,
    *,
    priority: int = 0,
    created: int = 100,
    queued: int | None = None,
    train_started: int | None = None,
) -> session_pb2.Session:
    rec = session_pb2.Session(
        session_id=sid,
        state=state,
        created_at=_ts(created),
        options=session_pb2.SessionOptions(priority=priority),
    )
    if queued is not None:
        mark_train_queued(rec, _ts(queued))
    if train_started is not None:
        rec.timings.add(stage=session_pb2.STAGE_TRAIN, started_at=_ts(train_started))
    return rec


def test_waiting_sessions_are_ordered_by_priority_then_time_queued():
    """Higher priority first, then earlier queued; READY, generating and running sessions have no
    place; a train start left over from an earlier round does not count as running."""
    sessions = [
        _session("late-normal", queued=300),
        _session("early-normal", queued=200),
        _session("urgent", priority=5, queued=400),
        _session("less-urgent", priority=1, queued=150),
        _session("running", queued=100, train_started=120),
        _session("old-round-start", queued=250, train_started=90),
        _session("ready", S.SESSION_STATE_READY, queued=50),
        _session("generating", S.SESSION_STATE_GENERATING),
    ]
    assert queue_positions(sessions) == {
        "urgent": 1,
        "less-urgent": 2,
        "early-normal": 3,
        "old-round-start": 4,
        "late-normal": 5,
    }


def test_records_without_a_queued_time_wait_from_their_creation():
    """A record that never had train_queued_at set is ordered by created_at, and any train start
    means it is running."""
    sessions = [
        _session("b", created=20),
        _session("a", created=10),
        _session("c", created=5, train_started=30),
        _session("d", queued=15),
    ]
    assert [s.session_id for s in queue_order(sessions)] == ["a", "d", "b"]
    assert queue_positions([]) == {}


async def _collect(bus: Bus, stage: str, n: int) -> list[bytes]:
    got: list[bytes] = []
    done = asyncio.Event()
    stop = asyncio.Event()

    async def handler(item):
        got.append(item.data)
        if len(got) == n:
            done.set()

    task = asyncio.create_task(
        bus.run_worker(stage, handler, ack_wait_s=5.0, max_deliver=3, stop_event=stop, poll_s=0.2)
    )
    try:
        await asyncio.wait_for(done.wait(), 15)
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
    return got


async def test_urgent_work_is_taken_before_work_queued_earlier(bus):
    """Three normal jobs, then two with a priority: the worker takes the urgent ones first (in
    their order), then the rest in theirs; pending_work counts both lanes."""
    for name in ("n1", "n2", "n3"):
        await bus.publish_work("train", name.encode(), msg_id=f"{name}:train:0")
    await bus.publish_work("train", b"u1", msg_id="u1:train:0", priority=1)
    await bus.publish_work("train", b"u2", msg_id="u2:train:0", priority=9)
    assert await bus.publish_work("train", b"u2", msg_id="u2:train:0", priority=9) is True  # deduplicated
    assert await bus.pending_work("train") == 5
    assert await _collect(bus, "train", 5) == [b"u1", b"u2", b"n1", b"n2", b"n3"]
    assert await bus.pending_work("train") == 0


async def test_urgent_work_arriving_while_a_worker_waits_is_taken_next(bus):
    """With normal work still queued, urgent work published during a job is the next job."""
    for name in ("n1", "n2"):
        await bus.publish_work("train", name.encode(), msg_id=f"{name}:train:0")
    got: list[bytes] = []
    stop = asyncio.Event()
    done = asyncio.Event()

    async def handler(item):
        got.append(item.data)
        if item.data == b"n1":
            await bus.publish_work("train", b"u1", msg_id="u1:train:0", priority=1)
        if len(got) == 3:
            done.set()

    task = asyncio.create_task(
        bus.run_worker("train", handler, ack_wait_s=5.0, max_deliver=3, stop_event=stop, poll_s=0.2)
    )
    try:
        await asyncio.wait_for(done.wait(), 15)
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
    assert got == [b"n1", b"u1", b"n2"]
