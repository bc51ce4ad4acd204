"""Server-Sent Events of the gateway (sse-starlette): an idle progress stream gets `: ping` comments
that the CLI's parser skips; a client that goes away cancels the gRPC stream under it; an OpenAI
stream failing midway sends an error chunk and `[DONE]`, with pings in between that the official
`openai` client skips. The first test runs against the real SessionService on nats-server; the
others put a scripted gRPC call under the app."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import grpc
import httpx
import pytest

from doclora.v1 import inference_pb2, session_pb2, session_service_pb2
from gateway.app import create_app
from services.common import keys
from services.common.config import Settings
from services.stack.client import _sse
from tests.test_openai_clients import running_gateway


def test_an_idle_progress_stream_gets_ping_comments_the_cli_skips(nats_server, seaweedfs):
    """An ingesting session with nothing happening: its events stream sends the state, then `: ping`
    comments (every 0.2 s here, 15 s by default); the CLI reads the same lines as one event."""
    with running_gateway(nats_server, seaweedfs, ("sessions",), sse_ping_s=0.2) as (url, rt, loop):
        sid = keys.new_id()
        rec = session_pb2.Session(session_id=sid, tenant="default", state=session_pb2.SESSION_STATE_QUEUED)
        asyncio.run_coroutine_threadsafe(rt.sessions.create(rec), loop).result(30)
        ingesting = rt.sessions.transition(sid, session_pb2.SESSION_STATE_INGESTING)  # publishes an event
        asyncio.run_coroutine_threadsafe(ingesting, loop).result(30)
        lines = []
        with httpx.stream("GET", f"{url}/api/v1/sessions/{sid}/events", timeout=30) as resp:
            assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
            for line in resp.iter_lines():
                lines.append(line)
                if lines.count(": ping") == 2:
                    break
    assert lines[0] == "event: state" and lines[1].startswith("data: {") and lines[2] == ""
    assert lines[3:] == [": ping", "", ": ping"]
    events = list(_sse(SimpleNamespace(iter_lines=lambda: iter([*lines, ""]))))
    assert [kind for kind, _ in events] == ["state"] and events[0][1]["session"]["session_id"] == sid


class ScriptedCall:
    """A gRPC server-stream call playing `script`: messages, pauses (seconds) and an error."""

    def __init__(self, *script):
        self.script, self.cancelled = list(script), False

    async def read(self):
        while self.script:
            item = self.script.pop(0)
            if isinstance(item, float):
                await asyncio.sleep(item)
            elif isinstance(item, Exception):
                raise item
            else:
                return item
        return grpc.aio.EOF

    def cancel(self):
        self.cancelled = True


def over(call: ScriptedCall) -> SimpleNamespace:
    """gRPC clients whose chat and progress streams are `call`."""
    stubs = SimpleNamespace(Chat=lambda req: call, WatchSession=lambda req: call)
    return SimpleNamespace(inference=stubs, sessions=stubs, timeout=5)


def app_over(call: ScriptedCall):
    """The gateway app (pings every 0.05 s) on `over(call)`."""
    app = create_app(Settings(sse_ping_s=0.05))
    app.state.clients = over(call)
    return app


async def test_an_openai_stream_failing_midway_sends_an_error_chunk_then_done():
    """The official client gets the text before the failure, pings skipped, then its APIError with
    the service's message; on the wire the stream ends `data: {"error": ...}` and `data: [DONE]`."""
    import openai

    lost = grpc.aio.AioRpcError(
        grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), details="inference went away"
    )

    def script():
        delta = inference_pb2.ChatResponse
        return ScriptedCall(delta(delta="Hel"), 0.3, delta(delta="lo"), lost)

    app = app_over(script())
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as http:
        body = {"model": "base", "messages": [{"role": "user", "content": "hi"}], "stream": True}
        raw = (await http.post("/v1/chat/completions", json=body)).text
        app.state.clients = over(script())  # the same failure for the client
        client = openai.AsyncOpenAI(
            base_url="http://localhost/v1", api_key="unused", http_client=http, max_retries=0
        )
        got = []
        with pytest.raises(openai.APIError, match="inference went away"):
            async for ch in await client.chat.completions.create(
                model="base", messages=body["messages"], stream=True
            ):
                got.append(ch.choices[0].delta.content or "")
    assert "".join(got) == "Hello"
    events = raw.split("\n\n")
    assert ": ping" in events
    assert events[-2:] == ["data: [DONE]", ""]
    error = json.loads(events[-3].removeprefix("data: "))["error"]
    assert error == {
        "message": "inference went away",
        "type": "server_error",
        "param": None,
        "code": "unavailable",
    }


async def test_a_client_leaving_a_progress_stream_cancels_the_grpc_call():
    """sse-starlette sees the disconnect while the stream waits for the next event, and the route's
    generator closes the WatchSession call instead of holding it open."""
    call = ScriptedCall(session_service_pb2.WatchSessionResponse(), 60.0)
    app = app_over(call)
    first_body, sent = asyncio.Event(), []

    async def receive():
        if not sent:
            return {"type": "http.request", "body": b"", "more_body": False}
        await first_body.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)
        if message["type"] == "http.response.body" and message.get("body"):
            first_body.set()

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/api/v1/sessions/s1/events",
        "raw_path": b"/api/v1/sessions/s1/events",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"localhost")],
        "client": ("127.0.0.1", 1),
        "server": ("localhost", 80),
        "state": {},
    }
    await asyncio.wait_for(app(scope, receive, send), 10)
    assert call.cancelled
    assert sent[1]["body"].startswith(b"event: state\ndata: {")
