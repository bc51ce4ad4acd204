"""The bus against a real nats-server: work queues, redelivery, dead letters, events, sessions KV."""

from __future__ import annotations

import asyncio
import collections
import json
import os
import socket
import sys
import time
from pathlib import Path

import pytest

from services.common import errors
from services.common.bus import (
    HDR_ATTEMPTS,
    HDR_ERROR,
    HDR_SESSION,
    HDR_STAGE,
    WORK_STREAM,
    Bus,
    PermanentError,
    WorkerLost,
    WorkItem,
)
from services.stack.natsd import start_nats_server

REPO_ROOT = Path(__file__).resolve().parent.parent

# A worker in its own process that reports the delivery it got, then hangs until it is killed.
DOOMED_WORKER = r"""
import asyncio, sys
from services.common.bus import Bus

async def main(url, ack_wait_s, max_deliver):
    bus = await Bus.connect(url, name="doomed-worker")

    async def handler(item):
        print(f"attempt {item.attempt}", flush=True)
        await asyncio.Event().wait()

    await bus.run_worker(
        "ingest", handler, ack_wait_s=ack_wait_s, max_deliver=max_deliver, stop_event=asyncio.Event()
    )

asyncio.run(main(sys.argv[1], float(sys.argv[2]), int(sys.argv[3])))
"""


async def wait_until(predicate, within_s: float = 10.0, interval: float = 0.02):
    deadline = time.monotonic() + within_s
    while True:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {within_s}s")
        await asyncio.sleep(interval)


async def _zero(bus: Bus, stage: str) -> bool:
    return await bus.pending_work(stage) == 0


async def _consumer_count(bus: Bus, stream: str, expected: int) -> bool:
    return (await bus.js.stream_info(stream)).state.consumer_count == expected


class Workers:
    """Starts `run_worker` tasks and stops them all at the end of a test."""

    def __init__(self):
        self.stop = asyncio.Event()
        self.tasks: list[asyncio.Task] = []

    def start(self, bus: Bus, stage: str, handler, **kwargs) -> None:
        kwargs.setdefault("ack_wait_s", 5.0)
        kwargs.setdefault("max_deliver", 3)
        kwargs.setdefault("retry_delay_s", 0.05)
        kwargs.setdefault("poll_s", 0.2)
        self.tasks.append(asyncio.create_task(bus.run_worker(stage, handler, stop_event=self.stop, **kwargs)))

    async def close(self) -> None:
        self.stop.set()
        await asyncio.wait_for(asyncio.gather(*self.tasks), 10)


@pytest.fixture
async def workers():
    w = Workers()
    try:
        yield w
    finally:
        await w.close()


@pytest.fixture
async def second_bus(nats_server):
    """Another connection, standing in for a second replica."""
    b = await Bus.connect(nats_server.url, name="pytest-replica")
    try:
        yield b
    finally:
        await b.close()


async def dead_letters(bus: Bus, expected: int):
    sub = await bus.js.pull_subscribe("work.dead", durable="work-dead", stream=WORK_STREAM)
    got = []
    deadline = time.monotonic() + 5.0
    while len(got) < expected and time.monotonic() < deadline:
        try:
            got.extend(await sub.fetch(expected - len(got), timeout=0.5))
        except TimeoutError:
            pass
    await sub.unsubscribe()
    return got


async def start_doomed_worker(url: str, ack_wait_s: float, max_deliver: int) -> asyncio.subprocess.Process:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        DOOMED_WORKER,
        url,
        str(ack_wait_s),
        str(max_deliver),
        cwd=REPO_ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
    )


# ---------------------------------------------------------------------- the server


def test_nats_server_answers_healthz_on_loopback(nats_server):
    """The test server listens on loopback and its monitoring /healthz says ok."""
    assert nats_server.url.startswith("nats://127.0.0.1:")
    assert nats_server.monitor_url.startswith("http://127.0.0.1:")
    assert nats_server.healthy()


def test_a_server_that_cannot_start_fails_wait_ready_with_its_log(tmp_path, nats_server):
    """A second server on a taken port dies, and wait_ready says why from its log."""
    server = start_nats_server(tmp_path / "clash", port=nats_server.port)
    try:
        with pytest.raises(RuntimeError, match="address already in use"):
            server.wait_ready(timeout=10)
    finally:
        server.stop()


