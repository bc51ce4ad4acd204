"""What every service process holds: settings, the bus, the artifact store and the session records.
Built once at start-up and handed to servicers and workers through their constructors."""

from __future__ import annotations

import asyncio
import functools
import logging
from dataclasses import dataclass

from doclora.v1 import events_pb2
from services.common import events
from services.common.bus import Bus
from services.common.config import Settings
from services.common.sessions import STAGE_STATE, SessionRepo, stage_name
from services.common.store import ArtifactStore

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    settings: Settings
    bus: Bus
    store: ArtifactStore
    sessions: SessionRepo

    @classmethod
    async def connect(cls, settings: Settings, name: str) -> Runtime:
        bus = await Bus.connect(settings.nats_url, name=name)
        await bus.ensure_streams(events_max_age_s=settings.events_max_age_s)
        store = ArtifactStore.from_settings(settings)
        await asyncio.to_thread(store.ensure_bucket)
        return cls(settings=settings, bus=bus, store=store, sessions=SessionRepo(bus))

    async def close(self) -> None:
        await self.bus.close()

    async def io(self, fn, /, *args, **kwargs):
        """Run blocking work (store calls, parsing) in a thread, off the event loop."""
        return await asyncio.to_thread(functools.partial(fn, *args, **kwargs))

    async def enqueue(self, sid: str, tenant: str, stage: int) -> None:
        """Queue `stage` for a session; a retried publish for the same stage is dropped by NATS."""
        item = events_pb2.WorkItem(session_id=sid, tenant=tenant, stage=stage)
        await self.bus.publish_work(
            stage_name(stage), item.SerializeToString(), msg_id=f"{sid}:{stage_name(stage)}", session_id=sid
        )

    async def handoff(self, sid: str, tenant: str, from_stage: int, to_stage: int, seconds: float) -> None:
        """Finish `from_stage` and queue `to_stage`: event, state change, then the work message."""
        await events.publish(
            self.bus, sid, events_pb2.Event(finished=events_pb2.StageFinished(stage=from_stage, seconds=seconds))
        )
        await self.sessions.transition(
            sid, STAGE_STATE[to_stage], allowed_from={STAGE_STATE[from_stage], STAGE_STATE[to_stage]}
        )
        await self.enqueue(sid, tenant, to_stage)

