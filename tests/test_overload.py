"""Overload and failure answers of the chat routes, on a real InferenceService process (a tiny
random Llama as its base model) behind the gateway under uvicorn, on the session's nats-server and
SeaweedFS: a full queue answers 429 with Retry-After on the bot chat and on /v1/chat/completions
(streamed or not, and the official `openai` client raises RateLimitError); 100 chat streams at once
against a queue of a few places each get a whole stream or a 429, never a 5xx or a hang, and the
service stays up; when the inference process is SIGKILLed mid-answer, every open stream ends with an
error event (and `data: [DONE]` on /v1), which the `openai` client raises.

The tiny model never says its end token (its row of the output layer is zero), so an answer runs to
`max_tokens`: long ones hold their places in the batch and the queue for as long as a test needs."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from doclora.v1 import session_pb2
from services.common import keys
from services.common.config import settings_env
from services.stack.client import _sse
from tests.test_openai_clients import running_gateway

REPO = Path(__file__).resolve().parents[1]
BATCH, QUEUE = 4, 2  # places in the batch and in the queue of the inference process
LONG = 2000  # tokens of an answer that holds its place (a few ms a token here: seconds)
ASK = [{"role": "user", "content": "Tell me a long story."}]
REST = "/api/v1/bots/base/chat"
OPENAI = "/v1/chat/completions"


def endless_llama(tok):
    """A 2-layer, 64-wide random Llama with `tok`'s vocabulary whose end token's output row is zero,
    so greedy answers (whose best logit is positive) never end before `max_tokens`."""
    import torch

    from tests.test_model import tiny_llama

    model = tiny_llama(len(tok))
    model.config.max_position_embeddings = 4096
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    with torch.no_grad():
        model.lm_head.weight[tok.eos_token_id] = 0
    return model.eval()


@pytest.fixture(scope="module")
def tokenizer():
    from tests.test_model import real_tokenizer

    return real_tokenizer()


@pytest.fixture(scope="module")
def tiny_model(tokenizer, tmp_path_factory) -> Path:
    """`endless_llama` and SmolLM2's tokenizer, saved as a model folder."""
    folder = tmp_path_factory.mktemp("tiny-model")
    endless_llama(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


async def test_a_full_queue_says_how_long_to_wait_at_the_pace_chats_leave_the_batch(tokenizer):
    """The engine's refusal is TooManyRequests with the seconds until the waiting chats have moved
    into the batch, at the average time a chat held its place there (measured on the chats that
    finished), at least 1 s and at most a minute."""
    from services.common.errors import TooManyRequests
    from services.inference.engine import AdapterCache, ChatEngine, GenerationParams

    engine = ChatEngine(
        endless_llama(tokenizer), tokenizer, AdapterCache(Path, capacity=1), "cpu", max_batch=1, max_queue=2
    )  # the base model alone: nothing is fetched
    try:
        assert len([p async for p in engine.astream_chat(ASK, params=GenerationParams(max_new_tokens=8))]) > 0
        assert engine.scheduler.hold_s > 0  # what that chat took
        streams = [engine.astream_chat(ASK, params=GenerationParams(max_new_tokens=LONG)) for _ in range(3)]
        await anext(streams[0])  # in the batch (of one)
        queued = [asyncio.create_task(anext(s)) for s in streams[1:]]
        deadline = time.monotonic() + 30
        while engine.scheduler.counts()["queued"] < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for hold_s, wait in ((7.2, 15), (0.01, 1), (1000.0, 60)):  # two waiting for one place
            engine.scheduler.hold_s = hold_s
            with pytest.raises(TooManyRequests, match="too many chats waiting") as refused:
                await anext(engine.astream_chat(ASK, params=GenerationParams(max_new_tokens=8)))
            assert refused.value.retry_after_s == wait
        for task in queued:
            task.cancel()
        await asyncio.gather(*queued, return_exceptions=True)
        for stream in streams:
            await stream.aclose()
    finally:
        engine.close()


def test_a_burst_before_the_loop_runs_fills_the_batch_and_the_queue_not_the_queue_alone():
    """Chats that arrive together, before the loop has moved any into the batch, get the batch's
    free places as well as the queue's: `max_batch + max_queue` are taken, the next is refused.
    (Counting only the queue refused all but `max_queue` of a burst: 3 of 100 streams answered.)"""
    import torch

    from services.common.errors import TooManyRequests
    from services.inference.scheduler import Scheduler

    sched = Scheduler(
        SimpleNamespace(), None, frozenset(), torch.device("cpu"), max_batch=BATCH, max_queue=QUEUE
    )
    for _ in range(BATCH + QUEUE):
        sched.reserve()
    with pytest.raises(TooManyRequests, match="too many chats waiting"):
        sched.reserve()
    sched.unreserve()  # a place given back is taken again
    sched.reserve()
    assert sched.counts()["reserved"] == BATCH + QUEUE


def start_inference(settings, log: Path) -> subprocess.Popen:
    """`python -m services.inference` with `settings`, its output in `log`."""
    env = {**os.environ, **settings_env(settings), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "services.inference"], cwd=REPO, env=env,
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip


@pytest.fixture(scope="module")
def stack(nats_server, seaweedfs, tiny_model, tmp_path_factory):
    """The gateway's URL and the inference process (batch of BATCH, queue of QUEUE) behind it."""
    state = tmp_path_factory.mktemp("overload")
    kw = dict(base_model=str(tiny_model), device="cpu", state_dir=str(state), sse_ping_s=0.5,
              inference_max_batch=BATCH, inference_max_queue=QUEUE, retrieval_embeddings=False)  # fmt: skip
    with running_gateway(nats_server, seaweedfs, (), **kw) as (url, rt, loop):
        bot = keys.new_id()  # a READY bot answering from its passages alone (the default mode)
        rec = session_pb2.Session(session_id=bot, tenant="default", state=session_pb2.SESSION_STATE_READY)
        asyncio.run_coroutine_threadsafe(rt.sessions.create(rec), loop).result(30)
        chunk = {"chunk_id": "c0", "doc_id": "d1", "start": 0, "end": 40, "text": "A long story is long."}
        rt.store.put_bytes(keys.chunks("default", bot), json.dumps(chunk).encode())
        log = state / "inference.log"
        proc = start_inference(rt.settings, log)  # on the address the gateway calls
        try:
            deadline = time.monotonic() + 180
            while httpx.get(f"{url}/v1/models", timeout=10).status_code != 200:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"the inference service did not start:\n{log.read_text()[-3000:]}")
                time.sleep(0.2)
            yield SimpleNamespace(url=url, proc=proc, log=log, bot=bot)
        finally:
            proc.kill()
            proc.wait(30)


