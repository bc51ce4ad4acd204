"""QA generation backends: the OpenAI-compatible one against a local HTTP server that speaks the chat
completions protocol over a real socket (the one place a fake is right: it stands for a remote
service), the local one with a tiny random Llama, strict parsing, and the document pipeline."""

from __future__ import annotations

import json
import re
import threading
import time
from collections import Counter, defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from services.qagen.backends.base import ChunkFailed, Generator, MalformedOutput
from services.qagen.backends.extractive import ExtractiveGenerator
from services.qagen.backends.local import LocalGenerator
from services.qagen.backends.openai_api import OpenAIGenerator
from services.qagen.backends.prompting import (
    build_messages,
    pairs_from_reply,
    parse_pairs,
    prompt_strategies,
)
from services.qagen.chunk import Chunk, chunk_text
from services.qagen.pipeline import generate_document
from services.qagen.strategies import ALL_STRATEGIES

MARKERS = ("ALPHA", "BRAVO", "CHARLIE", "DELTA", "ECHO", "FOXTROT", "GOLF", "HOTEL")


def sectioned_doc(markers=MARKERS) -> str:
    parts = []
    for i, m in enumerate(markers):
        parts.append(
            f"## Station {m.title()}\n\nThe {m} station recorded {40 + i} storms in {1990 + i} on the "
            f"northern coast. Its keepers wrote a daily log of the weather and the passing ships.\n"
        )
    return "\n".join(parts)


def doc_chunks(markers=MARKERS) -> list[Chunk]:
    chunks = chunk_text(sectioned_doc(markers), doc_id="d1")
    assert len(chunks) == len(markers)
    return chunks


# --- a local server speaking POST /v1/chat/completions -----------------------------------------


class FakeChatServer(ThreadingHTTPServer):
    """Chat completions on a free loopback port. The first scripted marker found in the user message
    picks the replies: a queue of actions ("ok", "429", "500", "400", "wait" (429 with Retry-After: 1),
    "slow", "delay", "malformed", "invented"); the last action repeats. It counts requests per marker and concurrent requests."""

    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.script: dict[str, list[str]] = {}
        self.lock = threading.Lock()
        self.requests: Counter[str] = Counter()
        self.in_flight = 0
        self.max_in_flight = 0
        self.bodies: list[dict] = []
        self.headers_seen: list[dict] = []

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def next_action(self, marker: str) -> str:
        with self.lock:
            self.requests[marker] += 1
            queue = self.script.get(marker) or ["ok"]
            return queue.pop(0) if len(queue) > 1 else queue[0]


class _Handler(BaseHTTPRequestHandler):
    server: FakeChatServer

    def log_message(self, *args):  # keep test output quiet
        pass

    def _send(self, status: int, body: dict | str, headers: dict | None = None) -> None:
        data = (json.dumps(body) if isinstance(body, dict) else body).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (its timeout): as a real server would, move on

    def do_POST(self):
        srv = self.server
        with srv.lock:
            srv.in_flight += 1
            srv.max_in_flight = max(srv.max_in_flight, srv.in_flight)
        try:
            if self.path != "/v1/chat/completions":
                return self._send(404, {"error": {"message": "not found"}})
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with srv.lock:
                srv.bodies.append(body)
                srv.headers_seen.append(dict(self.headers))
            user = next(m["content"] for m in body["messages"] if m["role"] == "user")
            marker = next((m for m in MARKERS if m in user), "OTHER")
            action = srv.next_action(marker)
            if action in ("429", "500", "400"):
                headers = {"Retry-After": "0"} if action == "429" else {}
                return self._send(int(action), {"error": {"message": f"scripted {action}"}}, headers)
            if action == "wait":
                return self._send(429, {"error": {"message": "scripted wait"}}, {"Retry-After": "1"})
            if action == "slow":
                time.sleep(1.0)
            if action == "delay":
                time.sleep(0.2)
            text = user.split('"""')[1].strip()
            first = re.split(r"(?<=\.)\s", text, maxsplit=1)[0]
            if action == "malformed":
                content = "Sure! Here are some questions about the text:\n1. What is it?"
            elif action == "invented":
                content = json.dumps(
                    [{"question": "Who founded the station?", "answer": "Napoleon founded the station on the moon in 2091."}]
                )
            else:
                content = json.dumps(
                    [{"question": f"What did the {marker} station record?", "answer": first}]
                )
            self._send(
                200,
                {
                    "id": "chatcmpl-1",
                    "object": "chat.completion",
                    "created": int(time.time()),
                    "model": body.get("model", ""),
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": content},
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": {"prompt_tokens": 10, "completion_tokens": 10, "total_tokens": 20},
                },
            )
        finally:
            with srv.lock:
                srv.in_flight -= 1


