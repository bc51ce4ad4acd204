"""Every name a person can type: file names and links in any script, with quotes, line breaks or
emoji, survive the object store's user metadata (ASCII-only on the wire, so the store encodes
values as RFC 2047 and decodes them on read), the gRPC and HTTP upload routes, and fetching a link;
the session record and the store give back the real name. Real SeaweedFS, nats-server, gateway
(uvicorn) and a local web server."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import http.server
import io
import threading

import httpx
import pytest
from minio import Minio

from doclora.v1 import ingest_pb2, ingest_pb2_grpc, session_pb2, session_service_pb2
from services.common import keys
from services.common.errors import InvalidArgument
from services.ingest.fetch import fetch_url
from services.ingest.sources import add_source
from tests.fixtures.s3 import ACCESS_KEY, SECRET_KEY
from tests.fixtures.served import served
from tests.fixtures.web import DocsServer
from tests.test_e2e import wait_state
from tests.test_extract import make_pdf

TEXT = "The Lumen Orchard was founded in 1987 by the botanist Ilse Marrow on the river bank. " * 3
NAMES = [
    "résumé.txt",
    "日本語.pdf",
    "say \"hi\" 'there' 🎉👨‍👩‍👧.md",
    "two\nlines\tand a tab",
    "  padded  ",
    "=?UTF-8?B?bm90IGVuY29kZWQ=?=",  # an ASCII value that looks encoded stays itself
    "plain-ascii_name (1).txt",
    "",
]


def test_metadata_values_in_any_script_round_trip_through_the_store(store, seaweedfs, tmp_path):
    """What put_bytes, put_stream (multipart too), put_file and copy store, stat, iter_chunks and
    the server-side copy give back unchanged; on the wire every value is printable ASCII."""
    for i, name in enumerate(NAMES):
        store.put_bytes(f"n/{i}", b"x", metadata={"filename": name})
        assert store.stat(f"n/{i}").metadata["filename"] == name, name
        with store.iter_chunks(f"n/{i}") as chunks:
            assert chunks.metadata["filename"] == name
    store.copy("n/0", "n/copied")
    assert store.stat("n/copied").metadata["filename"] == NAMES[0]
    big = b"\x00" * (5 * 1024 * 1024 + 1)  # two parts: the digest is added by a copy afterwards
    store.put_stream("n/big", io.BytesIO(big), part_size=5 * 1024 * 1024, metadata={"source": NAMES[2]})
    meta = store.stat("n/big").metadata
    assert meta == {"source": NAMES[2], "sha256": hashlib.sha256(big).hexdigest()}
    path = tmp_path / "f.bin"
    path.write_bytes(b"file")
    store.put_file("n/file", path, metadata={"filename": NAMES[1]})
    assert store.stat("n/file").metadata["filename"] == NAMES[1]
    raw = Minio(seaweedfs.endpoint, ACCESS_KEY, SECRET_KEY, secure=False, region="us-east-1")
    wire = raw.stat_object(store.bucket, "n/1").metadata["x-amz-meta-filename"]
    assert wire.isascii() and wire.startswith("=?UTF-8?B?"), wire


def test_a_value_that_is_not_unicode_text_is_refused_by_name(store):
    with pytest.raises(InvalidArgument, match="filename"):
        store.put_bytes("n/bad", b"x", metadata={"filename": "lone \ud800 surrogate"})
    assert not store.exists("n/bad")


async def test_a_grpc_upload_keeps_a_name_with_quotes_line_breaks_and_emoji(runtime):
    """IngestService.Upload answers and stores the name as typed (its folders cut, its line break
    made a space), and a session that takes the upload names its document so."""
    from services.ingest.__main__ import setup

    register, _ = await setup(runtime)
    name = 'C:\\Users\\me\\my "notes"\n📄 draft — v2.txt'

    async def parts():
        yield ingest_pb2.UploadRequest(header=ingest_pb2.UploadHeader(filename=name))
        yield ingest_pb2.UploadRequest(chunk=TEXT.encode())

    async with served(runtime, register, ingest_pb2_grpc.IngestServiceStub, auth="auto") as stub:
        resp = await stub.Upload(parts(), timeout=30)
    assert resp.filename == 'my "notes" 📄 draft — v2.txt'
    info = runtime.store.stat(keys.upload("default", resp.upload_id))
    assert info.metadata["filename"] == resp.filename
    # a session taking the upload names its document so
    sid = keys.new_id()
    doc = await add_source(runtime, "default", sid, session_service_pb2.Source(upload_id=resp.upload_id))
    assert doc.name == resp.filename
    assert runtime.store.stat(keys.doc_original("default", sid, doc.doc_id)).metadata["filename"] == doc.name


@pytest.fixture(scope="module")
def web():
    server = DocsServer()
    yield server
    server.close()


@pytest.fixture(scope="module")
def gateway(nats_server, seaweedfs, web):
    """The gateway over the ingest service (SessionService, IngestService, AccessService) and its
    worker, allowed to fetch from the local web server."""
    from services.common.stage import StageWorker
    from services.ingest.__main__ import setup
    from services.ingest.worker import ingest_session
    from tests.test_openai_clients import SERVICERS, running_gateway

    stop, workers = asyncio.Event(), []

    async def ingest(rt):
        register, _ = await setup(rt)
        worker = StageWorker(rt, session_pb2.STAGE_INGEST, lambda item, rec: ingest_session(rt, item, rec))
        workers.append(asyncio.get_running_loop().create_task(worker.run(stop)))
        return register

    async def stop_worker():
        stop.set()
        await asyncio.wait_for(asyncio.gather(*workers), 15)

    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(SERVICERS, "ingest", ("ingest_addr", ingest))
        with running_gateway(nats_server, seaweedfs, ("ingest",), fetch_allow="127.0.0.1") as (url, rt, loop):
            yield url, rt
            # before the gateway's runtime drains its NATS connection, which the worker's pulls hold
            asyncio.run_coroutine_threadsafe(stop_worker(), loop).result(20)


def test_uploads_and_links_with_non_ascii_names_become_documents_named_as_typed(gateway, web):
    """résumé.txt and 日本語.pdf (a real PDF) uploaded through HTTP, links to …/wiki/Köln and to
    …/files/日本語.pdf typed as a person types them: each is READY under its real name, with its
    link as final_url, and the store's metadata gives back the same name and link."""
    base, rt = gateway
    html = f"<html><body><main><h1>Köln</h1><p>{TEXT}</p></main></body></html>".encode()
    web.pages["/wiki/K%C3%B6ln"] = ("text/html; charset=utf-8", html)
    pdf = make_pdf([["Die Lumen Orchard wurde 1987 gegruendet.", TEXT[:80]]])
    web.pages["/files/%E6%97%A5%E6%9C%AC%E8%AA%9E.pdf"] = ("application/pdf", pdf)
    köln, nihongo = web.url("/wiki/Köln"), web.url("/files/日本語.pdf")
    uploads = {"résumé.txt": (TEXT.encode(), "text/plain"), "日本語.pdf": (pdf, "application/pdf"),
               "📄 notes (v2).md": (TEXT.replace("1987", "1991").encode(), "text/markdown"),
               # a browser's form sends " as %22 in the part's filename: the name comes back as typed
               'my "draft" notes.txt': (TEXT.replace("1987", "1993").encode(), "text/plain")}  # fmt: skip
    with httpx.Client(base_url=base, timeout=60) as c:
        ids = []
        for name, (data, ctype) in uploads.items():
            up = c.post("/api/v1/uploads", files={"file": (name, data, ctype)})
            assert up.status_code == 201, up.text
            assert up.json()["filename"] == name
            ids.append(up.json()["upload_id"])
        made = c.post("/api/v1/sessions", json={"upload_ids": ids, "urls": [köln, nihongo]})
        assert made.status_code == 201, made.text
        sess = wait_state(c, made.json()["session_id"], {"GENERATING", "FAILED"}, timeout=60)
    docs = {d["name"]: d for d in sess["documents"] if d["kind"] == "upload"}
    assert sorted(d["name"] for d in sess["documents"]) == sorted([*uploads, "Köln", "日本語.pdf"])
    for d in sess["documents"]:
        assert d["status"] == "DOCUMENT_STATUS_READY", d
    links = {d["final_url"]: d for d in sess["documents"] if d["kind"] == "url"}
    assert links[köln]["name"] == "Köln" and links[nihongo]["name"] == "日本語.pdf"
    assert links[nihongo]["format"] == "pdf" and docs["résumé.txt"]["kind"] == "upload"
    sid = sess["session_id"]
    for d in sess["documents"]:
        meta = rt.store.stat(keys.doc_original("default", sid, d["doc_id"])).metadata
        if d["kind"] == "url":
            assert meta["source"] == d["final_url"]
        else:
            assert meta["filename"] == d["name"]


