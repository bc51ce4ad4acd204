"""Uploads no session took expire (services/ingest/uploads.py) on a real SeaweedFS: each tenant's
uploads older than `upload_ttl_s` are deleted, fresh ones and everything else stay; the periodic
job does the same until it is stopped; an expired upload can no longer be taken by a session."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import pytest

from doclora.v1 import session_pb2, session_service_pb2
from services.common import keys
from services.common.errors import NotFound
from services.ingest import session_rules
from services.ingest.uploads import expire_uploads, expire_uploads_forever


def put_upload(store, tenant: str) -> str:
    upload_id = keys.new_id("u")
    store.put_bytes(keys.upload(tenant, upload_id), b"some bytes", metadata={"filename": "a.txt"})
    return upload_id


async def test_uploads_older_than_the_ttl_are_deleted_and_nothing_else(runtime):
    """Two tenants' uploads and a session object: after the ttl only the uploads go."""
    rt = dataclasses.replace(runtime, settings=runtime.settings.replace(upload_ttl_s=60.0))
    for tenant in ("tenant-a", "tenant-a", "tenant-b"):
        put_upload(rt.store, tenant)
    kept = keys.doc_text("tenant-a", keys.new_id(), "d1")
    rt.store.put_bytes(kept, b"text")
    assert await expire_uploads(rt, time.time()) == 0  # all fresh
    assert len(rt.store.list("tenant-a/uploads/")) == 2
    assert await expire_uploads(rt, time.time() + 120) == 3
    assert rt.store.list("tenant-a/uploads/") == [] and rt.store.list("tenant-b/uploads/") == []
    assert rt.store.list("") == [kept]


async def test_the_expiry_job_deletes_stale_uploads_until_stopped(runtime):
    """With a one-second ttl the background job deletes an upload within seconds and stops when
    told; a session can no longer take that upload (NOT_FOUND)."""
    rt = dataclasses.replace(runtime, settings=runtime.settings.replace(upload_ttl_s=1.0))
    upload_id = put_upload(rt.store, rt.settings.tenant)
    stop = asyncio.Event()
    job = asyncio.create_task(expire_uploads_forever(rt, stop))
    for _ in range(100):
        if not rt.store.exists(keys.upload(rt.settings.tenant, upload_id)):
            break
        await asyncio.sleep(0.1)
    stop.set()
    await asyncio.wait_for(job, 5)
    assert not rt.store.exists(keys.upload(rt.settings.tenant, upload_id))
    with pytest.raises(NotFound):
        await session_rules.create_session(
            rt, "late", [session_service_pb2.Source(upload_id=upload_id)], session_pb2.SessionOptions()
        )
