"""InferenceServicer without a server: which bots may chat, with which adapter, and which passages
they retrieve, while their session retrains. A fake store, session repo and engine stand in for
NATS, S3 and the model; the servicer's own code is what runs."""

from __future__ import annotations

import asyncio
import hashlib
import json

import pytest

from doclora.v1 import inference_pb2, session_pb2
from services.common import keys
from services.common.config import Settings
from services.common.errors import FailedPrecondition, NotFound
from services.common.store import ObjectInfo
from services.inference.service import InferenceServicer

S = session_pb2.SessionState
RETRAINING = [
    S.SESSION_STATE_QUEUED,
    S.SESSION_STATE_INGESTING,
    S.SESSION_STATE_GENERATING,
    S.SESSION_STATE_AWAITING_REVIEW,
    S.SESSION_STATE_TRAINING,
]


class FakeStore:
    def __init__(self):
        self.objects: dict[str, bytes] = {}
        self.reads: list[str] = []

    def put(self, key: str, data: bytes) -> None:
        self.objects[key] = data

    def stat(self, key: str) -> ObjectInfo:
        if key not in self.objects:
            raise NotFound(key)
        data = self.objects[key]
        return ObjectInfo(key, len(data), hashlib.md5(data).hexdigest(), "application/octet-stream")

    def get_bytes(self, key: str) -> bytes:
        if key not in self.objects:
            raise NotFound(key)
        self.reads.append(key)
        return self.objects[key]

    def get_json(self, key: str):
        return json.loads(self.get_bytes(key))


class FakeSessions:
    def __init__(self):
        self.records: dict[str, session_pb2.Session] = {}

    def add(self, sid: str, state: int, adapter_id: str = "", **kwargs) -> session_pb2.Session:
        rec = session_pb2.Session(session_id=sid, tenant="default", name=f"bot {sid}", state=state,
                                  adapter_id=adapter_id, **kwargs)  # fmt: skip
        self.records[sid] = rec
        return rec

    async def get(self, sid: str) -> session_pb2.Session:
        if sid not in self.records:
            raise NotFound(f"session {sid} not found")
        return self.records[sid]

    async def list(self) -> list[session_pb2.Session]:
        return list(self.records.values())


class FakeRuntime:
    def __init__(self):
        self.settings = Settings()
        self.store = FakeStore()
        self.sessions = FakeSessions()

    async def io(self, fn, /, *args, **kwargs):
        return await asyncio.to_thread(fn, *args, **kwargs)


class FakeEngine:
    """Records what each chat asked the engine for and answers "ok"."""

    def __init__(self):
        self.calls: list[tuple[str | None, list[dict]]] = []

    async def astream_chat(self, messages, adapter_id=None, params=None, cancel=None, stats=None):
        self.calls.append((adapter_id, messages))
        stats.completion_tokens = 1
        stats.finish_reason = "stop"
        yield "ok"


@pytest.fixture
def service():
    rt = FakeRuntime()
    return InferenceServicer(rt, FakeEngine(), embedder=None)


async def chat(service: InferenceServicer, bot_id: str, question: str = "hello?", mode: int = 0):
    request = inference_pb2.ChatRequest(
        bot_id=bot_id, messages=[inference_pb2.ChatMessage(role="user", content=question)], mode=mode
    )
    return [r async for r in service.Chat(request, None)]


def store_chunks(rt: FakeRuntime, sid: str, texts: list[str]) -> None:
    chunks = [
        {"chunk_id": f"c{i}", "doc_id": "d1", "start": i * 100, "end": i * 100 + len(t), "text": t}
        for i, t in enumerate(texts)
    ]
    rt.store.put(keys.chunks("default", sid), "\n".join(json.dumps(c) for c in chunks).encode())


@pytest.mark.parametrize("state", RETRAINING)
async def test_a_retraining_bot_keeps_chatting_with_the_adapter_it_has(service, state):
    """While its session runs again (any state but READY), a bot with an adapter chats with that
    adapter, not the one being trained."""
    service.rt.sessions.add("s1", state, adapter_id="s1")
    out = await chat(service, "s1", mode=inference_pb2.ANSWER_MODE_ADAPTER)
    assert [r.delta for r in out if r.delta] == ["ok"]
    assert service.engine.calls[0][0] == "default/s1"  # the engine knows adapters by tenant


async def test_a_ready_bot_uses_its_latest_round_adapter(service):
    """After a retrain the record names the new round's adapter, and chat switches to it."""
    service.rt.sessions.add("s1", S.SESSION_STATE_READY, adapter_id="s1-r2", round=2)
    await chat(service, "s1", mode=inference_pb2.ANSWER_MODE_ADAPTER)
    assert service.engine.calls[0][0] == "default/s1-r2"


