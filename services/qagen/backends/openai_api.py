"""The `openai` backend: pairs from any OpenAI-compatible `/v1/chat/completions` endpoint.

An HTTP client with a bounded number of requests in flight, a deadline on each, and retries with
exponential back-off (at least the server's Retry-After) for timeouts, connection errors, 429 and
5xx only; any other refusal fails the chunk at once. Prompts and strict parsing are
`prompting.ModelGenerator`'s.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from typing import Any

from services.qagen.backends.base import ChunkFailed
from services.qagen.backends.prompting import ModelGenerator


class OpenAIGenerator(ModelGenerator):
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