async def test_connecting_to_a_port_with_no_server_raises_unavailable():
    """Connecting where no server listens fails within the connect timeout as Unavailable."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    started = time.monotonic()
    with pytest.raises(errors.Unavailable):
        await Bus.connect(f"nats://127.0.0.1:{port}", name="nobody-home", connect_timeout_s=0.5)
    assert time.monotonic() - started < 5


# ---------------------------------------------------------------------- work queues


async def test_two_workers_sharing_a_stage_get_each_message_once(bus, second_bus, workers):
    """Two replicas on one durable consumer split the messages; none is handled twice."""
    seen: list[tuple[str, bytes]] = []

    def handler_for(name):
        async def handler(item: WorkItem):
            seen.append((name, item.data))
            await asyncio.sleep(0.02)

        return handler

    workers.start(bus, "ingest", handler_for("a"))
    workers.start(second_bus, "ingest", handler_for("b"))
    sent = [f"job-{i}".encode() for i in range(20)]
    for i, data in enumerate(sent):
        await bus.publish_work("ingest", data, msg_id=f"s{i}:ingest")

    await wait_until(lambda: len(seen) >= len(sent))
    await asyncio.sleep(0.3)  # time for any duplicate to show up
    counts = collections.Counter(data for _, data in seen)
    assert sorted(counts) == sorted(sent)
    assert set(counts.values()) == {1}
    assert {name for name, _ in seen} == {"a", "b"}
    assert await bus.pending_work("ingest") == 0


async def test_a_republished_work_message_with_the_same_id_is_dropped(bus):
    """Publishing again with the same Nats-Msg-Id is reported as a duplicate and not queued."""
    assert await bus.publish_work("qagen", b"x", msg_id="s1:qagen") is False
    assert await bus.publish_work("qagen", b"x", msg_id="s1:qagen") is True
    assert await bus.publish_work("qagen", b"y", msg_id="s2:qagen") is False
    assert await bus.pending_work("qagen") == 2


async def test_a_message_held_by_a_killed_worker_is_redelivered_to_another(bus, nats_server, workers):
    """A worker SIGKILLed mid-job never acks; after ack_wait another worker gets delivery 2."""
    await bus.publish_work("ingest", b"payload", msg_id="s1:ingest", session_id="s1")
    doomed = await start_doomed_worker(nats_server.url, ack_wait_s=1.0, max_deliver=3)
    try:
        line = await asyncio.wait_for(doomed.stdout.readline(), 20)
        assert line.strip() == b"attempt 1"
    finally:
        doomed.kill()
        await doomed.wait()

    got: list[WorkItem] = []

    async def handler(item: WorkItem):
        got.append(item)

    workers.start(bus, "ingest", handler, ack_wait_s=1.0, max_deliver=3)
    await wait_until(lambda: got, within_s=10)
    assert got[0].attempt == 2
    assert got[0].data == b"payload"
    assert got[0].session_id == "s1"
    await wait_until(lambda: _zero(bus, "ingest"))


async def test_a_worker_killed_on_the_last_attempt_is_dead_lettered_by_the_next(bus, nats_server, workers):
    """If the last attempt's worker dies, the next replica dead-letters the message without running it."""
    await bus.publish_work("ingest", b"payload", msg_id="s1:ingest", session_id="s1")
    doomed = await start_doomed_worker(nats_server.url, ack_wait_s=1.0, max_deliver=1)
    try:
        assert (await asyncio.wait_for(doomed.stdout.readline(), 20)).strip() == b"attempt 1"
    finally:
        doomed.kill()
        await doomed.wait()

    handled, dead = [], []

    async def handler(item: WorkItem):
        handled.append(item)

    async def on_dead(data: bytes, error: BaseException):
        dead.append((data, error))

    workers.start(bus, "ingest", handler, ack_wait_s=1.0, max_deliver=1, on_dead=on_dead)
    await wait_until(lambda: dead, within_s=10)
    assert handled == []
    assert dead[0][0] == b"payload"
    assert isinstance(dead[0][1], WorkerLost)
    [letter] = await dead_letters(bus, 1)
    assert letter.headers[HDR_STAGE] == "ingest"
    assert letter.headers[HDR_SESSION] == "s1"
    assert letter.headers[HDR_ERROR].startswith("WorkerLost")


