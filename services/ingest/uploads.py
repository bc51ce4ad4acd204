"""Uploads arrive as a gRPC client stream and go straight into the store in parts: an async stream on
one side, the store's blocking multipart writer on a thread on the other, joined by a small bounded
queue, so memory stays flat however large the file.

An upload waits under `{tenant}/uploads/{upload_id}/` until a session takes it (moved into the
session); one no session took is deleted `upload_ttl_s` after it was stored (`expire_uploads`, run
periodically by `expire_uploads_forever`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import time
import unicodedata

from doclora.v1 import ingest_pb2
from services.common import access, keys
from services.common.errors import InvalidArgument, ResourceExhausted
from services.common.runtime import Runtime, repeat_until_stopped

log = logging.getLogger(__name__)
MAX_CHUNK = 1024 * 1024 + 1024  # a chunk of 1 MiB plus slack for framing choices of clients
_EOF = object()
# S3 parts of 8 MiB (5 MiB is the minimum): memory per upload stays near two parts
UPLOAD_PART = 8 * 1024 * 1024
# bidirectional overrides and isolates: they make "cod.exe.txt" show as "cod.txt.exe"
_BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200e\u200f")
MAX_NAME_CHARS = 200
# how often the sweep looks for expired uploads, at most (and at least a few times per ttl)
EXPIRE_EVERY_S = 600.0


def clean_filename(name: str, default: str = "upload") -> str:
    """A file's display name as the person (or the server) wrote it, in any script, quotes and
    emoji included: its last path part, each run of white space (line breaks, tabs) one space,
    control characters, lone surrogates and bidirectional overrides dropped, no leading or trailing
    spaces or dots, at most MAX_NAME_CHARS characters; `default` when nothing is left."""
    name = name.replace("\\", "/").rsplit("/", 1)[-1]
    name = " ".join(name.split())
    name = "".join(c for c in name if unicodedata.category(c) not in ("Cc", "Cs") and c not in _BIDI_CONTROLS)
    return name.strip(" .")[:MAX_NAME_CHARS].rstrip(" ") or default


class QueueReader:
    """A file-like `read(n)` over chunks put on a bounded queue by another thread (or the loop)."""

    def __init__(self, maxsize: int = 4):
        self.q: queue.Queue = queue.Queue(maxsize=maxsize)
        self.buf = bytearray()
        self.done = False
        self.error: BaseException | None = None

    def read(self, n: int = -1) -> bytes:
        while not self.done and (n < 0 or len(self.buf) < n):
            item = self.q.get()
            if item is _EOF:
                self.done = True
            elif isinstance(item, BaseException):
                self.error = item
                raise item
            else:
                self.buf += item
        if n < 0:
            n = len(self.buf)
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out


async def receive_upload(rt: Runtime, requests) -> ingest_pb2.UploadResponse:
    """Store an upload stream under a new upload id; refuse it past `max_upload_bytes`."""
    it = requests.__aiter__()
    try:
        first = await it.__anext__()
    except StopAsyncIteration:
        raise InvalidArgument("an upload must start with its header") from None
    if first.WhichOneof("part") != "header":
        raise InvalidArgument("an upload must start with its header")
    filename = clean_filename(first.header.filename)
    upload_id = keys.new_id("u")
    key = keys.upload(access.acting(rt.settings).tenant, upload_id)
    limit = rt.settings.max_upload_bytes
    reader = QueueReader()
    put = asyncio.create_task(
        rt.io(
            rt.store.put_stream,
            key,
            reader,
            -1,
            part_size=UPLOAD_PART,
            content_type="application/octet-stream",
            metadata={"filename": filename},
        )
    )
    size = 0

    async def offer(item) -> None:
        # The queue is bounded (back-pressure); never wait on it once the writer has stopped.
        while not put.done():
            try:
                await asyncio.to_thread(reader.q.put, item, True, 0.5)
                return
            except queue.Full:
                continue

    try:
        async for req in it:
            if req.WhichOneof("part") != "chunk":
                raise InvalidArgument("an upload has one header, then only chunks")
            if len(req.chunk) > MAX_CHUNK:
                raise InvalidArgument(f"upload chunks must be at most 1 MiB, got {len(req.chunk)} bytes")
            size += len(req.chunk)
            if size > limit:
                raise ResourceExhausted(
                    f"the upload is larger than the limit of {limit // (1024 * 1024)} MiB"
                )
            await offer(req.chunk)
        if size == 0:
            raise InvalidArgument(f"{filename} is empty")
        await offer(_EOF)
        result = await put  # raises the writer's error, if it failed
    except BaseException:
        await offer(InvalidArgument("upload aborted"))
        await asyncio.gather(put, return_exceptions=True)
        with contextlib.suppress(Exception):
            await rt.io(rt.store.delete, key)
        raise
    log.info("upload %s: %s, %d bytes", upload_id, filename, result.size)
    return ingest_pb2.UploadResponse(
        upload_id=upload_id, filename=filename, size_bytes=result.size, sha256=result.sha256
    )


def _expired_uploads(store, now: float, ttl_s: float) -> list[str]:
    """Blocking: the folders of uploads stored more than `ttl_s` seconds before `now`."""
    folders = []
    for tenant in access.stored_tenants(store):
        for key, modified in store.iter_modified(keys.uploads_prefix(tenant)):
            if modified is not None and now - modified > ttl_s:
                folders.append(key.rsplit("/", 1)[0] + "/")
    return sorted(set(folders))


async def expire_uploads(rt: Runtime, now: float) -> int:
    """Delete every upload of every tenant that no session took within `upload_ttl_s` seconds of
    being stored; returns how many objects went."""
    removed = 0
    for folder in await rt.io(_expired_uploads, rt.store, now, rt.settings.upload_ttl_s):
        removed += await rt.io(rt.store.delete_prefix, folder)
        log.info("upload %s expired unused", folder)
    return removed


async def expire_uploads_forever(rt: Runtime, stop_event: asyncio.Event) -> None:
    """`expire_uploads` until `stop_event` is set (a background job of the ingest service), every
    EXPIRE_EVERY_S seconds or a quarter of the ttl, whichever is shorter."""
    every = max(1.0, min(EXPIRE_EVERY_S, rt.settings.upload_ttl_s / 4))
    await repeat_until_stopped(stop_event, every, lambda: expire_uploads(rt, time.time()), "upload expiry")