@pytest.fixture
def server():
    srv = FakeChatServer()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def openai_gen(server: FakeChatServer, **kw) -> OpenAIGenerator:
    options = {"concurrency": 2, "timeout": 2.0, "max_retries": 3}
    return OpenAIGenerator(server.base_url, "test-key", "tiny-model", **(options | kw))


# --- OpenAI-compatible backend -----------------------------------------------------------------


def test_the_openai_backend_speaks_the_chat_completions_protocol(server):
    """One chunk, one strategy: one POST with model, messages and the bearer key; parsed, grounded pairs."""
    chunk = doc_chunks()[0]
    with openai_gen(server) as gen:
        assert isinstance(gen, Generator)
        pairs = gen.generate(chunk, doc_title="Stations", strategies=["quiz"])
    assert [(p.question, p.strategy, p.chunk_id) for p in pairs] == [
        ("What did the ALPHA station record?", "quiz", chunk.chunk_id)
    ]
    assert pairs[0].answer in chunk.text
    body, headers = server.bodies[0], server.headers_seen[0]
    assert body["model"] == "tiny-model" and body["messages"][0]["role"] == "system"
    assert chunk.text in body["messages"][1]["content"]
    # header names are case-insensitive (the SDK sends them in lower case)
    assert {k.lower(): v for k, v in headers.items()}["authorization"] == "Bearer test-key"


def test_json_mode_asks_for_an_object_and_the_wrapped_array_is_accepted(server):
    """With json_mode the request carries response_format json_object and asks for {"pairs": [...]}."""
    with openai_gen(server, json_mode=True) as gen:
        gen.generate(doc_chunks()[0], doc_title=None, strategies=["quiz"])
    body = server.bodies[0]
    assert body["response_format"] == {"type": "json_object"}
    assert '"pairs"' in body["messages"][0]["content"]
    assert parse_pairs('{"pairs": [{"question": "Q?", "answer": "A."}]}') == [("Q?", "A.")]


def test_each_strategy_is_its_own_prompt_and_document_questions_are_asked_once():
    """Model backends prompt per strategy; metadata and title questions only on the first chunk,
    a section summary only on a section's first chunk; paraphrases are made by rule, not prompted."""
    first, second = doc_chunks()[:2]
    assert prompt_strategies(first, ALL_STRATEGIES, first=True) == [
        "quiz", "definition", "wh", "summary", "section_summary", "metadata", "vague"
    ]  # fmt: skip
    assert prompt_strategies(second, ALL_STRATEGIES, first=False) == [
        "quiz", "definition", "wh", "summary", "section_summary"
    ]  # fmt: skip
    later = chunk_text(sectioned_doc(), doc_id="d1", max_chars=120, overlap_chars=0)
    assert "section_summary" not in prompt_strategies(
        next(c for c in later if c.part > 0), ALL_STRATEGIES, False
    )
    messages = build_messages(first, "vague", "Stations")
    assert "Stations" in messages[1]["content"] and first.text in messages[1]["content"]


def test_429_and_500_are_retried_with_exponential_backoff(server):
    """Two failures then success: three requests, after the SDK's waits of about 0.5 s, then 1 s
    (less up to a quarter of jitter)."""
    server.script["ALPHA"] = ["429", "500", "ok"]
    started = time.monotonic()
    with openai_gen(server) as gen:
        pairs = gen.generate(doc_chunks()[0], doc_title=None, strategies=["quiz"])
    assert len(pairs) == 1
    assert server.requests["ALPHA"] == 3
    assert time.monotonic() - started >= 0.75 * (0.5 + 1.0)


def test_the_sdk_client_has_the_settings_and_honours_retry_after(server):
    """The official async client with our timeout and retries; a 429's Retry-After sets the wait."""
    import openai

    with openai_gen(server, timeout=7.0, max_retries=5) as gen:
        assert isinstance(gen.client, openai.AsyncOpenAI)
        assert (gen.client.max_retries, gen.client.timeout) == (5, 7.0)
        server.script["ALPHA"] = ["wait", "ok"]
        started = time.monotonic()
        assert len(gen.generate(doc_chunks()[0], doc_title=None, strategies=["quiz"])) == 1
    assert server.requests["ALPHA"] == 2 and time.monotonic() - started >= 1.0
    with OpenAIGenerator(server.base_url, "", "tiny-model") as keyless:  # no key: no Authorization
        keyless.generate(doc_chunks()[1], doc_title=None, strategies=["quiz"])
    assert "authorization" not in {k.lower() for k in server.headers_seen[-1]}