def rest_body(max_tokens: int, stream: bool = True) -> dict:
    return {"messages": ASK, "max_tokens": max_tokens, "stream": stream}


def openai_body(max_tokens: int, stream: bool = True) -> dict:
    return {"model": "base", "messages": ASK, "max_tokens": max_tokens, "stream": stream}


def openai_events(text: str) -> list:
    """The data of each event of an OpenAI stream (JSON, or the string "[DONE]"); pings skipped."""
    out = []
    for line in text.splitlines():
        if line.startswith("data: "):
            data = line.removeprefix("data: ")
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def rest_events(text: str) -> list[tuple[str, dict]]:
    return list(_sse(SimpleNamespace(iter_lines=lambda: iter(text.split("\n")))))


def retry_after_of(resp: httpx.Response) -> int:
    """The Retry-After of a 429: whole seconds, at least 1 and at most a minute."""
    assert resp.status_code == 429, resp.text
    wait = int(resp.headers["Retry-After"])
    assert 1 <= wait <= 60
    return wait


async def fill(http: httpx.AsyncClient, opened: contextlib.AsyncExitStack) -> httpx.Response:
    """Long chat streams started one after another until one is refused, which it returns: the
    batch and the queue are then full. The others stay open until `opened` closes (those waiting in
    the queue are still opening: cancelled then)."""
    tasks = []
    for _ in range(BATCH + QUEUE + 1):
        tasks.append(
            asyncio.create_task(opened.enter_async_context(http.stream("POST", REST, json=rest_body(LONG))))
        )
        opened.callback(tasks[-1].cancel)
        await asyncio.wait(tasks[-1:], timeout=1.0)  # running soon, or waiting in the queue
        if tasks[-1].done() and (resp := tasks[-1].result()).status_code != 200:
            await resp.aread()
            return resp
    pytest.fail(f"{len(tasks)} long chats and no refusal")