@pytest.mark.parametrize("state", [*RETRAINING, S.SESSION_STATE_FAILED])
async def test_a_bot_with_no_adapter_yet_is_not_ready(service, state):
    """A first round still running (or failed) has no adapter: FAILED_PRECONDITION, nothing generated."""
    service.rt.sessions.add("s1", state)
    with pytest.raises(FailedPrecondition, match="not ready"):
        await chat(service, "s1")
    assert service.engine.calls == []


async def test_a_cancelled_bot_does_not_chat_even_with_an_adapter(service):
    """CANCELLED stops the bot, whatever adapter its record still names."""
    service.rt.sessions.add("s1", S.SESSION_STATE_CANCELLED, adapter_id="s1")
    with pytest.raises(FailedPrecondition, match="not ready"):
        await chat(service, "s1")


async def test_list_bots_lists_every_bot_with_an_adapter(service):
    """ListBots shows ready and retraining bots that have an adapter, not new or cancelled ones."""
    sessions = service.rt.sessions
    sessions.add("ready", S.SESSION_STATE_READY, adapter_id="ready-r1")
    sessions.add("retrain", S.SESSION_STATE_TRAINING, adapter_id="retrain")
    sessions.add("review", S.SESSION_STATE_AWAITING_REVIEW, adapter_id="review")
    sessions.add("fresh", S.SESSION_STATE_TRAINING)
    sessions.add("gone", S.SESSION_STATE_CANCELLED, adapter_id="gone")
    resp = await service.ListBots(inference_pb2.ListBotsRequest(), None)
    assert {(b.bot_id, b.adapter_id) for b in resp.bots} == {
        ("ready", "ready-r1"),
        ("retrain", "retrain"),
        ("review", "review"),
    }


async def test_retrieval_while_retraining_reads_the_chunks_as_stored_now(service):
    """A retraining bot retrieves from its chunks.jsonl; when qagen rewrites it (more documents),
    the next chat uses the new chunks, and an unchanged file is not read again."""
    rt = service.rt
    rt.sessions.add("s1", S.SESSION_STATE_GENERATING, adapter_id="s1")
    store_chunks(rt, "s1", ["The Lumen Orchard was founded in 1987 by Ilse Marrow."])
    out = await chat(service, "s1", "Who founded the Lumen Orchard?", mode=inference_pb2.ANSWER_MODE_BOTH)
    assert [c.text for c in out[0].citations] == ["The Lumen Orchard was founded in 1987 by Ilse Marrow."]
    adapter_id, messages = service.engine.calls[0]
    assert adapter_id == "default/s1" and "Ilse Marrow" in messages[-1]["content"]

    await chat(service, "s1", "When was the Lumen Orchard founded?")
    assert rt.store.reads.count(keys.chunks("default", "s1")) == 1  # the index was kept

    store_chunks(rt, "s1", ["The Lumen Orchard was founded in 1987 by Ilse Marrow.",
                            "Glowing pears are harvested every October."])  # fmt: skip
    out = await chat(service, "s1", "When are glowing pears harvested?")
    assert out[0].citations[0].text == "Glowing pears are harvested every October."
    assert rt.store.reads.count(keys.chunks("default", "s1")) == 2


@pytest.mark.parametrize(
    ("server_mode", "session_mode", "adapter_used", "passages_read"),
    [
        ("retrieval", "", None, True),  # the session did not choose: the server's default
        ("both", "", "default/s1", True),
        ("adapter", "", "default/s1", False),
        ("retrieval", "both", "default/s1", True),  # the session's own choice wins
    ],
)
async def test_a_bot_answers_in_its_sessions_mode_else_the_servers_default(
    server_mode, session_mode, adapter_used, passages_read
):
    """DOCLORA_ANSWER_MODE decides where a bot's answers come from unless its session chose."""
    options = session_pb2.SessionOptions(answer_mode=session_mode)
    assert await answer_source(options, server_mode) == (adapter_used, passages_read)


async def answer_source(options: session_pb2.SessionOptions, server_mode: str = "retrieval"):
    """Where a READY bot with these options answers from, DOCLORA_ANSWER_MODE being `server_mode`:
    (the adapter used, whether passages were read), its citations agreeing with the latter."""

    rt = FakeRuntime()
    rt.settings = rt.settings.replace(answer_mode=server_mode)
    engine = FakeEngine()
    service = InferenceServicer(rt, engine, embedder=None)
    rt.sessions.add("s1", S.SESSION_STATE_READY, "s1", options=options)
    store_chunks(rt, "s1", ["The hello desk opens at nine."])
    out = await chat(service, "s1", "hello?")
    adapter_id, messages = engine.calls[-1]
    question = next(m for m in reversed(messages) if m["role"] == "user")
    passages_read = "Passages from the documents" in question["content"]
    assert bool(out[0].citations) is passages_read
    return adapter_id, passages_read


