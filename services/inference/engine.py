"""Chat engine of the inference service: one base model, many LoRA adapters, text streamed token by token.

It knows nothing of gRPC: the servicer turns a request into messages and `GenerationParams` and
forwards what `ChatEngine.astream_chat` yields.

One copy of the base model per process serves every adapter through PEFT (adapters.py). Chats run
together: a scheduler thread (scheduler.py) decodes all running requests in one forward per step,
whatever their adapters (lora_rows.py), and newcomers join between steps; each request keeps its own
KV cache (kv.py), so its answer is the one it would get alone (bit for bit with int8 weights,
int8.py; in fp32 the CPU's matmul kernels change with the row count, so logits can move in the
last bits). The requester's side only validates and builds the prompt, then reads the text pieces
the scheduler posts; a cold adapter loads on the adapter cache's loader thread meanwhile
(adapters.py), and the chats already decoding pause only while it is moved in (milliseconds). Decode steps of Llama-layout models go
through fastpath.py (the model's arithmetic with less Python around it).
"""

from __future__ import annotations

import asyncio
import logging
import math
import queue
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from services.common import omp
from services.common.errors import FailedPrecondition, InvalidArgument, Unavailable
from services.common.model import chat_prompt
from services.inference import int8 as int8_weights
from services.inference import kv
from services.inference.adapters import AdapterCache
from services.inference.scheduler import DONE, ERROR, PIECE, Request, Scheduler
from services.inference.text import IncrementalDecoder, StopScanner

__all__ = [
    "AdapterCache",
    "ChatEngine",
    "ChatStats",
    "GenerationParams",
    "IncrementalDecoder",
    "StopScanner",
    "check_messages",
    "check_request",
]

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
# Prompt tokens per prefill forward: bounds activation memory and how long running chats pause for
# a newcomer (its chunks alternate with their decode steps).
PREFILL_CHUNK = 512
MAX_BATCH = 8  # requests decoded together
MAX_QUEUE = 64  # requests waiting for a place in the batch before new ones get TooManyRequests
# How often a blocking (sync) consumer waiting for a piece checks that the scheduler is alive.
_POLL_S = 1.0


# --------------------------------------------------------------------------- parameters and results


@dataclass(frozen=True)
class GenerationParams:
    """How to generate: temperature 0 is greedy; `stop` strings end the answer and are not emitted."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        try:
            object.__setattr__(self, "stop", tuple(stop))
        except TypeError:
            raise InvalidArgument("stop must be a list of strings") from None
        self.validate()

    def validate(self) -> None:
        """Raise InvalidArgument naming the first bad field."""
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise InvalidArgument(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not _is_number(self.temperature) or not math.isfinite(self.temperature) or self.temperature < 0:
            raise InvalidArgument(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise InvalidArgument(f"top_p must be in (0, 1], got {self.top_p!r}")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise InvalidArgument(f"at most {MAX_STOP_STRINGS} stop strings, got {len(self.stop)}")
        for s in self.stop:
            if not isinstance(s, str) or not s or len(s) > MAX_STOP_CHARS:
                raise InvalidArgument(
                    f"stop strings must be non-empty strings of at most {MAX_STOP_CHARS} chars"
                )
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < 2**63):
            raise InvalidArgument(f"seed must be an integer in [0, 2**63), got {self.seed!r}")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


@dataclass
class ChatStats:
    """Filled in by the engine as a request runs, for usage counts and an OpenAI-style finish reason."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None  # "stop" (end token or stop string) | "length" | "cancelled"


