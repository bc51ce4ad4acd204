"""Forgetting deleted bots: every inference replica hears `deleted.{session}` (core NATS, published
by the ingest service's `deletion.py`) and drops the adapters of every round of that session from
its engine's adapter cache (memory) and from its local adapter cache folder (disk).

A replica that was down when a session was deleted never hears of it, so when the job starts it
prunes the cache folder: every adapter folder the store no longer has goes (deleted sessions, and
the older rounds' adapters the trainer removed since)."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
from pathlib import Path

from services.common import access, keys
from services.common.errors import DocloraError
from services.common.runtime import Runtime
from services.inference.adapter_store import adapter_ref

log = logging.getLogger(__name__)


def _of_session(adapter_id: str, sid: str) -> bool:
    return keys.session_of_adapter(adapter_id) == sid


def forget_session(adapters, cache_dir: Path, tenant: str, sid: str) -> list[str]:
    """Blocking: evict every loaded adapter of session `sid` of `tenant` and delete its cached
    folders; returns the adapter refs evicted or deleted."""
    gone = []
    prefix = adapter_ref(tenant, "")
    for ref in adapters.loaded():
        if ref.startswith(prefix) and _of_session(ref[len(prefix) :], sid) and adapters.evict(ref):
            gone.append(ref)
    folder = cache_dir / tenant
    if access.is_tenant_name(tenant) and folder.is_dir():
        for path in folder.iterdir():
            if path.is_dir() and _of_session(path.name.lstrip(".").removesuffix(".partial"), sid):
                shutil.rmtree(path, ignore_errors=True)
                gone.append(adapter_ref(tenant, path.name))
    return sorted(set(gone))


def prune_cache(store, cache_dir: Path) -> list[str]:
    """Blocking: delete the cached adapter folders the store no longer has; returns their refs."""
    gone = []
    if not cache_dir.is_dir():
        return gone
    for tenant_dir in cache_dir.iterdir():
        if not tenant_dir.is_dir() or not access.is_tenant_name(tenant_dir.name):
            continue
        for path in tenant_dir.iterdir():
            if not path.is_dir() or path.name.startswith("."):
                continue  # a download in progress (`.{id}.partial`) is the fetcher's
            key = keys.adapter_prefix(tenant_dir.name, path.name) + "adapter_config.json"
            if keys.is_valid_id(path.name) and store.exists(key):
                continue
            shutil.rmtree(path, ignore_errors=True)
            gone.append(adapter_ref(tenant_dir.name, path.name))
    return gone


def forgetter(rt: Runtime, adapters, cache_dir: Path, indexes=None):
    """The background job: prune the cache folder, then forget each deleted session as it is
    announced, until the stop event is set. `adapters` is the engine's AdapterCache, `indexes` the
    bots' passage IndexCache (its indexes of the session go too)."""

    async def run(stop: asyncio.Event) -> None:
        heard: asyncio.Queue = asyncio.Queue()

        async def on_message(msg) -> None:
            await heard.put(msg.data)

        sub = await rt.bus.nc.subscribe(keys.deleted_subject("*"), cb=on_message)
        try:
            try:
                pruned = await rt.io(prune_cache, rt.store, cache_dir)
            except DocloraError as exc:  # the store away: the cache stays until the next start
                log.warning("could not prune the adapter cache: %s", exc)
            else:
                if pruned:
                    log.info("pruned %d cached adapters the store no longer has", len(pruned))
            stopping = asyncio.create_task(stop.wait())
            while not stop.is_set():
                nxt = asyncio.create_task(heard.get())
                done, _ = await asyncio.wait({nxt, stopping}, return_when=asyncio.FIRST_COMPLETED)
                if nxt not in done:
                    nxt.cancel()
                    break
                try:
                    body = json.loads(nxt.result())
                    tenant, sid = str(body["tenant"]), str(body["session_id"])
                except (ValueError, KeyError, TypeError):
                    log.warning("ignoring a malformed deletion notice")
                    continue
                gone = await rt.io(forget_session, adapters, cache_dir, tenant, sid)
                if indexes is not None and indexes.drop(sid):
                    gone.append(f"the passage index of {sid}")
                log.info("session %s was deleted: dropped %s", sid, ", ".join(gone) or "nothing cached")
            stopping.cancel()
        finally:
            await sub.unsubscribe()

    return run