async def until_answered(http: httpx.AsyncClient, timeout: float = 60) -> httpx.Response:
    """A short chat, retried while the service is still busy (429); its answer."""
    deadline = time.monotonic() + timeout
    while True:
        resp = await http.post(REST, json=rest_body(4, stream=False))
        if resp.status_code != 429 or time.monotonic() > deadline:
            return resp
        await asyncio.sleep(0.2)


async def test_a_full_queue_answers_429_with_retry_after_on_every_chat_route(stack):
    """With the batch and the queue full of long answers, one more chat is refused at once with
    429 and a Retry-After on the bot chat and /v1/chat/completions, streamed or not, in each one's
    error envelope (not 413, which is for bodies over the limit), for the base model and for a bot
    whose answers cite passages (sent before the engine takes the chat); the `openai` client raises
    RateLimitError. When the long answers go, chats are answered again."""
    import openai

    async with httpx.AsyncClient(base_url=stack.url, timeout=httpx.Timeout(10, read=120)) as http:
        async with contextlib.AsyncExitStack() as opened:
            refused = await fill(http, opened)
            retry_after_of(refused)
            for path, stream in itertools.product((REST, f"/api/v1/bots/{stack.bot}/chat"), (False, True)):
                resp = await http.post(path, json=rest_body(4, stream))
                retry_after_of(resp)
                error = resp.json()["error"]
                assert error["code"] == "RESOURCE_EXHAUSTED" and "too many chats waiting" in error["message"]
            for model, stream in itertools.product(("base", stack.bot), (False, True)):
                resp = await http.post(OPENAI, json={**openai_body(4, stream), "model": model})
                retry_after_of(resp)
                error = resp.json()["error"]
                assert error["type"] == "rate_limit_error" and error["code"] == "resource_exhausted"
            client = openai.AsyncOpenAI(
                base_url=f"{stack.url}/v1", api_key="unused", http_client=http, max_retries=0
            )
            with pytest.raises(openai.RateLimitError, match="too many chats waiting") as caught:
                await client.chat.completions.create(model="base", messages=ASK, max_tokens=4, stream=True)
            assert int(caught.value.response.headers["Retry-After"]) >= 1
        resp = await until_answered(http)
        assert resp.status_code == 200 and resp.json()["finish_reason"] == "length"
    assert stack.proc.poll() is None


async def one_stream(http: httpx.AsyncClient, i: int) -> tuple[int, str]:
    """One chat stream, every other one on /v1; ("ok"|"refused", "") or (status, what was wrong)."""
    path, body = (OPENAI, openai_body(16)) if i % 2 else (REST, rest_body(16))
    async with http.stream("POST", path, json=body) as resp:
        text = (await resp.aread()).decode()
    if resp.status_code == 429:
        retry_after_of(resp)
        return "refused", ""
    if resp.status_code != 200:
        return resp.status_code, text
    if path == OPENAI:
        events = openai_events(text)
        whole = events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == "length"
    else:
        events = rest_events(text)
        whole = events[-1] == ("done", {"finish_reason": "length", "completion_tokens": 16})
    return ("ok", "") if whole else (resp.status_code, text)


