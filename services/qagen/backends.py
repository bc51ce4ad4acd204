"""QA generation backends behind one interface, and the per-document pipeline that drives them.

A `Generator` turns one chunk into pairs: `ExtractiveGenerator` with the rules of `strategies.py`,
`OpenAIGenerator` with any OpenAI-compatible `/v1/chat/completions` endpoint, `LocalGenerator` with a
transformers instruct model. A generator either returns pairs or raises `ChunkFailed`; it never
fills a gap with pairs it made up. Model output is parsed strictly (`parse_pairs`): a JSON array of
`{"question", "answer"}` objects and nothing else, or the attempt counts as malformed and is
retried, up to a limit.

`generate_document` runs a generator over a document's chunks (concurrently when the generator
allows it), retries each failed chunk once more on its own, adds paraphrases and the document-level
pairs, and passes everything through the quality gate (`quality.filter_pairs`). Pair ids are hashes
of chunk, question and answer, and a chunk's pairs are kept all-or-nothing, so a retry — or a rerun
with `previous=` the pairs of a run that partly failed — never duplicates what already succeeded.
"""

from __future__ import annotations

import json
import logging
import random
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any, Protocol, runtime_checkable

from services.common.options import QA_BACKENDS, resolve_strategies
from services.common.qapair import QAPair
from services.qagen import quality
from services.qagen import strategies as strategy_rules
from services.qagen.chunk import Chunk
from services.qagen.rules.base import pair_for
from services.qagen.text import MIN_DOCUMENT_WORDS, has_content, prose_words

log = logging.getLogger(__name__)

BACKENDS = QA_BACKENDS
MAX_PAIRS_PER_REPLY = 20
# guided local generation starts the i-th question of a reply with these words, in turn
QUESTION_STARTS = ("What", "Who", "When", "How", "Where", "Which")
Progress = Callable[[int, int], None]


class ChunkFailed(Exception):
    """A chunk's generation failed for good (after retries); `reason` says why, for the session."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class MalformedOutput(ValueError):
    """A model's reply is not the strict JSON the prompt asked for."""


@runtime_checkable
class Generator(Protocol):
    """Makes the pairs of one chunk, or raises `ChunkFailed`."""

    def generate(self, chunk: Chunk, *, doc_title: str | None, strategies: Sequence[str]) -> list[QAPair]: ...


# --- strict parsing ----------------------------------------------------------------------------

_FENCE = re.compile(r"\A```(?:json|JSON)?[ \t]*\n(?P<body>.*?)\n?```\Z", re.S)
_THINK = re.compile(r"\A\s*<think>.*?</think>", re.S)