def test_a_slow_response_times_out_and_is_retried(server):
    """A reply slower than the per-request timeout is abandoned and asked again."""
    server.script["ALPHA"] = ["slow", "ok"]
    started = time.monotonic()
    with openai_gen(server, timeout=0.25) as gen:
        pairs = gen.generate(doc_chunks()[0], doc_title=None, strategies=["quiz"])
    assert len(pairs) == 1 and server.requests["ALPHA"] == 2
    assert time.monotonic() - started < 1.0


def test_endpoint_failures_past_the_retry_limit_fail_the_chunk(server):
    """A server that keeps answering 500 costs 1 + max_retries requests, then the chunk fails."""
    server.script["ALPHA"] = ["500"]
    with openai_gen(server, max_retries=2) as gen, pytest.raises(ChunkFailed, match="HTTP 500"):
        gen.generate(doc_chunks()[0], doc_title=None, strategies=["quiz"])
    assert server.requests["ALPHA"] == 3


def test_a_client_error_is_not_retried(server):
    """A 400 will not get better by asking again: one request, the chunk fails."""
    server.script["ALPHA"] = ["400"]
    with openai_gen(server) as gen, pytest.raises(ChunkFailed, match="refused"):
        gen.generate(doc_chunks()[0], doc_title=None, strategies=["quiz"])
    assert server.requests["ALPHA"] == 1


def test_malformed_output_is_retried_then_the_chunk_is_reported_failed(server):
    """Prose instead of JSON: asked 1 + format_retries times, then failed, with no pairs made up."""
    server.script["BRAVO"] = ["malformed"]
    chunks = doc_chunks()[:3]
    with openai_gen(server, format_retries=2) as gen:
        pairs, stats = generate_document(gen, chunks, strategies=["quiz"])
    # three tries in the first pass, three more when the chunk is retried alone
    assert server.requests["BRAVO"] == 6
    assert server.requests["ALPHA"] == server.requests["CHARLIE"] == 1
    assert stats["failed"] == 1 and stats["retried"] == 1 and stats["recovered"] == 0
    assert stats["failed_chunks"] == [
        {"chunk_id": chunks[1].chunk_id, "reason": stats["failed_chunks"][0]["reason"]}
    ]
    assert "malformed" in stats["failed_chunks"][0]["reason"]
    assert {p.chunk_id for p in pairs} == {chunks[0].chunk_id, chunks[2].chunk_id}
    assert stats["chunk_coverage"] == pytest.approx(2 / 3)


def test_the_concurrency_limit_is_never_exceeded(server):
    """Eight slow chunks with concurrency 3: never more than three requests in flight, but parallel."""
    for m in MARKERS:
        server.script[m] = ["delay"]
    with openai_gen(server, concurrency=3) as gen:
        started = time.monotonic()
        pairs, stats = generate_document(gen, doc_chunks(), strategies=["quiz"])
        elapsed = time.monotonic() - started
    assert stats["failed"] == 0 and len(pairs) == len(MARKERS)
    assert server.max_in_flight == 3
    assert elapsed < 8 * 0.2  # not one at a time


