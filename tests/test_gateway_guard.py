"""The gateway's request guard (`gateway.guard`) on the real app under uvicorn on a free loopback
port: a Host the gateway does not answer to and a browser's cross-site request are refused with 403,
a body over its limit with 413 (by Content-Length before anything is read, or counted as a chunked
body arrives, so the route never gets the bytes past the limit), in doclora's error envelope or
OpenAI's under /v1; everything else passes, and a Server-Sent Events response still streams. The
routes used answer without the services (or fail validation before any gRPC call); the two test
routes added to the app record what the guard let through."""

from __future__ import annotations

import asyncio
import contextlib
import json

import httpx
import pytest
import uvicorn
from fastapi import Request

from gateway.app import create_app
from gateway.common import event_stream, sse
from gateway.guard import BODY_SLACK
from services.common.config import Settings

TEXT_BYTES = 1000  # max_text_bytes of these tests: JSON bodies up to 2000 + BODY_SLACK bytes
TEXT_LIMIT = TEXT_BYTES * 2 + BODY_SLACK
CHUNK = 16 * 1024


class Probe:
    """What the test routes saw: bytes of each request body read, whether a read reached the end,
    and the event that lets the test stream send its second event."""

    def __init__(self):
        self.seen: list[int] = []
        self.complete = False
        self.release = asyncio.Event()


def guarded_app(settings: Settings, probe: Probe):
    app = create_app(settings)

    @app.post("/test/echo")
    async def echo(request: Request):
        probe.seen.append(0)
        async for chunk in request.stream():
            probe.seen[-1] += len(chunk)
        probe.complete = True
        return {"bytes": probe.seen[-1]}

    @app.get("/test/events")
    async def events(request: Request):
        async def stream():
            yield sse("delta", {"n": 1})
            await probe.release.wait()
            yield sse("done", {"n": 2})

        return event_stream(request, stream())

    return app


@contextlib.asynccontextmanager
async def serving(probe: Probe | None = None, **setting_kw):
    """The guarded app under uvicorn (httptools) on a free loopback port: (base URL, probe)."""
    probe = probe or Probe()
    settings = Settings(max_text_bytes=TEXT_BYTES, sse_ping_s=60, **setting_kw)
    config = uvicorn.Config(guarded_app(settings, probe), host="127.0.0.1", port=0, log_config=None)
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        assert not task.done(), task.exception()
        await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", probe
    finally:
        server.should_exit = True
        await task
        for left in asyncio.all_tasks() - {asyncio.current_task()}:
            left.cancel()  # sse-starlette's shutdown watcher


@contextlib.asynccontextmanager
async def client(**setting_kw):
    async with serving(**setting_kw) as (url, probe), httpx.AsyncClient(base_url=url, timeout=10) as http:
        http.probe = probe
        yield http


def doclora_error(resp: httpx.Response, status: int, code: str) -> str:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    assert body["error"]["code"] == code
    return body["error"]["message"]


def openai_error(resp: httpx.Response, status: int, kind: str, code: str) -> str:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert (err["type"], err["param"], err["code"]) == (kind, None, code)
    return err["message"]