def parse_pairs(text: str, *, max_pairs: int = MAX_PAIRS_PER_REPLY) -> list[tuple[str, str]]:
    """(question, answer) pairs from a model's reply, or `MalformedOutput`.

    Accepted: exactly one JSON array of objects, each with non-empty string `question` and `answer`
    (other keys ignored); optionally wrapped as `{"pairs": [...]}` (for JSON-object modes), in one
    Markdown code fence, or after a leading `<think>...</think>` block. Anything else — prose around
    the JSON, a cut-off reply, an item without an answer, an empty list — is malformed: a partial
    parse would keep half a reply and pass off a broken generation as a complete one.
    """
    body = _THINK.sub("", text, count=1).strip()
    if m := _FENCE.match(body):
        body = m.group("body").strip()
    if not body:
        raise MalformedOutput("empty reply")
    try:
        data = json.loads(body)
    except json.JSONDecodeError as exc:
        raise MalformedOutput(f"not JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    if isinstance(data, dict) and set(data) == {"pairs"}:
        data = data["pairs"]
    if not isinstance(data, list):
        raise MalformedOutput(f"expected a JSON array, got {type(data).__name__}")
    if not data:
        raise MalformedOutput("an empty list")
    out = []
    for i, item in enumerate(data[:max_pairs]):
        if not isinstance(item, dict):
            raise MalformedOutput(f"item {i} is not an object")
        q, a = item.get("question"), item.get("answer")
        if not isinstance(q, str) or not isinstance(a, str):
            raise MalformedOutput(f"item {i} needs string 'question' and 'answer'")
        if not q.strip() or not a.strip():
            raise MalformedOutput(f"item {i} has an empty question or answer")
        out.append((q.strip(), a.strip()))
    return out


# --- prompts -----------------------------------------------------------------------------------

SYSTEM_PROMPT = (
    "You write question-answer pairs that teach a chat assistant the content of a document. "
    "Use only facts stated in the given text, in its own words where you can; never add outside "
    'knowledge. Reply with only a JSON array of objects with the keys "question" and "answer", '
    'like [{"question": "...?", "answer": "..."}], and nothing before or after it.'
)
PROMPTS: dict[str, str] = {
    "quiz": "Write up to 5 factual quiz questions about the text, each answered by a fact the text states.",
    "definition": (
        'For each term the text defines or explains, write the question "What is <term>?" '
        "answered with the text's explanation. If it defines nothing, ask about its main subject."
    ),
    "wh": (
        "For the most important facts in the text, write who, what, when, where, why and how questions "
        "(only those the text answers), each answered in one or two sentences."
    ),
    "summary": "Write one question asking what this passage says, answered with a short summary of it.",
    "section_summary": 'Write one question asking for a summary of the section "{heading}", answered from the text.',
    "metadata": (
        "If the text states the document's title, authors or date, write one question for each, "
        "answered with exactly what the text states."
    ),
    "vague": (
        'Write 3 short, general questions a person who knows only the title "{title}" would ask, '
        "each answered from the text."
    ),
}
# Strategies a model is asked about once per document (in its first chunk), not for every chunk.
FIRST_CHUNK_ONLY = frozenset({"metadata", "vague"})


def prompt_strategies(chunk: Chunk, selected: Sequence[str], first: bool) -> list[str]:
    """The strategies to prompt for on `chunk` (paraphrases are made by rule afterwards)."""
    return [
        s
        for s in selected
        if s in PROMPTS
        and (first or s not in FIRST_CHUNK_ONLY)
        and (s != "section_summary" or (chunk.heading and chunk.part == 0))
    ]


def build_messages(chunk: Chunk, strategy: str, doc_title: str | None) -> list[dict[str, str]]:
    """The chat messages for one strategy on one chunk."""
    title = strategy_rules.clean_title(doc_title) or "this document"
    instruction = PROMPTS[strategy].format(heading=chunk.heading or "", title=title)
    where = f"Document: {title}\n" + (f"Section: {chunk.heading}\n" if chunk.heading else "")
    user = f'{instruction}\n\n{where}\nText:\n"""\n{chunk.text}\n"""'
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


def pairs_from_reply(chunk: Chunk, strategy: str, reply: str) -> list[QAPair]:
    """Strictly parse a model's reply to a strategy's prompt into pairs from `chunk`."""
    return [pair_for(chunk, q, a, strategy) for q, a in parse_pairs(reply)]


class _ModelGenerator:
    """What the two model backends share: a prompt per strategy, strict parsing, format retries."""

    format_retries = 2

    def complete(self, messages: list[dict[str, str]], attempt: int) -> str:
        raise NotImplementedError

    def generate(
        self, chunk: Chunk, *, doc_title: str | None = None, strategies: Sequence[str] | None = None
    ) -> list[QAPair]:
        selected = resolve_strategies(strategies)
        first = chunk.part == 0 and chunk.start < 600
        pairs: list[QAPair] = []
        for strategy in prompt_strategies(chunk, selected, first):
            messages = build_messages(chunk, strategy, doc_title)
            problem = ""
            for attempt in range(1 + self.format_retries):
                reply = self.complete(messages, attempt)
                try:
                    pairs += pairs_from_reply(chunk, strategy, reply)
                    break
                except MalformedOutput as exc:
                    problem = str(exc)
                    log.info(
                        "malformed %s reply for chunk %s (try %d): %s",
                        strategy,
                        chunk.chunk_id,
                        attempt + 1,
                        exc,
                    )
            else:
                raise ChunkFailed(
                    f"the model's {strategy} reply was malformed {1 + self.format_retries} times: {problem}"
                )
        return pairs


# --- extractive --------------------------------------------------------------------------------


class ExtractiveGenerator:
    """The rules of `strategies.py`: deterministic, grounded, no model; never fails."""

    concurrency = 1

    def generate(
        self, chunk: Chunk, *, doc_title: str | None = None, strategies: Sequence[str] | None = None
    ) -> list[QAPair]:
        return strategy_rules.chunk_pairs(chunk, doc_title=doc_title, strategies=strategies)

    def document_pairs(
        self,
        chunks: Sequence[Chunk],
        *,
        doc_title: str | None = None,
        strategies: Sequence[str] | None = None,
    ) -> list[QAPair]:
        return strategy_rules.document_pairs(chunks, doc_title=doc_title, strategies=strategies)


# --- OpenAI-compatible endpoint ----------------------------------------------------------------


class OpenAIGenerator(_ModelGenerator):
    """Pairs from any OpenAI-compatible chat endpoint (vLLM, Ollama, OpenAI, doclora's inference).

    `base_url` ends in `/v1`. At most `concurrency` requests are in flight at once, whatever the
    number of calling threads. Each request has `timeout` seconds; a timeout, a connection error, a
    429 or a 5xx is retried up to `max_retries` times after `backoff_base * 2**n` seconds (capped at
    `backoff_max`, at least the server's Retry-After, times 1..1+`jitter`). Another 4xx fails the
    chunk at once: asking again will not help. A malformed reply is asked again up to
    `format_retries` times, then the chunk fails. `json_mode` sends `response_format: json_object`
    (for servers that constrain decoding to JSON); `client` replaces the default `httpx.Client`.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str = "",
        model: str = "",
        *,
        concurrency: int = 4,
        timeout: float = 60.0,
        max_retries: int = 4,
        format_retries: int = 2,
        backoff_base: float = 0.5,
        backoff_max: float = 30.0,
        jitter: float = 0.1,
        temperature: float = 0.2,
        max_tokens: int = 1024,
        json_mode: bool = False,
        sleep: Callable[[float], None] = time.sleep,
        client: Any = None,
    ):
        import httpx

        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.concurrency = concurrency
        self.max_retries = max_retries
        self.format_retries = format_retries
        self.backoff_base, self.backoff_max, self.jitter = backoff_base, backoff_max, jitter
        self.temperature, self.max_tokens, self.json_mode = temperature, max_tokens, json_mode
        self.sleep = sleep
        self.requests = 0
        self._slots = threading.BoundedSemaphore(concurrency)
        self._lock = threading.Lock()
        self._random = random.Random(0)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = client or httpx.Client(
            timeout=httpx.Timeout(timeout),
            headers=headers,
            limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
        )
        self._httpx = httpx

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> OpenAIGenerator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def backoff(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait before retry number `attempt + 1`."""
        delay = min(self.backoff_max, self.backoff_base * 2**attempt)
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.backoff_max))
        if self.jitter:
            with self._lock:
                delay *= 1 + self.jitter * self._random.random()
        return delay

    def complete(self, messages: list[dict[str, str]], attempt: int = 0) -> str:
        body: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            # a second try at the same prompt gets a little more freedom to come out differently
            "temperature": self.temperature + 0.3 * min(attempt, 2),
            "max_tokens": self.max_tokens,
        }
        if self.json_mode:
            # JSON-object mode cannot return a bare array: ask for the array under "pairs"
            body["response_format"] = {"type": "json_object"}
            wrap = ' Since the reply must be a JSON object, put the array under the key "pairs".'
            body["messages"] = [{**messages[0], "content": messages[0]["content"] + wrap}, *messages[1:]]
        last = ""
        for retry in range(self.max_retries + 1):
            retry_after = None
            try:
                with self._slots:
                    with self._lock:
                        self.requests += 1
                    response = self._client.post(self.url, json=body)
            except self._httpx.TimeoutException:
                last = "the request timed out"
            except self._httpx.TransportError as exc:
                last = f"connection failed ({type(exc).__name__})"
            else:
                if response.status_code == 200:
                    return _reply_text(response)
                last = f"HTTP {response.status_code}: {response.text[:200]}"
                if response.status_code != 429 and response.status_code < 500:
                    raise ChunkFailed(f"the endpoint refused the request: {last}")
                retry_after = _retry_after(response.headers.get("retry-after"))
            if retry < self.max_retries:
                self.sleep(self.backoff(retry, retry_after))
        raise ChunkFailed(f"the endpoint failed {self.max_retries + 1} times: {last}")