def test_the_generator_limits_requests_even_when_many_threads_call_it(server):
    """The limit is the generator's own: eight threads calling at once still get two requests at a time."""
    for m in MARKERS:
        server.script[m] = ["delay"]
    chunks = doc_chunks()
    with openai_gen(server, concurrency=2) as gen:
        threads = [
            threading.Thread(
                target=gen.generate, args=(c,), kwargs={"doc_title": None, "strategies": ["quiz"]}
            )
            for c in chunks
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert sum(server.requests.values()) == 8
    assert server.max_in_flight == 2


def test_a_failed_chunk_is_retried_alone_and_never_duplicates_pairs(server):
    """A chunk failing in the first pass is retried on its own; the others are asked once, no pair twice."""
    server.script["BRAVO"] = ["500", "500", "500", "ok"]
    chunks = doc_chunks()[:3]
    calls = []
    with openai_gen(server, max_retries=2) as gen:
        pairs, stats = generate_document(
            gen, chunks, strategies=["quiz", "paraphrase"], progress=lambda d, t: calls.append((d, t))
        )
    assert server.requests == Counter({"ALPHA": 1, "BRAVO": 4, "CHARLIE": 1})
    assert stats["failed"] == 0 and stats["retried"] == 1 and stats["recovered"] == 1
    assert len({p.pair_id for p in pairs}) == len(pairs)
    assert len({p.question for p in pairs}) == len(pairs)
    per_chunk = Counter(p.chunk_id for p in pairs if p.strategy == "quiz")
    assert per_chunk == Counter({c.chunk_id: 1 for c in chunks})
    assert calls == [(1, 3), (2, 3), (3, 3)]


def test_a_rerun_generates_only_the_chunks_that_failed(server):
    """Given the pairs of a run where one chunk failed, a rerun asks for that chunk alone and adds its pairs."""
    chunks = doc_chunks()[:3]
    server.script["CHARLIE"] = ["500"]
    with openai_gen(server, max_retries=0) as gen:
        first, stats = generate_document(gen, chunks, strategies=["quiz", "paraphrase"])
        assert stats["failed"] == 1
        server.script["CHARLIE"] = ["ok"]
        before = Counter(server.requests)
        second, stats = generate_document(gen, chunks, strategies=["quiz", "paraphrase"], previous=first)
    asked = server.requests - before
    assert asked == Counter({"CHARLIE": 1})
    assert stats["failed"] == 0 and stats["reused"] == 2
    assert second[: len(first)] == first
    assert len({p.pair_id for p in second}) == len(second)
    assert {p.chunk_id for p in second} == {c.chunk_id for c in chunks}


def test_an_answer_the_chunk_does_not_support_is_dropped_and_counted(server):
    """A model's invented answer fails the grounding check: dropped as ungrounded, never kept."""
    server.script["ALPHA"] = ["invented"]
    with openai_gen(server) as gen:
        pairs, stats = generate_document(gen, doc_chunks()[:2], strategies=["quiz"])
    assert all("Napoleon" not in p.answer for p in pairs)
    assert stats["dropped"]["ungrounded"] == 1
    assert stats["failed"] == 0 and stats["chunks_with_pairs"] == 1


# --- strict parsing ----------------------------------------------------------------------------

GOOD = '[{"question": "What did the station record?", "answer": "The station recorded 40 storms."}]'


@pytest.mark.parametrize(
    "reply",
    [
        GOOD,
        f"  {GOOD}\n",
        f"```json\n{GOOD}\n```",
        f"<think>The text is about storms.</think>\n{GOOD}",
        '{"pairs": ' + GOOD + "}",
        '[{"question": "What did the station record?", "answer": "The station recorded 40 storms.", "type": "fact"}]',
    ],
)
def test_the_parser_accepts_a_json_array_of_question_answer_objects(reply):
    """Fake model output fed straight to the parser: the array, fenced, after a think block, or wrapped."""
    assert parse_pairs(reply) == [("What did the station record?", "The station recorded 40 storms.")]


@pytest.mark.parametrize(
    ("reply", "why"),
    [
        ("", "empty"),
        ("Sure! Here are some questions: 1. What is it?", "not JSON"),
        ("Here you go: " + GOOD, "not JSON"),
        (GOOD + "\nI hope this helps!", "not JSON"),
        (GOOD[:-10], "not JSON"),
        ('{"question": "Q?", "answer": "A."}', "expected a JSON array"),
        ("[]", "empty list"),
        ('["What is it?"]', "not an object"),
        ('[{"question": "What is it?"}]', "needs string"),
        ('[{"question": "What is it?", "answer": 42}]', "needs string"),
        ('[{"question": " ", "answer": "Something."}]', "empty question"),
        ("```json\n" + GOOD + "\n``` and more", "not JSON"),
    ],
)
def test_the_parser_rejects_anything_else_as_malformed(reply, why):
    """Prose, trailing chatter, cut-off JSON, wrong shapes: malformed, never half-parsed."""
    with pytest.raises(MalformedOutput, match=why):
        parse_pairs(reply)


def test_a_fake_model_reply_becomes_pairs_of_its_chunk():
    """A reply string parsed for a chunk gives pairs that carry the chunk, the strategy and stable ids."""
    chunk = doc_chunks()[0]
    reply = '[{"question": "How many storms did ALPHA record?", "answer": "The ALPHA station recorded 40 storms in 1990."}]'
    pairs = pairs_from_reply(chunk, "wh", reply)
    assert pairs == pairs_from_reply(chunk, "wh", reply)
    (p,) = pairs
    assert (p.chunk_id, p.doc_id, p.start, p.end, p.strategy) == (
        chunk.chunk_id,
        "d1",
        chunk.start,
        chunk.end,
        "wh",
    )
    with pytest.raises(MalformedOutput):
        pairs_from_reply(chunk, "wh", "The station recorded 40 storms.")


# --- local transformers backend ----------------------------------------------------------------

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_tokenizer():
    """A word-level tokenizer built in memory, with a chat template (nothing downloaded)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<pad>", "<|im_start|>", "<|im_end|>"]
    words = sorted(
        set(re.findall(r"\w+|[^\w\s]", sectioned_doc() + " system user assistant question answer"))
    )
    vocab = {w: i for i, w in enumerate(specials + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(r"\w+|[^\w\s]", behavior="isolated")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        pad_token="<pad>",
        eos_token="<|im_end|>",
        bos_token="<|im_start|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


@pytest.fixture(scope="module")
def tiny_llama():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    return LlamaForCausalLM(config).eval(), tokenizer


def test_a_random_local_model_is_rejected_by_strict_parsing_and_the_chunk_fails(tiny_llama):
    """A tiny random Llama writes garbage: each try is malformed, retried, and the chunk fails."""
    model, tokenizer = tiny_llama
    gen = LocalGenerator(model, tokenizer, max_new_tokens=12, format_retries=2, guided=False)
    chunk = doc_chunks()[0]
    with pytest.raises(ChunkFailed, match="malformed 3 times"):
        gen.generate(chunk, doc_title="Stations", strategies=["quiz"])
    assert gen.calls == 3


def test_a_document_from_a_broken_local_model_yields_failed_chunks_not_invented_pairs(tiny_llama):
    """Through the pipeline: no pairs at all, every chunk counted as failed after its retry."""
    model, tokenizer = tiny_llama
    gen = LocalGenerator(model, tokenizer, max_new_tokens=8, format_retries=0, guided=False)
    chunks = doc_chunks()[:2]
    pairs, stats = generate_document(gen, chunks, strategies=["quiz", "paraphrase"])
    assert pairs == []
    assert stats["failed"] == 2 and stats["retried"] == 2 and stats["chunk_coverage"] == 0.0
    assert gen.calls == 4


def test_guided_decoding_always_gives_parsable_json_and_the_gate_drops_garbage(tiny_llama):
    """In guided mode the model writes only the texts: a random model's reply still parses, and
    its made-up pairs are dropped by the quality gate, never kept."""
    model, tokenizer = tiny_llama
    gen = LocalGenerator(model, tokenizer, max_field_tokens=6, pairs_per_prompt=2)
    chunk = doc_chunks()[0]
    reply = gen.complete(build_messages(chunk, "quiz", "Stations"))
    parsed = json.loads(reply)
    assert isinstance(parsed, list) and all(set(p) == {"question", "answer"} for p in parsed)
    pairs, stats = generate_document(gen, doc_chunks()[:2], strategies=["quiz"])
    assert stats["failed"] == 0 and pairs == []
    assert sum(stats["dropped"].values()) == stats["generated"]


def test_the_local_backend_needs_a_chat_template(tiny_llama):
    """A tokenizer without a chat template is refused up front, with a reason."""
    model, _ = tiny_llama
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match="chat template"):
        LocalGenerator(model, tokenizer)


# --- the extractive backend through the pipeline -----------------------------------------------


def test_the_extractive_backend_reports_progress_per_chunk_and_never_fails():
    """Every chunk is settled once, in order of completion, and each yields pairs."""
    chunks = doc_chunks()
    calls = []
    pairs, stats = generate_document(
        ExtractiveGenerator(), chunks, progress=lambda d, t: calls.append((d, t))
    )
    assert calls == [(i, len(chunks)) for i in range(1, len(chunks) + 1)]
    assert stats["failed"] == 0 and stats["chunk_coverage"] == 1.0
    assert stats["generated"] == stats["pairs"] + sum(stats["dropped"].values())
    by_chunk = defaultdict(set)
    for p in pairs:
        by_chunk[p.chunk_id].add(p.strategy)
    assert all("paraphrase" in s for s in by_chunk.values())


def test_unknown_strategies_are_an_error():
    """A typo in a strategy name is reported, not silently ignored."""
    with pytest.raises(ValueError, match="unknown QA strategies: quizz"):
        generate_document(ExtractiveGenerator(), doc_chunks()[:1], strategies=["quizz"])