async def test_a_message_failing_every_attempt_goes_to_work_dead_and_calls_on_dead(bus, workers):
    """After max_deliver failed attempts the payload lands on work.dead and on_dead runs once."""
    attempts, dead = [], []

    async def handler(item: WorkItem):
        attempts.append(item.attempt)
        raise RuntimeError(f"boom on attempt {item.attempt}\nsecond line")

    async def on_dead(data: bytes, error: BaseException):
        dead.append((data, error))

    workers.start(bus, "train", handler, max_deliver=3, on_dead=on_dead)
    await bus.publish_work("train", b"doomed job", msg_id="s9:train", session_id="s9")

    await wait_until(lambda: dead)
    assert attempts == [1, 2, 3]
    assert [(d, str(e)) for d, e in dead] == [(b"doomed job", "boom on attempt 3\nsecond line")]
    [letter] = await dead_letters(bus, 1)
    assert letter.data == b"doomed job"
    assert letter.headers[HDR_STAGE] == "train"
    assert letter.headers[HDR_SESSION] == "s9"
    assert letter.headers[HDR_ATTEMPTS] == "3"
    assert letter.headers[HDR_ERROR] == "RuntimeError: boom on attempt 3 second line"
    assert await bus.pending_work("train") == 0


async def test_a_permanent_error_dead_letters_on_the_first_attempt(bus, workers):
    """A handler raising PermanentError is not retried."""
    attempts, dead = [], []

    async def handler(item: WorkItem):
        attempts.append(item.attempt)
        raise PermanentError("not a PDF")

    async def on_dead(data: bytes, error: BaseException):
        dead.append(error)

    workers.start(bus, "ingest", handler, max_deliver=4, on_dead=on_dead)
    await bus.publish_work("ingest", b"junk", msg_id="s3:ingest")
    await wait_until(lambda: dead)
    await asyncio.sleep(0.2)
    assert attempts == [1]
    assert isinstance(dead[0], PermanentError)
    [letter] = await dead_letters(bus, 1)
    assert letter.headers[HDR_ERROR] == "PermanentError: not a PDF"


async def test_a_handler_that_fails_once_succeeds_on_redelivery(bus, workers):
    """An ordinary error is nak'ed and the next delivery gets attempt 2."""
    attempts = []

    async def handler(item: WorkItem):
        attempts.append(item.attempt)
        if item.attempt == 1:
            raise ConnectionError("flaky")

    workers.start(bus, "qagen", handler, max_deliver=3)
    await bus.publish_work("qagen", b"job", msg_id="s4:qagen")
    await wait_until(lambda: attempts == [1, 2])
    await wait_until(lambda: _zero(bus, "qagen"))


async def test_heartbeats_keep_a_handler_longer_than_ack_wait_from_redelivery(bus, second_bus, workers):
    """in_progress() during a 2.5 s handler keeps a 1 s ack_wait from handing it to the other replica."""
    calls = []

    async def slow(item: WorkItem):
        calls.append(item.attempt)
        await asyncio.sleep(2.5)

    workers.start(bus, "train", slow, ack_wait_s=1.0)
    workers.start(second_bus, "train", slow, ack_wait_s=1.0)
    await bus.publish_work("train", b"long job", msg_id="s5:train")
    await wait_until(lambda: _zero(bus, "train"), within_s=10)
    await asyncio.sleep(1.2)  # past another ack_wait: nothing may come back
    assert calls == [1]


async def test_stopping_a_worker_lets_the_current_handler_finish_and_ack(bus):
    """Setting stop_event mid-job ends run_worker only after the handler finished and acked."""
    stop = asyncio.Event()
    started, finished = asyncio.Event(), []

    async def handler(item: WorkItem):
        started.set()
        await asyncio.sleep(0.5)
        finished.append(item.data)

    task = asyncio.create_task(
        bus.run_worker("ingest", handler, ack_wait_s=5, max_deliver=3, stop_event=stop, poll_s=0.2)
    )
    await bus.publish_work("ingest", b"job", msg_id="s6:ingest")
    await asyncio.wait_for(started.wait(), 5)
    stop.set()
    await asyncio.wait_for(task, 5)
    assert finished == [b"job"]
    assert await bus.pending_work("ingest") == 0