def _reply_text(response: Any) -> str:
    """The assistant's text; a broken envelope reads as an empty (so malformed) reply."""
    try:
        content = response.json()["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        return ""
    return content if isinstance(content, str) else ""


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None  # an HTTP date: the exponential backoff stands


# --- local transformers model ------------------------------------------------------------------


class LocalGenerator(_ModelGenerator):
    """Pairs from a transformers instruct model held in this process (the base model or another).

    The prompt goes through the tokenizer's chat template. The first try decodes greedily; a retry
    after malformed output samples (`temperature`), since greedy decoding would repeat the same
    reply. One generation at a time: the model is not shared between threads.

    `guided=True` (the default) writes the JSON itself and lets the model fill in only the text of
    each question and answer, each ended by the model's closing quote: small models that cannot
    keep a JSON format (the 135M default breaks it on nearly every reply) still give parsable
    output, and what they write is judged by the same quality gate. Up to `pairs_per_prompt`
    pairs per prompt; a repeated or empty question ends the list. `guided=False` asks for the
    whole reply and parses it strictly.
    """

    concurrency = 1

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        max_new_tokens: int = 512,
        format_retries: int = 2,
        temperature: float = 0.7,
        guided: bool = True,
        pairs_per_prompt: int = 3,
        max_field_tokens: int = 80,
    ):
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("the local QA model's tokenizer has no chat template; use an instruct model")
        self.model, self.tokenizer = model, tokenizer
        self.max_new_tokens, self.format_retries, self.temperature = (
            max_new_tokens,
            format_retries,
            temperature,
        )
        self.guided, self.pairs_per_prompt, self.max_field_tokens = guided, pairs_per_prompt, max_field_tokens
        self.calls = 0
        self._lock = threading.Lock()

    def complete(self, messages: list[dict[str, str]], attempt: int = 0) -> str:
        if self.guided:
            return self._filled(messages, attempt)
        return self._free(messages, attempt)

    def _filled(self, messages: list[dict[str, str]], attempt: int) -> str:
        """A JSON array written here, with the model writing each question and answer text."""
        prompt = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        with self._lock:
            self.calls += 1
            reply, seen = "[", set()
            for i in range(self.pairs_per_prompt):
                # a question word to start with: small models otherwise copy a sentence of the text
                start = QUESTION_STARTS[(i + attempt) % len(QUESTION_STARTS)]
                pair_head = reply + (", " if i else "") + '{"question": '
                question = (
                    start + self._field(prompt + pair_head + '"' + start, sample=bool(attempt or i))
                ).strip()
                if question == start or question.casefold() in seen:
                    break
                head = pair_head + json.dumps(question) + ', "answer": "'
                answer = self._field(prompt + head, sample=bool(attempt)).strip()
                if not answer:
                    break
                seen.add(question.casefold())
                reply += (", " if i else "") + json.dumps({"question": question, "answer": answer})
            return reply + "]"

    def _field(self, text: str, *, sample: bool) -> str:
        """The model's continuation of `text` up to its first double quote (a JSON string's end)."""
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        inputs = self.tokenizer(text, return_tensors="pt", add_special_tokens=False).to(self.model.device)
        start = inputs["input_ids"].shape[1]
        tokenizer = self.tokenizer

        class QuoteWritten(StoppingCriteria):  # decoding what is new is cheap at these lengths
            def __call__(self, input_ids, scores, **kwargs):
                done = '"' in tokenizer.decode(input_ids[0, start:], skip_special_tokens=True)
                return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)

        sampling = {"do_sample": True, "temperature": self.temperature} if sample else {"do_sample": False}
        pad = self.tokenizer.pad_token_id
        with torch.inference_mode():
            out = self.model.generate(
                **inputs,
                max_new_tokens=self.max_field_tokens,
                stopping_criteria=StoppingCriteriaList([QuoteWritten()]),
                pad_token_id=pad if pad is not None else self.tokenizer.eos_token_id,
                **sampling,
            )
        new = self.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        text = new.split('"', 1)[0]
        return (" " if text[:1].isspace() else "") + " ".join(text.split())

    def _free(self, messages: list[dict[str, str]], attempt: int) -> str:
        import torch

        with self._lock, torch.inference_mode():
            self.calls += 1
            inputs = self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
            ).to(self.model.device)
            sampling = (
                {"do_sample": True, "temperature": self.temperature} if attempt else {"do_sample": False}
            )
            pad = self.tokenizer.pad_token_id
            out = self.model.generate(
                **inputs,
                max_new_tokens=self.max_new_tokens,
                pad_token_id=pad if pad is not None else self.tokenizer.eos_token_id,
                **sampling,
            )
            new = out[0, inputs["input_ids"].shape[1] :]
            return self.tokenizer.decode(new, skip_special_tokens=True)