DISPOSITIONS = {
    "/raw": 'attachment; filename="日本語 “quoted”.pdf"',
    "/ext": "attachment; filename=\"fallback.pdf\"; filename*=UTF-8''r%C3%A9sum%C3%A9.pdf",
    "/evil": 'attachment; filename="../../etc/pass\u2028wd .pdf"',
}


class _DispositionHandler(http.server.BaseHTTPRequestHandler):
    """Answers a PDF with the Content-Disposition of its path in `DISPOSITIONS`, as raw UTF-8."""

    def do_GET(self):  # noqa: N802 - http.server's naming
        self.send_response(200)
        self.send_header("Content-Type", "application/pdf")
        self.send_header("Content-Length", "4")
        # send_header writes Latin-1 only; many servers send UTF-8 bytes all the same
        self._headers_buffer.append(f"Content-Disposition: {DISPOSITIONS[self.path]}\r\n".encode())
        self.end_headers()
        self.wfile.write(b"%PDF")

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def _disposition_server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _DispositionHandler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_a_linked_file_is_named_by_its_content_disposition_in_utf8_or_rfc5987():
    """A server's file name in raw UTF-8 or as filename*=UTF-8''… is read as the text it is;
    a path in it is cut to its last part, and an invisible line separator becomes a space."""
    with _disposition_server() as base:
        names = [fetch_url(f"{base}{p}", max_bytes=100, timeout_s=10, allow_private=True).filename
                 for p in ("/raw", "/ext", "/evil")]  # fmt: skip
    assert names == ["日本語 “quoted”.pdf", "résumé.pdf", "pass wd .pdf"]
