"""Chat engine of the inference service: one base model, many LoRA adapters, text streamed token by token.

It knows nothing of gRPC: the servicer turns a request into messages and `GenerationParams` and
forwards what `ChatEngine.astream_chat` yields.

Concurrency, first version: one copy of the base model per process, shared by every adapter through
PEFT (adapters are added by name and deleted on eviction). Generation is serialized by the adapter
cache's lock; each request selects its adapter (or turns adapters off for base chat) while it holds
that lock, so no request ever runs with another's adapter. Batching can come later behind the same
API: PEFT's `adapter_names=` forward argument runs a batch that mixes adapters, and
`AdapterCache.use` becomes a pin that keeps a running batch's adapters from being evicted.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from services.common.errors import FailedPrecondition, InvalidArgument

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
# Prompt tokens per prefill forward: bounds activation memory and lets a cancel land between chunks.
PREFILL_CHUNK = 512
# How often a request waiting for the model checks whether it was cancelled.
_LOCK_POLL_S = 0.05


class _Cancelled(Exception):
    """Raised inside the engine when a request is cancelled before it got the model."""


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


# --------------------------------------------------------------------------- text: detokenizing, stop strings


class IncrementalDecoder:
    """Turns token ids into text one id at a time without splitting characters.

    Decoding each id alone would break multi-byte characters (byte-level tokens can hold part of a
    UTF-8 sequence) and spaces some tokenizers only render in context. So, like TGI and vLLM, decode a
    short window of recent ids and emit only what it adds, holding back text that ends in an
    unfinished character (U+FFFD) until a later id completes it.
    """

    def __init__(self, tokenizer: Any):
        self._tok = tokenizer
        self._ids: list[int] = []
        self._prefix = 0  # start of the decoding window
        self._read = 0  # ids before this index are already emitted
        self._prefix_text = ""

    def _decode(self, ids: list[int]) -> str:
        # cleanup of tokenization spaces rewrites text by context (" ." -> "."), which a window can't match
        return self._tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, token_id: int) -> str:
        """Add one id; return the text it completes (possibly empty)."""
        self._ids.append(token_id)
        text = self._decode(self._ids[self._prefix :])
        if len(text) > len(self._prefix_text) and not text.endswith("\ufffd"):
            piece = text[len(self._prefix_text) :]
            self._prefix, self._read = self._read, len(self._ids)
            self._prefix_text = self._decode(self._ids[self._prefix : self._read])
            return piece
        return ""

    def flush(self) -> str:
        """Text still held back (e.g. an unfinished character when generation ended)."""
        text = self._decode(self._ids[self._prefix :])
        piece = text[len(self._prefix_text) :]
        self._prefix = self._read = len(self._ids)
        self._prefix_text = ""
        return piece


class StopScanner:
    """Cuts a text stream at the first stop string, never emitting any part of it.

    Holds back the longest tail that could still grow into a stop string, so a stop string split
    across tokens is caught too.
    """

    def __init__(self, stops: Sequence[str]):
        self._stops = tuple(stops)
        self._held = ""

    def push(self, text: str) -> tuple[str, bool]:
        """Add text; return (text safe to emit, whether a stop string was hit)."""
        if not self._stops:
            return text, False
        buf = self._held + text
        hits = [i for i in (buf.find(s) for s in self._stops) if i >= 0]
        if hits:
            self._held = ""
            return buf[: min(hits)], True
        keep = self._partial_tail(buf)
        self._held = buf[len(buf) - keep :]
        return buf[: len(buf) - keep], False

    def _partial_tail(self, buf: str) -> int:
        longest = max(len(s) for s in self._stops) - 1
        for k in range(min(longest, len(buf)), 0, -1):
            tail = buf[-k:]
            if any(s.startswith(tail) for s in self._stops):
                return k
        return 0

    def flush(self) -> str:
        """Held-back text, released when the stream ends without a stop string."""
        held, self._held = self._held, ""
        return held


# --------------------------------------------------------------------------- adapters


class AdapterCache:
    """LRU of LoRA adapters attached to one shared base model, bounded by count.

    `fetch(adapter_id) -> folder` finds an adapter's PEFT folder (the service downloads it from the
    object store); it raises NotFound for an unknown id. It is called without the model lock held,
    so a slow download does not stall other chats; concurrent calls for one id must be safe.
    """

    def __init__(self, fetch: Callable[[str], Path], capacity: int = 8):
        if capacity < 1:
            raise ValueError("adapter cache capacity must be at least 1")
        self.capacity = capacity
        self._fetch = fetch
        self._names: OrderedDict[str, str] = OrderedDict()  # adapter id -> PEFT adapter name, LRU first
        self._serial = itertools.count()
        # Held while the shared model runs or changes: generation and adapter loading exclude each other.
        self._lock = threading.Lock()
        self._holder: int | None = None  # thread id holding the lock, to refuse re-entry instead of hanging
        self._base: torch.nn.Module | None = None
        self._peft: Any = None  # the PeftModel around the base, made when the first adapter loads

    def attach(self, model: torch.nn.Module) -> None:
        """Bind the cache to its base model (once; the engine does this)."""
        from peft import PeftModel

        base = model.get_base_model() if isinstance(model, PeftModel) else model
        if self._base is not None and self._base is not base:
            raise ValueError("this adapter cache is already attached to another model")
        self._base = base
        if isinstance(model, PeftModel):
            self._peft = model

    def __contains__(self, adapter_id: object) -> bool:
        return adapter_id in self._names

    def __len__(self) -> int:
        return len(self._names)

    def loaded(self) -> list[str]:
        """Ids of loaded adapters, least recently used first."""
        return list(self._names)

    @contextlib.contextmanager
    def use(
        self, adapter_id: str | None, cancelled: Callable[[], bool] | None = None
    ) -> Iterator[torch.nn.Module]:
        """Hold the model, with `adapter_id` active (None: adapters off), for the block.

        Loads the adapter if needed, evicting the least recently used one when over capacity.
        Raises NotFound from `fetch`, FailedPrecondition when the adapter doesn't fit the base, and
        `_Cancelled` when `cancelled()` turns true while waiting for the model.
        """
        if self._base is None:
            raise FailedPrecondition("the adapter cache has no model attached")
        folder = None
        if adapter_id is not None and adapter_id not in self._names:
            folder = Path(self._fetch(adapter_id))
        with self._held(cancelled):
            if adapter_id is None:
                if self._peft is None:
                    yield self._base
                else:
                    with self._peft.disable_adapter():
                        yield self._peft
            else:
                self._peft_set(self._load_locked(adapter_id, folder))
                yield self._peft

    def evict(self, adapter_id: str) -> bool:
        """Unload an adapter now (e.g. its bot was deleted); False if it wasn't loaded."""
        with self._held():
            name = self._names.pop(adapter_id, None)
            if name is None:
                return False
            self._peft.delete_adapter(name)
            return True

    @contextlib.contextmanager
    def _held(self, cancelled: Callable[[], bool] | None = None) -> Iterator[None]:
        self._acquire(cancelled)
        try:
            yield
        finally:
            self._holder = None
            self._lock.release()

    def _acquire(self, cancelled: Callable[[], bool] | None) -> None:
        if self._holder == threading.get_ident():
            # e.g. a second sync stream_chat started in a thread still iterating its first one
            raise RuntimeError("this thread already holds the model: finish or close its other chat stream")
        while not self._lock.acquire(timeout=_LOCK_POLL_S):
            if cancelled is not None and cancelled():
                raise _Cancelled
        if cancelled is not None and cancelled():
            self._lock.release()
            raise _Cancelled
        self._holder = threading.get_ident()

    def _peft_set(self, name: str) -> None:
        if self._peft.active_adapter != name:
            self._peft.set_adapter(name)

    def _load_locked(self, adapter_id: str, folder: Path | None) -> str:
        name = self._names.get(adapter_id)
        if name is not None:
            self._names.move_to_end(adapter_id)
            return name
        if folder is None:  # evicted between the unlocked check and getting the lock
            folder = Path(self._fetch(adapter_id))
        # PEFT adapter names become module keys, so they can't be user ids (dots are not allowed there)
        name = f"adapter_{next(self._serial)}"
        started = time.perf_counter()
        try:
            self._add(folder, name)
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            self._discard(name)
            raise FailedPrecondition(
                f"adapter {adapter_id!r} cannot be loaded onto the base model: {exc}"
            ) from exc
        self._names[adapter_id] = name
        log.info("loaded adapter %s as %s in %.2fs", adapter_id, name, time.perf_counter() - started)
        # load first, then evict: the cache never drops to zero adapters, which PEFT handles poorly
        while len(self._names) > self.capacity:
            old_id, old_name = self._names.popitem(last=False)
            self._peft.delete_adapter(old_name)
            log.info("evicted adapter %s", old_id)
        return name

    def _add(self, folder: Path, name: str) -> None:
        from peft import PeftModel

        device = str(next(self._base.parameters()).device)
        if self._peft is None:
            self._peft = PeftModel.from_pretrained(
                self._base, str(folder), adapter_name=name, is_trainable=False, torch_device=device
            )
        else:
            self._peft.load_adapter(str(folder), adapter_name=name, is_trainable=False, torch_device=device)
        self._peft.eval()

    def _discard(self, name: str) -> None:
        """Remove what a failed load left behind, so base chat and other adapters stay exact."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        if self._peft is not None and name in self._peft.peft_config:
            with contextlib.suppress(Exception):
                self._peft.delete_adapter(name)
            return
        # a failed first load leaves layers in the base with no PeftModel to delete them through
        for module in self._base.modules():
            if isinstance(module, BaseTunerLayer):
                module.delete_adapter(name)


# --------------------------------------------------------------------------- the engine


_PIECE, _ERROR, _DONE = "piece", "error", "done"


class ChatEngine:
    """Streams chat answers from a base causal LM plus the adapters of `adapters`."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, adapters: AdapterCache, device: Any):
        if not getattr(tokenizer, "chat_template", None):
            raise FailedPrecondition("the tokenizer has no chat template; use an instruct/chat model")
        adapters.attach(model)
        model.eval()
        self.tokenizer = tokenizer
        self.adapters = adapters
        self.device = torch.device(device)
        config = model.config
        self.context_size: int | None = getattr(config, "max_position_embeddings", None)
        self.eos_ids = _eos_ids(model, tokenizer)

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

        Bad messages or params raise InvalidArgument here; the rest (NotFound for an unknown adapter,
        a prompt too long) on the first `next()`. The iterator holds the model between pieces:
        consume it promptly or close it.
        """
        clean, params = self._check(messages, params)
        return self._generate(clean, adapter_id, params, _checker(cancel), stats or ChatStats())

    async def astream_chat(
        self,
        messages: Sequence[Mapping[str, str]],
        adapter_id: str | None = None,
        params: GenerationParams | None = None,
        cancel: threading.Event | None = None,
        stats: ChatStats | None = None,
    ) -> AsyncIterator[str]:
        """`stream_chat` for asyncio: generation runs in a thread and stops when the consumer leaves.

        Closing this generator or cancelling the task that iterates it stops generation at the next
        token and waits for the thread to finish, so the model is free when it returns.
        """
        clean, params = self._check(messages, params)
        stats = stats or ChatStats()
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        gone = threading.Event()

        def cancelled() -> bool:
            return gone.is_set() or (cancel is not None and cancel.is_set())

        def post(item: tuple[str, Any]) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                gone.set()

        def work() -> None:
            try:
                for piece in self._generate(clean, adapter_id, params, cancelled, stats):
                    post((_PIECE, piece))
            except BaseException as exc:  # handed to the consumer, which re-raises it
                post((_ERROR, exc))
            else:
                post((_DONE, None))

        thread = threading.Thread(target=work, name="doclora-generate", daemon=True)
        thread.start()
        finished = False
        try:
            while True:
                kind, value = await queue.get()
                if kind == _PIECE:
                    yield value
                    continue
                finished = True
                if kind == _ERROR:
                    raise value
                return
        finally:
            if not finished:
                gone.set()
                while (await queue.get())[0] == _PIECE:  # the worker stops at its next token
                    pass
            # the worker has posted its last item and the model is free; all it has left is to return
            thread.join()

    # ---- internals

    def _check(
        self, messages: Sequence[Mapping[str, str]], params: GenerationParams | None
    ) -> tuple[list[dict[str, str]], GenerationParams]:
        clean = check_messages(messages)
        if params is None:
            params = GenerationParams()
        elif not isinstance(params, GenerationParams):
            raise InvalidArgument("params must be GenerationParams")
        params.validate()
        return clean, params

    def _encode(self, messages: list[dict[str, str]]) -> list[int]:
        import jinja2

        try:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except jinja2.TemplateError as exc:  # e.g. a template that insists roles alternate
            raise InvalidArgument(f"the model's chat template rejected the messages: {exc}") from exc
        # the template already wrote the special tokens (BOS etc.) it wants
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _generate(
        self,
        messages: list[dict[str, str]],
        adapter_id: str | None,
        params: GenerationParams,
        cancelled: Callable[[], bool],
        stats: ChatStats,
    ) -> Iterator[str]:
        prompt = self._encode(messages)
        stats.prompt_tokens = len(prompt)
        if self.context_size and len(prompt) + params.max_new_tokens > self.context_size:
            raise InvalidArgument(
                f"prompt ({len(prompt)} tokens) plus max_new_tokens ({params.max_new_tokens}) exceeds "
                f"the model's context of {self.context_size} tokens"
            )
        started = time.perf_counter()
        try:
            with self.adapters.use(adapter_id, cancelled) as model:
                yield from self._decode(model, prompt, params, cancelled, stats)
        except _Cancelled:
            stats.finish_reason = "cancelled"
        log.debug(
            "chat adapter=%s prompt=%d completion=%d finish=%s in %.2fs",
            adapter_id, stats.prompt_tokens, stats.completion_tokens, stats.finish_reason,
            time.perf_counter() - started,
        )  # fmt: skip

    def _decode(
        self,
        model: torch.nn.Module,
        prompt: list[int],
        params: GenerationParams,
        cancelled: Callable[[], bool],
        stats: ChatStats,
    ) -> Iterator[str]:
        rng = torch.Generator(device=self.device)
        if params.seed is None:
            rng.seed()  # a fresh Generator has a fixed default seed; unseeded requests must differ
        else:
            rng.manual_seed(params.seed)
        detok = IncrementalDecoder(self.tokenizer)
        stops = StopScanner(params.stop)

        logits, cache = self._prefill(model, prompt, cancelled)
        if logits is None:
            stats.finish_reason = "cancelled"
            return
        stats.finish_reason = "length"
        for step in range(params.max_new_tokens):
            token = _pick(logits, params, rng)
            if token in self.eos_ids:
                stats.finish_reason = "stop"
                break
            stats.completion_tokens += 1
            text, hit = stops.push(detok.push(token))
            if text:
                yield text
            if hit:
                stats.finish_reason = "stop"
                return
            if cancelled():
                stats.finish_reason = "cancelled"
                return
            if step + 1 == params.max_new_tokens:
                break
            logits, cache = self._forward(model, [token], cache)
        text, hit = stops.push(detok.flush())
        if not hit:
            text += stops.flush()
        if text:
            yield text

    def _prefill(
        self, model: torch.nn.Module, prompt: list[int], cancelled: Callable[[], bool]
    ) -> tuple[torch.Tensor | None, Any]:
        cache = None
        logits = None
        for start in range(0, len(prompt), PREFILL_CHUNK):
            if cancelled():
                return None, None
            logits, cache = self._forward(model, prompt[start : start + PREFILL_CHUNK], cache)
        return logits, cache

    def _forward(self, model: torch.nn.Module, ids: list[int], cache: Any) -> tuple[torch.Tensor, Any]:
        # inference_mode only around the forward: it is thread-local, and a generator suspended
        # inside it would leak the mode into the consumer's code between pieces
        with torch.inference_mode():
            out = model(
                input_ids=torch.tensor([ids], device=self.device),
                cache=cache,
                use_cache=True,
                logits_to_keep=1,
            )
        return out.logits[0, -1], out.cache


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


def _pick(logits: torch.Tensor, params: GenerationParams, rng: torch.Generator) -> int:
    if params.temperature == 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_p >= 1:
        return int(torch.multinomial(probs, 1, generator=rng))
    # nucleus: the smallest set of most likely tokens whose mass reaches top_p (the top one always)
    sorted_probs, order = torch.sort(probs, descending=True)
    outside = torch.cumsum(sorted_probs, dim=-1) - sorted_probs >= params.top_p
    sorted_probs[outside] = 0
    return int(order[torch.multinomial(sorted_probs, 1, generator=rng)])
