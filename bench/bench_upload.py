"""Peak RSS while a 200 MB upload streams through `IngestService.Upload`'s code path into a real
SeaweedFS S3 server (target: < 100 MB growth). Prints the figures.

    .venv/bin/python bench/bench_upload.py [MB]
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from doclora.v1 import ingest_pb2  # noqa: E402
from services.common.config import Settings  # noqa: E402
from services.common.store import ArtifactStore  # noqa: E402
from services.ingest.uploads import receive_upload  # noqa: E402
from services.stack.s3d import start_seaweedfs  # noqa: E402

CHUNK = 1024 * 1024


class _Rt:
    """The two things `receive_upload` uses from a Runtime: settings and the store (no NATS needed)."""

    def __init__(self, settings: Settings, store: ArtifactStore):
        self.settings, self.store = settings, store

    async def io(self, fn, /, *args, **kwargs):
        return await asyncio.to_thread(fn, *args, **kwargs)


class PeakRSS:
    def __init__(self):
        self.proc = psutil.Process()
        self.base = self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


async def main(mb: int) -> None:
    with tempfile.TemporaryDirectory() as tmp, start_seaweedfs(Path(tmp), access_key="bench", secret_key="bench-secret") as s3:
        s3.wait_ready(60)
        settings = Settings(s3_endpoint=s3.endpoint, s3_access_key="bench", s3_secret_key="bench-secret",
                            max_upload_bytes=(mb + 1) * CHUNK, s3_bucket="bench")
        store = ArtifactStore.from_settings(settings)
        store.ensure_bucket()
        rt = _Rt(settings, store)
        block = os.urandom(CHUNK)
        digest = hashlib.sha256()

        async def requests():
            yield ingest_pb2.UploadRequest(header=ingest_pb2.UploadHeader(filename="big.bin"))
            for i in range(mb):
                chunk = block[i % 251:] + block[: i % 251]  # distinct chunks, no big buffer
                digest.update(chunk)
                yield ingest_pb2.UploadRequest(chunk=chunk)

        # warm the code path once so imports and pools are not counted as growth
        async def small():
            yield ingest_pb2.UploadRequest(header=ingest_pb2.UploadHeader(filename="warm.bin"))
            yield ingest_pb2.UploadRequest(chunk=block)

        await receive_upload(rt, small())
        with PeakRSS() as rss:
            t0 = time.perf_counter()
            resp = await receive_upload(rt, requests())
            secs = time.perf_counter() - t0
        assert resp.sha256 == digest.hexdigest() and resp.size_bytes == mb * CHUNK
        growth = (rss.peak - rss.base) / 2**20
        print(f"upload of {mb} MiB through receive_upload into SeaweedFS S3: {secs:.1f} s, "
              f"{mb / secs:.1f} MiB/s")
        print(f"RSS before {rss.base / 2**20:.0f} MiB, peak {rss.peak / 2**20:.0f} MiB, "
              f"growth {growth:.0f} MiB (target < 100 MiB); sha256 verified")


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 200))
