"""The official `openai` client (sync, async, streamed with usage, raw responses) and LangChain's
`ChatOpenAI` against the gateway, served by uvicorn over real InferenceService (the bundled base
model) and SessionService, on the session's real nats-server and SeaweedFS: what current SDKs send
is answered, what doclora does not answer is refused in OpenAI's error shape.

`running_gateway` (also used by test_gateway_sse.py) runs chosen servicers and the gateway on one
event loop in a thread, for a whole module."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import threading

import httpx
import pytest
import uvicorn

from services.common.config import Settings
from services.stack.ports import free_port
from tests.fixtures.s3 import ACCESS_KEY, SECRET_KEY

ASK = [{"role": "user", "content": "Name one fruit."}]
TIMEOUT = 300  # answers wait on a 2-core CPU that other tests may be using


async def _inference(rt):
    from services.inference.__main__ import setup

    register, _ = await setup(rt)
    return register


async def _sessions(rt):
    from doclora.v1 import access_pb2, access_pb2_grpc, session_service_pb2, session_service_pb2_grpc
    from services.ingest.access_service import AccessServicer
    from services.ingest.service import SessionServicer

    def register(server):
        session_service_pb2_grpc.add_SessionServiceServicer_to_server(SessionServicer(rt), server)
        access_pb2_grpc.add_AccessServiceServicer_to_server(AccessServicer(rt), server)
        return [
            session_service_pb2.DESCRIPTOR.services_by_name["SessionService"].full_name,
            access_pb2.DESCRIPTOR.services_by_name["AccessService"].full_name,
        ]

    return register


SERVICERS = {"inference": ("inference_addr", _inference), "sessions": ("ingest_addr", _sessions)}


@contextlib.contextmanager
def running_gateway(nats_server, seaweedfs, parts: tuple[str, ...], **setting_kw):
    """The gateway's URL and the Runtime of its services: the named `SERVICERS` as gRPC servers and
    the gateway app (settings changed by `setting_kw`) under uvicorn, on free loopback ports and a
    new bucket, running on one event loop in a thread until the block ends. Each service checks
    its callers' credentials as `doclora up` runs it (`services.common.access`)."""
    from gateway.__main__ import server_config
    from gateway.app import create_app
    from services.common.access import AccessStore, AuthInterceptor, Gate
    from services.common.runtime import Runtime
    from services.common.server import serve

    ports = {field: f"127.0.0.1:{free_port()}" for field, _ in SERVICERS.values()}
    settings = Settings().replace(
        nats_url=nats_server.url,
        s3_endpoint=seaweedfs.endpoint,
        s3_access_key=ACCESS_KEY,
        s3_secret_key=SECRET_KEY,
        s3_secure=False,
        s3_bucket=f"test-{secrets.token_hex(8)}",
        gateway_port=free_port(),
        inference_max_new_tokens=16,
        **ports,
        **setting_kw,
    )
    server = uvicorn.Server(server_config(settings, create_app(settings)))
    loop = asyncio.new_event_loop()
    ready, stop, out = threading.Event(), asyncio.Event(), {}

    async def main():
        try:
            rt = out["rt"] = await Runtime.connect(settings, "pytest-gateway")
            tasks = []
            for part in parts:
                field, setup = SERVICERS[part]
                gate = Gate(AccessStore(rt.bus), settings, ports[field])
                kw = dict(name=part, addr=ports[field], register=await setup(rt), grace_s=0.5,
                          interceptors=[AuthInterceptor(gate)])  # fmt: skip
                tasks.append(asyncio.create_task(serve(**kw, stop_event=stop)))
            tasks.append(asyncio.create_task(server.serve()))
            while not server.started:
                await asyncio.sleep(0.05)
        except BaseException as exc:
            out["error"] = exc
            raise
        finally:
            ready.set()
        await stop.wait()
        server.should_exit = True
        await asyncio.gather(*tasks, return_exceptions=True)
        await rt.close()
        for task in asyncio.all_tasks() - {asyncio.current_task()}:
            task.cancel()  # sse-starlette's shutdown watcher, which polls as long as the loop runs

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    ready.wait(300)
    if "error" in out or not server.started:
        pytest.fail(f"the gateway did not start: {out.get('error')!r}")
    try:
        yield f"http://127.0.0.1:{settings.gateway_port}", out["rt"], loop
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(60)
        loop.close()


@pytest.fixture(scope="module")
def gateway(nats_server, seaweedfs):
    with running_gateway(nats_server, seaweedfs, ("inference",), sse_ping_s=0.2) as (url, _, _):
        yield url


@pytest.fixture(scope="module")
def client(gateway):
    import openai

    return openai.OpenAI(base_url=f"{gateway}/v1", api_key="unused", max_retries=0, timeout=TIMEOUT)