# ---------------------------------------------------------------------- events


async def test_watch_events_replays_history_then_follows_live_events(bus):
    """A watcher first sees the session's past events in order, then new ones; never other sessions'
    nor another tenant's (events are under `events.{tenant}.{session}.`)."""
    await bus.publish_event("t", "s1", "progress", b"1")
    await bus.publish_event("t", "s2", "progress", b"other session")
    await bus.publish_event("u", "s1", "progress", b"another tenant's session of the same id")
    await bus.publish_event("t", "s1", "stage_finished", b"2")

    got = []

    async def watch():
        async for kind, data in bus.watch_events("t", "s1"):
            got.append((kind, data))
            if len(got) == 4:
                return

    watcher = asyncio.create_task(watch())
    await wait_until(lambda: len(got) == 2)
    await bus.publish_event("t", "s1", "progress", b"3")
    await bus.publish_event("t", "s1", "failed", b"4")
    await asyncio.wait_for(watcher, 5)
    assert got == [("progress", b"1"), ("stage_finished", b"2"), ("progress", b"3"), ("failed", b"4")]


async def test_watch_events_from_now_skips_history(bus):
    """With from_start=False only events published after the watch began arrive."""
    await bus.publish_event("t", "s1", "progress", b"old")
    events = bus.watch_events("t", "s1", from_start=False)
    first = asyncio.create_task(anext(events))
    await wait_until(lambda: _consumer_count(bus, "EVENTS", 1))  # the watch has begun
    await bus.publish_event("t", "s1", "progress", b"new")
    assert await asyncio.wait_for(first, 5) == ("progress", b"new")
    await events.aclose()


async def test_leaving_watch_events_removes_its_consumer(bus):
    """Breaking out of the iteration deletes the ephemeral consumer it used."""
    await bus.publish_event("t", "s1", "progress", b"1")
    async for _ in bus.watch_events("t", "s1"):
        assert await _consumer_count(bus, "EVENTS", 1)
        break

    await wait_until(lambda: _consumer_count(bus, "EVENTS", 0), within_s=5)


# ---------------------------------------------------------------------- sessions KV


async def test_kv_create_get_update_and_keys(bus):
    """Create refuses an existing key, get refuses a missing one, keys lists what exists."""
    assert await bus.kv_keys() == []
    with pytest.raises(errors.NotFound):
        await bus.kv_get("s1")
    rev = await bus.kv_create("s1", b"queued")
    with pytest.raises(errors.AlreadyExists):
        await bus.kv_create("s1", b"again")
    rev2 = await bus.kv_update("s1", b"ingesting", rev)
    assert rev2 > rev
    assert await bus.kv_get("s1") == (b"ingesting", rev2)
    await bus.kv_create("s0", b"queued")
    assert await bus.kv_keys() == ["s0", "s1"]


async def test_kv_update_with_a_stale_revision_raises_conflict(bus):
    """Compare-and-swap: the writer holding an old revision loses and nothing is overwritten."""
    rev = await bus.kv_create("s1", b"v1")
    await bus.kv_update("s1", b"v2", rev)
    with pytest.raises(errors.Conflict):
        await bus.kv_update("s1", b"clobber", rev)
    assert (await bus.kv_get("s1"))[0] == b"v2"


async def test_kv_mutate_retries_until_every_concurrent_writer_succeeds(bus, second_bus):
    """Many writers on two connections incrementing one counter lose races but no increment is lost."""
    await bus.kv_create("counter", json.dumps({"n": 0}).encode())
    calls = 0

    def increment(raw: bytes) -> bytes:
        nonlocal calls
        calls += 1
        return json.dumps({"n": json.loads(raw)["n"] + 1}).encode()

    async def writer(b: Bus):
        for _ in range(5):
            await b.kv_mutate("counter", increment, retries=50)

    await asyncio.gather(*(writer(b) for b in (bus, second_bus) for _ in range(5)))
    value, _ = await bus.kv_get("counter")
    assert json.loads(value) == {"n": 50}
    assert calls > 50  # some writers lost a race and retried
