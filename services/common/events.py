"""Session events on NATS: `events.{tenant}.{session}.{kind}`, protobuf `Event`, kind = the oneof set."""

from __future__ import annotations

import asyncio
import logging

from doclora.v1 import events_pb2

log = logging.getLogger(__name__)


async def publish(bus, tenant: str, sid: str, event: events_pb2.Event) -> None:
    event.session_id = sid
    if not event.HasField("time"):
        event.time.GetCurrentTime()
    await bus.publish_event(tenant, sid, event.WhichOneof("kind"), event.SerializeToString())


def parse(data: bytes) -> events_pb2.Event:
    out = events_pb2.Event()
    out.ParseFromString(data)
    return out


async def progress(
    bus, tenant: str, sid: str, stage: int, done: int, total: int, message: str = "", **extra
) -> None:
    """Publish a Progress event; `extra` sets optional fields (loss, eta_s, learning_rate, ...)."""
    fields = {k: v for k, v in extra.items() if v is not None}
    await publish(
        bus,
        tenant,
        sid,
        events_pb2.Event(
            progress=events_pb2.Progress(stage=stage, done=done, total=total, message=message, **fields)
        ),
    )


def progress_from_thread(
    loop: asyncio.AbstractEventLoop,
    bus,
    tenant: str,
    sid: str,
    stage: int,
    done: int,
    total: int,
    message: str = "",
    **extra,
) -> None:
    """`progress` from a worker thread (training, generation): scheduled on `loop`, not waited for;
    a lost event is logged, never raised into the thread's work."""
    fut = asyncio.run_coroutine_threadsafe(progress(bus, tenant, sid, stage, done, total, message, **extra), loop)
    fut.add_done_callback(lambda f: f.exception() and log.warning("progress event lost: %s", f.exception()))