def test_sync_client_takes_content_parts_the_developer_role_and_max_completion_tokens(client):
    """A developer message and content as text parts get the greedy answer of the same chat sent as
    a system message and one string, within max_completion_tokens; n=1, response_format text and
    fields doclora does not know are taken too."""
    plain = client.chat.completions.create(
        model="base",
        messages=[
            {"role": "system", "content": "You are helpful."},
            {"role": "user", "content": "Name one\nfruit."},
        ],
        max_tokens=6,
    )
    parts = client.chat.completions.create(
        model="base",
        messages=[
            {"role": "developer", "content": "You are helpful."},
            {
                "role": "user",
                "content": [{"type": "text", "text": "Name one"}, {"type": "text", "text": "fruit."}],
            },
        ],
        max_completion_tokens=6,
        n=1,
        response_format={"type": "text"},
        extra_body={"logit_bias": {}, "some_future_field": True},
    )
    assert parts.choices[0].message.content.strip()
    assert parts.choices[0].message.content == plain.choices[0].message.content
    assert parts.usage.prompt_tokens == plain.usage.prompt_tokens
    assert 0 < parts.usage.completion_tokens <= 6


def test_streaming_with_include_usage_ends_with_a_usage_chunk(gateway, client):
    """Chunks carry the answer (pings in between are skipped by the client); the last chunk has no
    choices and the usage; on the wire every event is `data: {json}` or a `: ping` comment."""
    stream = client.chat.completions.create(
        model="base", messages=ASK, max_tokens=6, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    assert all(ch.usage is None for ch in chunks[:-1])
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks[:-1])
    whole = client.chat.completions.create(model="base", messages=ASK, max_tokens=6)
    assert text == whole.choices[0].message.content
    body = {"model": "base", "messages": ASK, "max_tokens": 6, "stream": True}
    raw = httpx.post(f"{gateway}/v1/chat/completions", json=body, timeout=TIMEOUT).text
    events = raw.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    assert all(e.startswith("data: {") or e == ": ping" for e in events[:-2]), events


async def test_async_client_answers_and_streams(gateway):
    import openai

    client = openai.AsyncOpenAI(base_url=f"{gateway}/v1", api_key="unused", max_retries=0, timeout=TIMEOUT)
    async with client:
        done = await client.chat.completions.create(model="base", messages=ASK, max_tokens=6)
        stream = await client.chat.completions.create(model="base", messages=ASK, max_tokens=6, stream=True)
        text = "".join([ch.choices[0].delta.content or "" async for ch in stream if ch.choices])
    assert text == done.choices[0].message.content and text.strip()


def test_with_raw_response_gives_the_http_response_and_the_parsed_completion(client):
    raw = client.chat.completions.with_raw_response.create(model="base", messages=ASK, max_tokens=4)
    assert raw.http_response.status_code == 200
    assert raw.headers["content-type"].startswith("application/json")
    done = raw.parse()
    assert done.object == "chat.completion" and done.model == "base" and done.id.startswith("chatcmpl-")


def test_an_unknown_model_is_not_found_with_code_model_not_found(client):
    import openai

    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="0123456789abcdef", messages=ASK)
    err = caught.value
    assert err.code == "model_not_found" and err.param == "model" and err.type == "invalid_request_error"


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"n": 2}, "n"),
        ({"response_format": {"type": "json_object"}}, "response_format.type"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
            "messages[0].content[0].type",
        ),
    ],
    ids=["n-2", "json-response-format", "image-part"],
)
def test_what_doclora_does_not_answer_is_a_clear_400(client, extra, param):
    import openai

    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(**{"model": "base", "messages": ASK, **extra})
    err = caught.value
    assert err.param == param and err.code == "unsupported_value" and param in err.message


def test_validation_errors_and_unknown_paths_have_openais_shape(gateway):
    bad = httpx.post(f"{gateway}/v1/chat/completions", json={"model": "base", "messages": []}, timeout=30)
    assert bad.status_code == 400
    err = bad.json()["error"]
    assert err.keys() == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error" and err["param"] == "messages"
    missing = httpx.post(f"{gateway}/v1/embeddings", json={}, timeout=30)
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "invalid_request_error"


def test_langchain_chat_openai_invokes_and_streams(gateway):
    """LangChain's ChatOpenAI pointed at the gateway: a whole answer and a streamed one agree."""
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(
        model="base",
        base_url=f"{gateway}/v1",
        api_key="unused",
        temperature=0,
        max_completion_tokens=6,
        max_retries=0,
        timeout=TIMEOUT,
    )
    said = llm.invoke([("system", "You are helpful."), ("human", "Name one fruit.")])
    assert said.content.strip() and said.usage_metadata["output_tokens"] > 0
    streamed = "".join(
        ch.content for ch in llm.stream([("system", "You are helpful."), ("human", "Name one fruit.")])
    )
    assert streamed == said.content