async def test_100_chat_streams_at_once_get_a_stream_or_a_429_and_the_service_stays_up(stack):
    """100 chat streams at once, half on /v1, against BATCH + QUEUE places: each gets a whole answer
    (16 tokens, ending in `done` or `[DONE]`) or a 429 with Retry-After, none a 5xx or an error
    event, all within a minute; then the inference process is up and answers the next chat."""
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
    async with httpx.AsyncClient(base_url=stack.url, timeout=60, limits=limits) as http:
        results = await asyncio.wait_for(asyncio.gather(*(one_stream(http, i) for i in range(100))), 90)
        kinds = [kind for kind, _ in results]
        assert set(kinds) == {"ok", "refused"}, [r for r in results if r[0] not in ("ok", "refused")][:3]
        assert kinds.count("ok") >= BATCH + QUEUE  # the first places taken, at least
        assert stack.proc.poll() is None
        resp = await until_answered(http)
        assert resp.status_code == 200, resp.text


async def test_a_killed_inference_process_ends_every_open_stream_with_an_error_event(stack):
    """Three answers streaming (the bot chat, /v1 on the wire and through the `openai` client) when
    the inference process is SIGKILLed: the bot chat ends with an `error` event (UNAVAILABLE) and no
    `done`, /v1 with `data: {"error": ...}` then `data: [DONE]`, and the client raises APIError,
    each soon after, with the text before the failure kept; the next chat answers 503 at once."""
    import openai

    async with httpx.AsyncClient(base_url=stack.url, timeout=httpx.Timeout(10, read=60)) as http:
        client = openai.AsyncOpenAI(
            base_url=f"{stack.url}/v1", api_key="unused", http_client=http, max_retries=0
        )

        async def first_delta(lines) -> list[str]:
            seen = []
            async for line in lines:
                seen.append(line)
                if '"content": "' in line and '"content": ""' not in line or line == "event: delta":
                    return seen
            return seen

        async with (
            http.stream("POST", REST, json=rest_body(LONG)) as rest,
            http.stream("POST", OPENAI, json=openai_body(LONG)) as raw,
        ):
            assert rest.status_code == 200 and raw.status_code == 200
            rest_lines, raw_lines = rest.aiter_lines(), raw.aiter_lines()
            rest_seen, raw_seen = await first_delta(rest_lines), await first_delta(raw_lines)
            sdk = await client.chat.completions.create(
                model="base", messages=ASK, max_tokens=LONG, stream=True
            )
            got = [(await anext(sdk)).choices[0].delta.content]  # the role chunk
            got.append((await anext(sdk)).choices[0].delta.content)

            stack.proc.send_signal(signal.SIGKILL)
            stack.proc.wait(30)

            async def rest_of(lines):
                return [line async for line in lines]

            rest_text = "\n".join(rest_seen + await asyncio.wait_for(rest_of(rest_lines), 30))
            raw_text = "\n".join(raw_seen + await asyncio.wait_for(rest_of(raw_lines), 30))

            async def drain():
                async for ch in sdk:
                    got.append(ch.choices[0].delta.content)

            with pytest.raises(openai.APIError) as caught:
                await asyncio.wait_for(drain(), 30)
        after = await http.post(REST, json=rest_body(4, stream=False))

    events = rest_events(rest_text + "\n\n")
    assert events[0][0] == "delta" and "done" not in [kind for kind, _ in events]
    assert events[-1][0] == "error" and events[-1][1]["error"]["code"] == "UNAVAILABLE"
    chunks = openai_events(raw_text)
    assert chunks[-1] == "[DONE]" and chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    error = chunks[-2]["error"]
    assert error["type"] == "server_error" and error["code"] == "unavailable" and error["message"]
    assert not isinstance(caught.value, openai.APITimeoutError) and got[1]
    assert after.status_code == 503 and after.json()["error"]["code"] == "UNAVAILABLE"