async def raw_request(url: str, head: bytes) -> bytes:
    """The answer to `head` (a request line and headers, no body) sent on a bare socket; the head
    asks the server to close the connection after its answer."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(head)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()


async def chunks(total: int, fill: bytes = b" "):
    """`total` bytes in CHUNK-sized pieces: an async generator, so httpx sends them chunked."""
    while total > 0:
        yield fill * min(CHUNK, total)
        total -= CHUNK


# --- Host (DNS rebinding) ---


@pytest.mark.parametrize(
    "host", ["evil.example", "evil.example:8080", "localhost.evil.example", "127.0.0.1.nip.io"]
)
async def test_a_host_that_is_no_loopback_name_is_refused(host):
    async with client() as http:
        message = doclora_error(await http.get("/healthz", headers={"Host": host}), 403, "PERMISSION_DENIED")
        assert repr(host) in message and "DOCLORA_ALLOWED_HOSTS" in message
        resp = await http.get("/v1/models", headers={"Host": host})
        assert "DOCLORA_ALLOWED_HOSTS" in openai_error(resp, 403, "permission_error", "permission_denied")


@pytest.mark.parametrize(
    "host",
    [
        "localhost:8080",
        "localhost",
        "127.0.0.1",
        "127.3.4.5:80",
        "[::1]:8080",
        "app.localhost:8080",
        "LOCALHOST",
    ],
)
async def test_loopback_hosts_pass(host):
    async with client() as http:
        resp = await http.get("/healthz", headers={"Host": host})
        assert resp.status_code == 200 and resp.json() == {"status": "ok"}


async def test_a_request_without_host_passes():
    """HTTP/1.0 needs no Host header."""
    async with serving() as (url, _):
        answer = await raw_request(url, b"GET /healthz HTTP/1.0\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b'{"status":"ok"}')


async def test_allowed_hosts_are_served_besides_loopback_names():
    async with client(allowed_hosts="bots.example.com, *.corp.example") as http:
        for host in ("bots.example.com", "BOTS.example.com:8443", "a.corp.example", "localhost:8080"):
            assert (await http.get("/healthz", headers={"Host": host})).status_code == 200, host
        for host in ("evil.example", "example.com", "corp.example.evil"):
            resp = await http.get("/healthz", headers={"Host": host})
            doclora_error(resp, 403, "PERMISSION_DENIED")
    async with client(allowed_hosts="*") as http:
        assert (await http.get("/healthz", headers={"Host": "evil.example"})).status_code == 200


async def test_beyond_loopback_hosts_are_checked_only_where_allowed_hosts_are_set():
    async with client(gateway_host="0.0.0.0") as http:
        assert (await http.get("/healthz", headers={"Host": "evil.example"})).status_code == 200
    async with client(gateway_host="10.1.2.3", allowed_hosts="bots.example.com") as http:
        for host in ("bots.example.com", "10.1.2.3:8080", "localhost"):
            assert (await http.get("/healthz", headers={"Host": host})).status_code == 200, host
        doclora_error(await http.get("/healthz", headers={"Host": "evil.example"}), 403, "PERMISSION_DENIED")


# --- Origin (cross-site requests) ---


async def test_a_foreign_origin_is_refused_on_get_and_post_in_both_envelopes():
    evil = {"Origin": "http://evil.example"}
    async with client() as http:
        message = doclora_error(await http.get("/healthz", headers=evil), 403, "PERMISSION_DENIED")
        assert "'http://evil.example'" in message and "DOCLORA_ALLOWED_ORIGINS" in message
        resp = await http.post("/api/v1/sessions", json={"text": "hello"}, headers=evil)
        doclora_error(resp, 403, "PERMISSION_DENIED")
        resp = await http.get("/v1/models", headers=evil)
        openai_error(resp, 403, "permission_error", "permission_denied")
        resp = await http.post("/v1/chat/completions", json={}, headers=evil)
        assert "http://evil.example" in openai_error(resp, 403, "permission_error", "permission_denied")
        assert http.probe.seen == []


@pytest.mark.parametrize("origin", ["null", "http://127.0.0.1", "https://{host}", "http://localhost:{port}"])
async def test_an_origin_other_than_the_requests_own_is_refused(origin):
    """Another port, scheme or name of the same machine is another origin; `null` is no origin."""
    async with client() as http:
        host = http.base_url.host
        origin = origin.format(host=f"{host}:{http.base_url.port}", port=http.base_url.port)
        resp = await http.post("/test/echo", content=b"x", headers={"Origin": origin})
        doclora_error(resp, 403, "PERMISSION_DENIED")
        assert http.probe.seen == []


async def test_same_origin_requests_pass():
    async with client() as http:
        own = f"http://127.0.0.1:{http.base_url.port}"
        assert (await http.get("/healthz", headers={"Origin": own})).status_code == 200
        resp = await http.post(
            "/test/echo", content=b"abc", headers={"Origin": own, "Sec-Fetch-Site": "same-origin"}
        )
        assert resp.json() == {"bytes": 3}
        # the body reached validation: an OpenAI 400, not a 403
        resp = await http.post("/v1/chat/completions", json={}, headers={"Origin": own})
        assert resp.status_code == 400 and resp.json()["error"]["type"] == "invalid_request_error"
        # default ports are the same origin written either way
        headers = {"Host": "localhost", "Origin": "http://localhost:80"}
        assert (await http.get("/healthz", headers=headers)).status_code == 200


async def test_allowed_origins_are_accepted():
    async with client(allowed_origins="https://ui.example, http://localhost:3000") as http:
        for origin in ("https://ui.example:443", "https://UI.example", "http://localhost:3000"):
            assert (await http.get("/healthz", headers={"Origin": origin})).status_code == 200, origin
        for origin in ("https://ui.example:8443", "http://ui.example", "http://localhost:3001"):
            doclora_error(await http.get("/healthz", headers={"Origin": origin}), 403, "PERMISSION_DENIED")


async def test_a_cross_site_request_without_origin_is_refused():
    async with client() as http:
        for headers in (
            {"Sec-Fetch-Site": "cross-site"},
            {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "no-cors"},
        ):
            message = doclora_error(await http.get("/healthz", headers=headers), 403, "PERMISSION_DENIED")
            assert "cross-site" in message
        resp = await http.post("/v1/chat/completions", json={}, headers={"Sec-Fetch-Site": "cross-site"})
        openai_error(resp, 403, "permission_error", "permission_denied")
        # a link from another site (a top-level navigation, which cannot read the page) still opens it
        link = {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate"}
        assert (await http.get("/healthz", headers=link)).status_code == 200
        resp = await http.post("/test/echo", content=b"x", headers=link)
        doclora_error(resp, 403, "PERMISSION_DENIED")
        for site in ("same-origin", "same-site", "none"):
            assert (await http.get("/healthz", headers={"Sec-Fetch-Site": site})).status_code == 200


# --- body size ---


async def test_a_chunked_body_over_the_limit_is_refused_and_never_reaches_the_route():
    async with client() as http:
        resp = await http.post("/test/echo", content=chunks(10 * TEXT_LIMIT))
        assert resp.request.headers["transfer-encoding"] == "chunked"
        assert "content-length" not in resp.request.headers
        assert str(TEXT_LIMIT) in doclora_error(resp, 413, "RESOURCE_EXHAUSTED")
        assert not http.probe.complete and len(http.probe.seen) == 1 and http.probe.seen[0] <= TEXT_LIMIT
        # the connection still serves the next request
        assert (await http.post("/test/echo", content=b"ok")).json() == {"bytes": 2}


async def test_a_chunked_body_over_the_limit_is_refused_on_real_routes_in_both_envelopes():
    async def json_body():
        yield b'{"text": "'
        async for part in chunks(2 * TEXT_LIMIT, b"a"):
            yield part
        yield b'"}'

    headers = {"Content-Type": "application/json"}
    async with client() as http:
        resp = await http.post("/api/v1/sessions", content=json_body(), headers=headers)
        doclora_error(resp, 413, "RESOURCE_EXHAUSTED")
        resp = await http.post("/v1/chat/completions", content=json_body(), headers=headers)
        openai_error(resp, 413, "invalid_request_error", "resource_exhausted")


async def test_a_content_length_over_the_limit_is_refused_before_the_body_is_sent():
    """Only the head goes out: an answer that waited for the body would never come."""
    async with serving() as (url, probe):
        head = f"POST /test/echo HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: {TEXT_LIMIT + 1}\r\n\r\n"
        answer = await raw_request(url, head.encode())
        assert answer.startswith(b"HTTP/1.1 413")
        body = json.loads(answer.split(b"\r\n\r\n", 1)[1])
        assert (
            body["error"]["code"] == "RESOURCE_EXHAUSTED"
            and f"{TEXT_LIMIT + 1} bytes is too large (the limit is {TEXT_LIMIT} bytes)"
            in body["error"]["message"]
        )
        head = f"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: {10**12}\r\n\r\n"
        answer = await raw_request(url, head.encode())
        assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "resource_exhausted"
        assert probe.seen == []


async def test_bodies_under_the_limit_pass_whole():
    async with client() as http:
        resp = await http.post("/test/echo", content=chunks(TEXT_LIMIT))
        assert resp.json() == {"bytes": TEXT_LIMIT} and http.probe.complete
        resp = await http.post("/test/echo", content=b"x" * TEXT_LIMIT)
        assert resp.json() == {"bytes": TEXT_LIMIT}
        resp = await http.post("/api/v1/sessions", json={"text": "hello", "max_steps": "many"})
        assert doclora_error(resp, 400, "INVALID_ARGUMENT").startswith("body.max_steps")


async def test_a_multipart_body_has_the_upload_limit():
    """Over the JSON limit but under the upload limit passes; over the upload limit does not."""
    upload = 4 * TEXT_LIMIT
    limit = upload + BODY_SLACK
    headers = {"Content-Type": "multipart/form-data; boundary=x"}
    async with client(max_upload_bytes=upload) as http:
        assert (await http.post("/test/echo", content=chunks(limit), headers=headers)).json() == {
            "bytes": limit
        }
        resp = await http.post("/test/echo", content=chunks(limit + 1), headers=headers)
        doclora_error(resp, 413, "RESOURCE_EXHAUSTED")
        assert http.probe.seen[-1] <= limit


# --- streaming ---


async def test_server_sent_events_stream_through_the_guard():
    """The first event arrives while the route still waits to send the second."""
    async with client() as http:
        async with http.stream(
            "GET", "/test/events", headers={"Origin": str(http.base_url).rstrip("/")}
        ) as resp:
            assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
            lines = aiter(resp.aiter_lines())
            first = [await asyncio.wait_for(anext(lines), 5) for _ in range(2)]
            assert first == ["event: delta", 'data: {"n": 1}']
            assert not http.probe.release.is_set()
            http.probe.release.set()
            rest = [line async for line in lines]
    assert [line for line in rest if line] == ["event: done", 'data: {"n": 2}']