def test_an_unknown_default_answer_mode_stops_the_service_at_start():
    """A misspelt DOCLORA_ANSWER_MODE is refused when the servicer is built, naming the choices."""

    rt = FakeRuntime()
    rt.settings = rt.settings.replace(answer_mode="retreival")
    with pytest.raises(ValueError, match="both, adapter, retrieval"):
        InferenceServicer(rt, FakeEngine(), embedder=None)


def answer_text(out: list) -> str:
    return "".join(r.delta for r in out)


@pytest.mark.parametrize("mode", [inference_pb2.ANSWER_MODE_RETRIEVAL, inference_pb2.ANSWER_MODE_BOTH])
async def test_a_reply_that_reads_passages_starts_by_quoting_the_answering_sentence(service, mode):
    """The sentence of the passages that answers the question is streamed first, cited, and handed
    to the engine as the start of the reply it goes on from; the model's words follow."""
    rt = service.rt
    rt.sessions.add("s1", S.SESSION_STATE_READY, adapter_id="s1")
    store_chunks(rt, "s1", [
        "The Lumen Orchard was founded in 1987 by Ilse Marrow. It grows glowing pears on 12 hectares.",
        "Visitors may walk the orchard on Sundays. Tickets cost 4 euros.",
    ])  # fmt: skip
    out = await chat(service, "s1", "How much do tickets cost?", mode=mode)
    quoted = 'The document says: "Tickets cost 4 euros." [1]\n\n'
    assert [r.delta for r in out if r.delta] == [quoted + "ok"]  # with the model's first words
    assert answer_text(out) == quoted + "ok"
    _, messages = service.engine.calls[-1]
    assert messages[-1] == {"role": "assistant", "content": quoted}
    assert messages[-2]["role"] == "user" and "Tickets cost 4 euros" in messages[-2]["content"]


async def test_no_quote_when_it_is_turned_off_or_nothing_matches(service):
    """DOCLORA_ANSWER_QUOTE_SENTENCES=0 leaves the reply to the model; a question no sentence
    shares a word with gets no quote (nor passages); the adapter alone never quotes."""
    rt = service.rt
    rt.sessions.add("s1", S.SESSION_STATE_READY, adapter_id="s1")
    store_chunks(rt, "s1", ["Visitors may walk the orchard on Sundays. Tickets cost 4 euros."])
    out = await chat(service, "s1", "Good morning!", mode=inference_pb2.ANSWER_MODE_RETRIEVAL)
    assert answer_text(out) == "ok" and service.engine.calls[-1][1][-1]["role"] == "user"
    out = await chat(service, "s1", "How much do tickets cost?", mode=inference_pb2.ANSWER_MODE_ADAPTER)
    assert answer_text(out) == "ok" and service.engine.calls[-1][1][-1]["role"] == "user"
    rt.settings = rt.settings.replace(answer_quote_sentences=0)
    out = await chat(service, "s1", "How much do tickets cost?", mode=inference_pb2.ANSWER_MODE_RETRIEVAL)
    assert out[0].citations and answer_text(out) == "ok"
    assert service.engine.calls[-1][1][-1]["role"] == "user"


class FullEngine(FakeEngine):
    """Refuses every chat as the engine does when its queue is full."""

    async def astream_chat(self, messages, adapter_id=None, params=None, cancel=None, stats=None):
        from services.common.errors import ResourceExhausted

        self.calls.append((adapter_id, messages))
        raise ResourceExhausted("too many chats waiting (2); try again shortly")
        yield ""  # an async generator, like the engine's


async def test_a_chat_the_engine_refuses_sends_no_quote_before_the_error():
    """The quote waits for the model's first words: a full queue refuses the chat before any text,
    so the gateway can still answer 429 (it reads past the citations only)."""
    from services.common.errors import ResourceExhausted

    rt = FakeRuntime()
    service = InferenceServicer(rt, FullEngine(), embedder=None)
    rt.sessions.add("s1", S.SESSION_STATE_READY, adapter_id="s1")
    store_chunks(rt, "s1", ["Visitors may walk the orchard on Sundays. Tickets cost 4 euros."])
    request = inference_pb2.ChatRequest(
        bot_id="s1", messages=[inference_pb2.ChatMessage(role="user", content="How much do tickets cost?")],
        mode=inference_pb2.ANSWER_MODE_RETRIEVAL,
    )  # fmt: skip
    got = []
    with pytest.raises(ResourceExhausted):
        async for r in service.Chat(request, None):
            got.append(r)
    assert [bool(r.citations) for r in got] == [True] and not any(r.delta for r in got)
    assert service.engine.calls[-1][1][-1]["role"] == "assistant"  # the engine was asked with the quote