# --- the document pipeline ---------------------------------------------------------------------


def generate_document(
    generator: Generator,
    chunks: Sequence[Chunk],
    *,
    doc_title: str | None = None,
    strategies: Iterable[str] | None = None,
    progress: Progress | None = None,
    previous: Iterable[QAPair] = (),
    retry_chunks: Iterable[str] = (),
    retry_failed: bool = True,
    min_support: float = quality.MIN_SUPPORT,
    length_fn: Callable[[str], int] | None = None,
    max_answer_tokens: int | None = None,
    min_words: int = MIN_DOCUMENT_WORDS,
) -> tuple[list[QAPair], dict]:
    """Generate, check and count the pairs of one document's chunks.

    A document with fewer than `min_words` words of prose gets no pairs at all, and `stats["error"]`
    says "not enough text to learn from": pairs from a one-line file or a page whose content never
    loaded would be invented, whatever backend made them. Chunks without content are skipped (no
    request, no pairs). Chunks that already have pairs in
    `previous` are not generated again, unless listed in `retry_chunks` (they failed before; the
    pairs document-level rules made from them are in `previous` all the same); those pairs come first in the result, as they were. Each
    other chunk is generated once (in parallel up to `generator.concurrency`); each that failed is
    then generated once more, alone. `progress(done, total)` is called from this thread once per
    chunk, when it is settled. Paraphrases (strategy `paraphrase`) are added for the new pairs that
    passed the checks, and document-level pairs when the generator makes them.

    `stats`: chunks, skipped, reused, generated, pairs, dropped (by `quality.REASONS`), failed,
    failed_chunks ([{chunk_id, reason}]), retried, recovered, chunks_with_pairs, chunk_coverage,
    by_strategy, seconds.
    """
    started = time.monotonic()
    selected = resolve_strategies(strategies)
    by_id = {c.chunk_id: c for c in chunks}
    previous = [p for p in previous if p.chunk_id in by_id or not p.chunk_id]
    done_before = {p.chunk_id for p in previous} - set(retry_chunks)
    total = len(chunks)
    settled = 0

    def tick() -> None:
        nonlocal settled
        settled += 1
        if progress is not None:
            progress(settled, total)

    words = prose_words(chunks)
    too_little = words < min_words
    todo: list[Chunk] = []
    skipped = reused = 0
    for c in chunks:
        if too_little:
            skipped += 1
            tick()
        elif c.chunk_id in done_before:
            reused += 1
            tick()
        elif not has_content(c):
            skipped += 1
            tick()
        else:
            todo.append(c)

    results: dict[str, list[QAPair]] = {}
    errors: dict[str, str] = {}

    def run(chunk: Chunk) -> list[QAPair]:
        return generator.generate(chunk, doc_title=doc_title, strategies=selected)

    def settle(chunk: Chunk, fut: Future | None, final: bool) -> None:
        try:
            results[chunk.chunk_id] = fut.result() if fut is not None else run(chunk)
            errors.pop(chunk.chunk_id, None)
        except ChunkFailed as exc:
            errors[chunk.chunk_id] = exc.reason
        except Exception as exc:  # a backend bug or a broken model fails the chunk, not the document
            log.exception("generating chunk %s failed", chunk.chunk_id)
            errors[chunk.chunk_id] = f"{type(exc).__name__}: {exc}"
        if final or chunk.chunk_id in results:
            tick()

    workers = max(1, int(getattr(generator, "concurrency", 1)))
    if workers == 1 or len(todo) <= 1:
        for c in todo:
            settle(c, None, final=not retry_failed)
    else:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="qagen") as pool:
            pending = {pool.submit(run, c): c for c in todo}
            while pending:
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in finished:
                    settle(pending.pop(fut), fut, final=not retry_failed)
    failed_first = [c for c in todo if c.chunk_id in errors]
    if retry_failed:
        for c in failed_first:  # alone, one at a time: a chunk that failed under load may pass now
            settle(c, None, final=True)

    # a chunk's pairs are all kept or all missing: a retried chunk cannot duplicate a settled one
    known = {p.pair_id for p in previous}
    fresh: list[QAPair] = []
    for c in todo:
        for p in results.get(c.chunk_id, ()):
            if p.pair_id not in known:
                known.add(p.pair_id)
                fresh.append(p)
    document_level = getattr(generator, "document_pairs", None)
    if document_level is not None and not previous and results:
        fresh += [
            p
            for p in document_level(chunks, doc_title=doc_title, strategies=selected)
            if p.pair_id not in known
        ]

    checks = {
        "chunks": by_id,
        "min_support": min_support,
        "length_fn": length_fn,
        "max_answer_tokens": max_answer_tokens,
    }
    kept, dropped = quality.filter_pairs([*previous, *fresh], **checks)
    dropped = Counter(dropped)
    generated = len(fresh)
    if "paraphrase" in selected:
        old = {q.pair_id for q in previous}
        new = [p for p in kept if p.pair_id not in old]
        variants = [v for v in strategy_rules.paraphrase_pairs(new) if v.pair_id not in known]
        generated += len(variants)
        kept, more = quality.filter_pairs([*kept, *variants], **checks)
        dropped.update(more)
    report = quality.coverage_report(kept, chunks)
    stats = {
        "chunks": total,
        "skipped": skipped,
        "reused": reused,
        "generated": generated,
        "pairs": len(kept),
        "dropped": {r: dropped[r] for r in quality.REASONS},
        "failed": len(errors),
        "failed_chunks": [
            {"chunk_id": c.chunk_id, "reason": errors[c.chunk_id]} for c in todo if c.chunk_id in errors
        ],
        "retried": len(failed_first) if retry_failed else 0,
        "recovered": sum(1 for c in failed_first if c.chunk_id not in errors) if retry_failed else 0,
        "chunks_with_pairs": report["chunks_with_pairs"],
        "chunk_coverage": report["coverage"],
        "by_strategy": dict(sorted(Counter(p.strategy for p in kept).items())),
        "seconds": round(time.monotonic() - started, 3),
    }
    if too_little:
        stats["error"] = (
            f"not enough text to learn from: {words} words of prose, at least {min_words} are needed"
        )
    return kept, stats