def check_messages(messages: Any) -> list[dict[str, str]]:
    """Return a clean copy of a chat (role/content dicts), or raise InvalidArgument."""
    if isinstance(messages, str | bytes | Mapping) or not isinstance(messages, Sequence) or not messages:
        raise InvalidArgument("messages must be a non-empty list of {role, content}")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise InvalidArgument(f"messages[{i}] must be an object with role and content")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise InvalidArgument(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {role!r}")
        if not isinstance(content, str):
            raise InvalidArgument(f"messages[{i}].content must be a string")
        clean.append({"role": role, "content": content})
    return clean


def check_request(
    messages: Any, params: GenerationParams | None
) -> tuple[list[dict[str, str]], GenerationParams]:
    """A clean copy of the chat and its checked generation params (defaults for None), or raise
    InvalidArgument; every back end checks a chat with this before it starts."""
    clean = check_messages(messages)
    if params is None:
        params = GenerationParams()
    elif not isinstance(params, GenerationParams):
        raise InvalidArgument("params must be GenerationParams")
    params.validate()
    return clean, params


# --------------------------------------------------------------------------- the engine


class ChatEngine:
    """Streams chat answers from a base causal LM plus the adapters of `adapters`.

    The engine takes the model over: it switches it to the row attention of kv.py, which only
    works through the engine's own caches, and with `int8` gives its linear layers int8 weights
    (`close` undoes both); with `pack` (fp32 on a CPU) its steps use oneDNN-packed copies of the
    weights (packed.py). `max_batch` requests decode together, `max_queue` more may wait.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        adapters: AdapterCache,
        device: Any,
        *,
        max_batch: int = MAX_BATCH,
        max_queue: int = MAX_QUEUE,
        prefill_chunk: int = PREFILL_CHUNK,
        int8: bool = False,
        pack: bool = True,
    ):
        if not getattr(tokenizer, "chat_template", None):
            raise FailedPrecondition("the tokenizer has no chat template; use an instruct/chat model")
        self.device = torch.device(device)
        if int8 and self.device.type != "cpu":
            raise InvalidArgument("int8 weights are for CPU decoding; a GPU runs the model's own dtype")
        adapters.attach(model)
        model.eval()
        self.model = model
        self.tokenizer = tokenizer
        self.adapters = adapters
        # int8 reads a quarter of the weight bytes per token (int8.py); answers differ from fp32's
        self.int8 = int8 and int8_weights.quantize_int8(model) > 0
        if self.int8:
            adapters.fuse_int8()
        # fp32 CPU weights packed for oneDNN (packed.py): faster steps, and a row's base matmuls
        # don't depend on the batch; GPU and int8 runs keep their own weights
        self.packed_bytes = adapters.pack() if pack and not self.int8 and self.device.type == "cpu" else 0
        # int8 turns tiny float differences into different roundings, and packed steps promise a
        # row the same numbers whatever its batch: LoRA goes row by row there
        adapters.row_exact = self.int8 or self.packed_bytes > 0
        if self.packed_bytes:
            log.info("chat steps on oneDNN-packed fp32 weights (%.0f MB)", self.packed_bytes / 1e6)
        config = model.config
        self.context_size: int | None = getattr(config, "max_position_embeddings", None)
        self.eos_ids = _eos_ids(model, tokenizer)
        self._attn_before = kv.install(model)
        # this thread loaded or packed the model and won't run it: its OpenMP workers would slow
        # the scheduler thread's kernels (services/common/omp.py)
        omp.release_threads()
        self.scheduler = Scheduler(
            adapters, tokenizer, self.eos_ids, self.device,
            max_batch=max_batch, max_queue=max_queue, prefill_chunk=prefill_chunk,
        )  # fmt: skip

    def close(self) -> None:
        """Stop the scheduler (chats still running end with Unavailable) and give the model back
        as it came: no adapters, its own attention, fp32 layers."""
        self.scheduler.close()
        self.adapters.detach()
        kv.uninstall(self.model, self._attn_before)
        if self.int8:
            int8_weights.dequantize(self.model)

    # ---- public API

    def stream_chat(
        self,
        messages: Sequence[Mapping[str, str]],
        adapter_id: str | None = None,
        params: GenerationParams | None = None,
        cancel: threading.Event | None = None,
        stats: ChatStats | None = None,
    ) -> Iterator[str]:
        """Yield the answer's text a piece at a time (blocking; run it off the event loop).

        Bad messages or params raise InvalidArgument here; the rest on the first `next()`:
        TooManyRequests when the queue is full, NotFound for an unknown adapter, InvalidArgument
        for a prompt too long. Generation runs ahead of the consumer; setting `cancel` or closing
        the iterator ends it within a step, and no piece is yielded after `cancel` is seen.
        """
        clean, params = check_request(messages, params)
        return self._stream(clean, adapter_id, params, cancel, stats or ChatStats())

    async def astream_chat(
        self,
        messages: Sequence[Mapping[str, str]],
        adapter_id: str | None = None,
        params: GenerationParams | None = None,
        cancel: threading.Event | None = None,
        stats: ChatStats | None = None,
    ) -> AsyncIterator[str]:
        """`stream_chat` for asyncio; stops generation when the consumer leaves.

        A full queue raises TooManyRequests (gRPC RESOURCE_EXHAUSTED with a `retry-after`, HTTP
        429) on the first read, without waiting. Closing this generator or cancelling the task that
        iterates it takes the request out of the batch at the next step and waits for that, so its
        adapter is unpinned when it returns.
        """
        clean, params = check_request(messages, params)
        stats = stats or ChatStats()
        loop = asyncio.get_running_loop()
        items: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

        def post(item: tuple[str, Any]) -> None:
            try:
                loop.call_soon_threadsafe(items.put_nowait, item)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                req.gone = True

        req = Request(adapter_id, params, stats, post, cancel=_checker(cancel))
        self.scheduler.reserve()
        # the chat template and tokenizer are CPU work: a thread, which posts any error
        prepare = asyncio.ensure_future(asyncio.to_thread(self._prepare, req, clean))

        # no timeout here (wait_for can swallow a cancellation in 3.11 and leaves orphan getters):
        # every reserved request gets exactly one "done" or "error" item, even if the scheduler dies
        get = items.get
        reader = _Reader(req, self.scheduler)
        try:
            while (text := reader.take(await get())) is not None:
                yield text
        finally:
            if reader.leave():
                while not reader.drained(await get()):
                    pass
            await prepare

    # ---- internals

    def _encode(self, messages: list[dict[str, str]]) -> list[int]:
        import jinja2

        try:  # a chat that ends with the assistant's words goes on from them (evidence.py)
            text = chat_prompt(self.tokenizer, messages)
        except jinja2.TemplateError as exc:  # e.g. a template that insists roles alternate
            raise InvalidArgument(f"the model's chat template rejected the messages: {exc}") from exc
        # the template already wrote the special tokens (BOS etc.) it wants
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _prepare(self, req: Request, messages: list[dict[str, str]]) -> None:
        """Build the prompt and queue the request (reserved already); the scheduler has its adapter
        loaded off its thread.

        Never raises: a failure reaches the consumer as an ("error", exc) item, so every reserved
        request ends with exactly one "done" or "error" item whoever finishes it.
        """
        try:
            prompt = self._encode(messages)
            req.stats.prompt_tokens = len(prompt)
            if self.context_size and len(prompt) + req.params.max_new_tokens > self.context_size:
                raise InvalidArgument(
                    f"prompt ({len(prompt)} tokens) plus max_new_tokens ({req.params.max_new_tokens}) "
                    f"exceeds the model's context of {self.context_size} tokens"
                )
            req.prompt = prompt
        except BaseException as exc:
            self.scheduler.unreserve()
            req.post((ERROR, exc))
            return
        if req.cancelled():
            self.scheduler.unreserve()
            req.stats.finish_reason = "cancelled"
            req.post((DONE, None))
            return
        self.scheduler.submit(req)

    def _stream(
        self,
        messages: list[dict[str, str]],
        adapter_id: str | None,
        params: GenerationParams,
        cancel: threading.Event | None,
        stats: ChatStats,
    ) -> Iterator[str]:
        items: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        req = Request(adapter_id, params, stats, items.put, cancel=_checker(cancel))
        self.scheduler.reserve()
        self._prepare(req, messages)

        def get() -> tuple[str, Any]:
            while True:
                try:
                    return items.get(timeout=_POLL_S)
                except queue.Empty:
                    if not self.scheduler.alive():
                        raise Unavailable("the chat engine stopped") from None

        reader = _Reader(req, self.scheduler)
        try:
            while (text := reader.take(get())) is not None:
                yield text
        finally:
            if reader.leave():
                while not reader.drained(get()):
                    pass


class _Reader:
    """The consuming side of a request, for `stream_chat` and `astream_chat` alike: they differ
    only in how they wait for the next item (blocking or awaiting), so the rules live here.

    `take` turns each item into text to hand on, or None when the stream is over. A consumer that
    stops early (closed, cancelled, or `cancel` set) calls `leave`, which takes the request out of
    the batch at the next step, then reads items until `drained`: every request ends with exactly
    one "done" or "error" item, after which its adapter is unpinned.
    """

    def __init__(self, req: Request, scheduler: Scheduler):
        self.req = req
        self.scheduler = scheduler
        self.finished = False

    def take(self, item: tuple[str, Any]) -> str | None:
        """The text of a piece; None at the end (raising the request's error, if it failed)."""
        kind, value = item
        if kind == PIECE:
            # cancelled while this piece was on its way: no text after `cancel` is seen
            return None if self.req.cancelled() else value
        self.finished = True
        if kind == ERROR:
            raise value
        return None

    def leave(self) -> bool:
        """Called when the consumer stops; True when the request was still running and its
        remaining items must be read until `drained`."""
        if self.finished:
            return False
        self.req.gone = True
        self.scheduler.wake()
        return True

    def drained(self, item: tuple[str, Any]) -> bool:
        """Whether `item` is the request's last; the request then counts as cancelled."""
        if item[0] == PIECE:
            return False
        self.req.stats.finish_reason = "cancelled"
        return True


def _checker(cancel: threading.Event | None) -> Callable[[], bool]:
    return cancel.is_set if cancel is not None else lambda: False


def _eos_ids(model: torch.nn.Module, tokenizer: Any) -> frozenset[int]:
    ids: set[int] = set()
    gen_config = getattr(model, "generation_config", None)
    for value in (getattr(gen_config, "eos_token_id", None), tokenizer.eos_token_id):
        if value is None:
            continue
        ids.update([value] if isinstance(value, int) else value)
    return frozenset(ids)
