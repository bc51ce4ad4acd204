"""The `openai` backend: pairs from any OpenAI-compatible `/v1/chat/completions` endpoint.

The official `openai` SDK's async client does the HTTP: a deadline on each request (`timeout`) and
its retries (`max_retries`) with exponential back-off and the server's Retry-After, for timeouts,
connection errors, 408, 409, 429 and 5xx; any other refusal fails the chunk at once. The client runs
on an event loop of the generator's own, so that callers in any number of threads share one
connection pool and one bound on the requests in flight. Prompts and strict parsing are
`prompting.ModelGenerator`'s.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from services.qagen.backends.base import ChunkFailed
from services.qagen.backends.prompting import ModelGenerator

# statuses the SDK retries (its `_should_retry`): failing on them means the retries ran out
_RETRIED_STATUSES = (408, 409, 429)


class OpenAIGenerator(ModelGenerator):
    """Pairs from any OpenAI-compatible chat endpoint (vLLM, Ollama, OpenAI, doclora's inference).

    `base_url` ends in `/v1`. At most `concurrency` requests are in flight at once, whatever the
    number of calling threads (a request waiting to be retried keeps its place). Each request has
    `timeout` seconds; the SDK retries a timeout, a connection error, a 408, 409, 429 or 5xx up to
    `max_retries` times (0.5 s doubling up to 8 s, or the server's Retry-After). Another 4xx fails
    the chunk at once: asking again will not help. A malformed reply is asked again up to
    `format_retries` times, then the chunk fails. `json_mode` sends `response_format: json_object`
    (for servers that constrain decoding to JSON).
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
        temperature: float = 0.2,
        max_tokens: int = 1024,
        json_mode: bool = False,
    ):
        import openai

        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.concurrency = concurrency
        self.max_retries = max_retries
        self.format_retries = format_retries
        self.temperature, self.max_tokens, self.json_mode = temperature, max_tokens, json_mode
        self.requests = 0
        self._lock = threading.Lock()
        self._openai = openai
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="qagen-openai", daemon=True)
        self._thread.start()
        self._slots = asyncio.Semaphore(concurrency)  # bound to the loop that first waits on it
        self._headers = None if api_key else {"Authorization": openai.Omit()}
        self.client = openai.AsyncOpenAI(
            base_url=base_url,
            # no key: no Authorization header at all, and never OPENAI_API_KEY from the environment
            # (it belongs to another endpoint); the SDK takes an empty key only from a provider
            api_key=api_key or _no_key,
            timeout=timeout,
            max_retries=max_retries,
        )

    def _call(self, coroutine: Any) -> Any:
        """Run `coroutine` on the generator's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def close(self) -> None:
        if self._loop.is_closed():
            return
        self._call(self.client.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def __enter__(self) -> OpenAIGenerator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

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
        with self._lock:
            self.requests += 1
        return self._call(self._ask(body))

    async def _ask(self, body: dict[str, Any]) -> str:
        openai = self._openai
        tries = f"the endpoint failed {self.max_retries + 1} times"
        try:
            async with self._slots:
                completion = await self.client.chat.completions.create(**body, extra_headers=self._headers)
        except openai.APITimeoutError:
            raise ChunkFailed(f"{tries}: the request timed out") from None
        except openai.APIConnectionError as exc:
            raise ChunkFailed(f"{tries}: connection failed ({type(exc.__cause__).__name__})") from None
        except openai.APIStatusError as exc:
            status = exc.status_code
            last = f"HTTP {status}: {exc.response.text[:200]}"
            if status in _RETRIED_STATUSES or status >= 500:
                raise ChunkFailed(f"{tries}: {last}") from None
            raise ChunkFailed(f"the endpoint refused the request: {last}") from None
        except openai.APIResponseValidationError:
            return ""  # a broken envelope reads as an empty (so malformed) reply
        return _reply_text(completion)


async def _no_key() -> str:
    return ""


def _reply_text(completion: Any) -> str:
    """The assistant's text; a broken envelope reads as an empty (so malformed) reply."""
    try:
        content = completion.choices[0].message.content
    except (AttributeError, IndexError, TypeError):
        return ""
    return content if isinstance(content, str) else ""
