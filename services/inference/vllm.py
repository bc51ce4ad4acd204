"""The vLLM back end of the inference service (DOCLORA_INFERENCE_BACKEND=vllm): `VllmEngine` answers
chats through a vLLM OpenAI-compatible server instead of a model in this process.

It keeps `ChatEngine.astream_chat`'s contract, so the servicer (retrieval, citations, streaming)
doesn't know which back end runs. Each chat is one streamed `POST /v1/chat/completions` whose
`model` is the bot's adapter as vLLM knows it (or the base model); closing the stream closes the
HTTP response, and vLLM aborts a request whose client went away.

vLLM must run with `--enable-lora` and `VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`. Before an adapter's
first chat `VllmAdapters` downloads it (the adapter cache's `fetch`), copies it into
DOCLORA_VLLM_ADAPTER_DIR (a volume vLLM reads too) and registers it with `/v1/load_lora_adapter`.
At most DOCLORA_VLLM_MAX_LORAS stay registered: past that the least recently used one that no
running chat uses is unregistered and its folder deleted, as services/inference/adapters.py does
for the local back end. vLLM forgets its adapters when it restarts: a chat it answers 404 (model
unknown) registers the adapter again and is retried once.

Errors are services/common/errors.py types: Unavailable when the server can't be reached or fails,
TooManyRequests for its 429/503, InvalidArgument for a request it refuses (a prompt too long).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shutil
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from services.common import access, keys
from services.common.config import Settings, SettingsError
from services.common.errors import (
    DocloraError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    TooManyRequests,
    Unavailable,
)
from services.inference.engine import ChatStats, GenerationParams, check_request

log = logging.getLogger(__name__)

BACKENDS = ("local", "vllm")
CONNECT_TIMEOUT_S = 10.0
MAX_CONNECTIONS = 512  # chats in flight to vLLM at once; more wait for a connection


# --------------------------------------------------------------------------- settings and names


def backend_of(settings: Settings) -> str:
    """The inference back end the settings ask for; a SettingsError names what is wrong."""
    backend = settings.inference_backend.strip().lower()
    if backend not in BACKENDS:
        raise SettingsError(
            f"DOCLORA_INFERENCE_BACKEND={settings.inference_backend!r}: expected one of {', '.join(BACKENDS)}"
        )
    if backend == "vllm":
        if not settings.vllm_url.strip():
            raise SettingsError(
                "DOCLORA_INFERENCE_BACKEND=vllm needs DOCLORA_VLLM_URL (e.g. http://vllm:8000)"
            )
        if not settings.vllm_url.startswith(("http://", "https://")):
            raise SettingsError(
                f"DOCLORA_VLLM_URL={settings.vllm_url!r}: expected an http:// or https:// URL"
            )
        if settings.vllm_max_loras < 1:
            raise SettingsError(f"DOCLORA_VLLM_MAX_LORAS={settings.vllm_max_loras}: expected at least 1")
        if settings.vllm_timeout_s <= 0:
            raise SettingsError(
                f"DOCLORA_VLLM_TIMEOUT_S={settings.vllm_timeout_s}: expected a positive number"
            )
    return backend


def served_name(ref: str) -> str:
    """vLLM's name for an adapter ref ("{tenant}/{adapter_id}"), also its folder's name: tenants and
    adapter ids have no dots, so "{tenant}.{adapter_id}" is unique and safe as a file name."""
    tenant, _, adapter_id = ref.rpartition("/")
    if not access.is_tenant_name(tenant) or not keys.is_valid_id(adapter_id):
        raise NotFound(f"adapter {ref!r} not found")
    return f"{tenant}.{adapter_id}"


def ref_of(name: str) -> str | None:
    """The adapter ref of a served name (None: not one of doclora's names)."""
    tenant, dot, adapter_id = name.partition(".")
    if not dot or not access.is_tenant_name(tenant) or not keys.is_valid_id(adapter_id):
        return None
    return f"{tenant}/{adapter_id}"


def error_message(body: Any) -> str:
    """vLLM's error text from a response body: `{"error": {"message": ...}}` (current versions),
    `{"message": ...}` (before 0.10), FastAPI's `{"detail": ...}`, or the text itself."""
    if isinstance(body, Mapping):
        inner = body.get("error")
        if isinstance(inner, Mapping) and inner.get("message"):
            return str(inner["message"])
        for key in ("message", "detail", "error"):
            if body.get(key):
                return str(body[key])
    return str(body).strip() or "no details"


def _retry_after(response: httpx.Response) -> int:
    try:
        return max(1, int(float(response.headers.get("retry-after", "1"))))
    except ValueError:
        return 1


# --------------------------------------------------------------------------- HTTP to vLLM


class VllmApi:
    """The HTTP calls doclora makes to one vLLM server, with its errors as doclora's."""

    def __init__(self, url: str, api_key: str = "", timeout_s: float = 600.0):
        base = url.rstrip("/").removesuffix("/v1")  # "http://vllm:8000" or ".../v1" alike
        self.url = base
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.AsyncClient(
            base_url=base,
            headers=headers,
            timeout=httpx.Timeout(timeout_s, connect=min(CONNECT_TIMEOUT_S, timeout_s)),
            limits=httpx.Limits(max_connections=MAX_CONNECTIONS, max_keepalive_connections=64),
        )

    async def close(self) -> None:
        await self.client.aclose()

    def unreachable(self, exc: Exception) -> Unavailable:
        return Unavailable(f"the vLLM server at {self.url} is unavailable: {type(exc).__name__}: {exc}")

    async def post(self, path: str, body: Mapping[str, Any]) -> httpx.Response:
        try:
            return await self.client.post(path, json=body)
        except httpx.TransportError as exc:  # refused, reset, timed out
            raise self.unreachable(exc) from exc

    async def models(self) -> list[dict[str, Any]]:
        """GET /v1/models: the base model(s) first, then the adapters registered."""
        try:
            response = await self.client.get("/v1/models")
        except httpx.TransportError as exc:
            raise self.unreachable(exc) from exc
        self.check(response, "listing models")
        return list(response.json().get("data") or [])

    @contextlib.asynccontextmanager
    async def stream(self, path: str, body: Mapping[str, Any]):
        """A streamed POST; leaving the block closes the connection (vLLM aborts the request)."""
        try:
            async with self.client.stream("POST", path, json=body) as response:
                yield response
        except httpx.TransportError as exc:
            raise self.unreachable(exc) from exc

    def check(self, response: httpx.Response, doing: str) -> None:
        """Raise for a failed response (its body read): 429/503 TooManyRequests, 400/422
        InvalidArgument with vLLM's message, the rest Unavailable."""
        if response.is_success:
            return
        message = error_message(_json_or_text(response))
        status = response.status_code
        if status in (429, 503):
            raise TooManyRequests(f"the vLLM server is busy ({status}): {message}", _retry_after(response))
        if status in (400, 422):
            raise InvalidArgument(message)
        if status in (401, 403):
            raise Unavailable(
                f"the vLLM server at {self.url} refused doclora's key (DOCLORA_VLLM_API_KEY): {message}"
            )
        raise Unavailable(f"the vLLM server at {self.url} failed {doing} ({status}): {message}")


def _json_or_text(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return response.text


class _UnknownModel(Exception):
    """vLLM answered 404 for the chat's model: it lost the adapter (restarted) or never had it."""


# --------------------------------------------------------------------------- adapters in vLLM


@dataclass
class Registered:
    """An adapter doclora registered with vLLM (or is registering); `pin` hands it to a chat."""

    ref: str
    name: str
    pins: int = 0
    retired: bool = False  # evicted while in use: unregistered when its last chat ends
    loading: asyncio.Task | None = field(default=None, repr=False)  # its registration, while it runs
    registered: bool = False  # vLLM took it once (a failed reload keeps the entry)


class VllmAdapters:
    """The adapters doclora registered with vLLM: an LRU of at most `capacity` names, with pins for
    running chats. Methods run on the event loop, except `loaded` and `evict`, which forget.py calls
    from a worker thread (the same calls it makes on the local AdapterCache).

    `fetch(ref) -> folder` gets an adapter's PEFT folder (blocking; run on a thread); it is copied to
    `adapter_dir/<name>` and registered as `lora_path=<adapter_path>/<name>`.
    """

    def __init__(
        self,
        api: VllmApi,
        fetch: Callable[[str], Path],
        adapter_dir: Path,
        adapter_path: str = "",
        capacity: int = 16,
    ):
        if capacity < 1:
            raise ValueError("vLLM adapter capacity must be at least 1")
        self.api = api
        self.fetch = fetch
        self.adapter_dir = Path(adapter_dir)
        self.adapter_path = (adapter_path or str(self.adapter_dir)).rstrip("/")
        self.capacity = capacity
        self._entries: OrderedDict[str, Registered] = OrderedDict()  # ref -> adapter, LRU first
        self._lock = threading.Lock()  # the index, for forget.py's thread
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drops: set[asyncio.Task] = set()
        # one registration or unregistration of a name at a time, so a folder is never deleted
        # under a registration that found it in place
        self._name_locks: dict[str, asyncio.Lock] = {}

    # ---- what is registered (any thread)

    def __contains__(self, ref: object) -> bool:
        entry = self._entries.get(ref)  # type: ignore[arg-type]
        return entry is not None and entry.loading is None

    def __len__(self) -> int:
        return len(self._entries)

    def loaded(self) -> list[str]:
        """Refs of registered adapters (and those registering), least recently used first."""
        with self._lock:
            return list(self._entries)

    def pinned(self) -> dict[str, int]:
        """Running chats per adapter ref, for those in use."""
        with self._lock:
            return {ref: e.pins for ref, e in self._entries.items() if e.pins}

    # ---- chats (the event loop)

    async def pin(self, ref: str) -> Registered:
        """Register the adapter unless it is, keep it registered until `unpin`; `.name` is its
        vLLM name.

        Concurrent first chats wait for one registration, a task of its own: a chat that leaves
        meanwhile doesn't stop it for the others. Raises NotFound (unknown adapter),
        FailedPrecondition (vLLM can't load it), Unavailable/TooManyRequests from vLLM.
        """
        self._loop = asyncio.get_running_loop()
        name = served_name(ref)
        with self._lock:
            entry = self._entries.get(ref)
            if entry is None:
                entry = self._entries[ref] = Registered(ref, name)
                entry.loading = self._registration(entry)
            else:
                self._entries.move_to_end(ref)
            entry.pins += 1
            loading = entry.loading
        try:
            if loading is not None:
                await asyncio.shield(loading)
        except BaseException:
            self.unpin(entry)
            raise
        self._shrink()
        return entry

    def unpin(self, entry: Registered) -> None:
        """A chat with the adapter ended; unregister what is over capacity, or the adapter if it
        was forgotten meanwhile (in the background)."""
        with self._lock:
            entry.pins -= 1
            if entry.pins > 0:
                return
            if entry.retired:
                self._drop_later(entry)
                return
        self._shrink()

    async def reload(self, entry: Registered) -> None:
        """Register a pinned adapter again (vLLM restarted and lost it); concurrent calls share one."""
        with self._lock:
            if entry.retired:
                raise Unavailable(f"adapter {entry.ref} was forgotten while in use (its bot was deleted)")
            if entry.loading is None:
                entry.loading = self._registration(entry)
            loading = entry.loading
        await asyncio.shield(loading)

    async def forget(self, ref: str) -> bool:
        """Unregister an adapter now (its bot was deleted); chats using it keep it until they end.
        False if it wasn't registered."""
        with self._lock:
            entry = self._entries.pop(ref, None)
            if entry is None:
                return False
            if entry.pins:
                entry.retired = True
                return True
        await self._drop(entry)
        return True

    def evict(self, ref: str) -> bool:
        """`forget` for a worker thread (forget.py runs `forget_session` through `rt.io`): waits
        until vLLM unregistered it. On the event loop's own thread it only schedules that."""
        loop = self._loop
        if loop is None or loop.is_closed():  # nothing was registered by this process
            with self._lock:
                return self._entries.pop(ref, None) is not None
        if _running_loop() is loop:
            with self._lock:
                present = ref in self._entries
            if present:
                self._track(loop.create_task(self.forget(ref)))
            return present
        # the unregistration has its own HTTP deadline (DOCLORA_VLLM_TIMEOUT_S)
        return asyncio.run_coroutine_threadsafe(self.forget(ref), loop).result()

    async def adopt(self, cards: Sequence[Mapping[str, Any]]) -> list[str]:
        """Take over adapters vLLM has registered from our folder (doclora restarted, vLLM didn't),
        so the capacity counts them and forgetting finds them; returns their refs."""
        self._loop = asyncio.get_running_loop()
        adopted = []
        with self._lock:
            for card in cards:
                name, root = str(card.get("id", "")), str(card.get("root") or "")
                ref = ref_of(name)
                if card.get("parent") is None or ref is None or ref in self._entries:
                    continue
                if root.rstrip("/") != f"{self.adapter_path}/{name}":
                    continue  # someone else's adapter on the same server
                self._entries[ref] = Registered(ref, name, registered=True)
                adopted.append(ref)
        self._shrink()
        return adopted

    async def settle(self) -> None:
        """Wait for the unregistrations running in the background (tests, shutdown)."""
        while self._drops:
            await asyncio.gather(*list(self._drops), return_exceptions=True)

    # ---- internals

    def _name_lock(self, name: str) -> asyncio.Lock:
        return self._name_locks.setdefault(name, asyncio.Lock())

    def _registration(self, entry: Registered) -> asyncio.Task:
        assert self._loop is not None
        task = self._loop.create_task(self._register(entry))
        # its chats get its error; retrieved here too, for when every one of them left
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
        return task

    async def _register(self, entry: Registered) -> None:
        """Copy the adapter's folder into place and register it. A first registration that fails
        leaves the index, so the next chat tries again."""
        try:
            async with self._name_lock(entry.name):
                await asyncio.to_thread(self._place, entry.ref, entry.name)
                await self._load(entry)
            entry.registered = True
        except BaseException:
            with self._lock:
                if not entry.registered and self._entries.get(entry.ref) is entry:
                    del self._entries[entry.ref]
            raise
        finally:
            entry.loading = None

    def _place(self, ref: str, name: str) -> None:
        """Blocking: `adapter_dir/name` holds the adapter (fetched, copied, renamed into place)."""
        dest = self.adapter_dir / name
        if (dest / "adapter_config.json").exists():
            return  # adapter ids are never reused for other weights: a finished copy is good
        src = self.fetch(ref)
        self.adapter_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.adapter_dir / f".{name}.{uuid.uuid4().hex[:8]}.partial"
        try:
            shutil.copytree(src, tmp)
            if dest.exists():  # a copy cut short before (no adapter_config.json)
                shutil.rmtree(dest, ignore_errors=True)
            try:
                tmp.rename(dest)
            except OSError:
                if not (dest / "adapter_config.json").exists():
                    raise  # not another replica's finished copy
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    async def _load(self, entry: Registered) -> None:
        path = f"{self.adapter_path}/{entry.name}"
        response = await self.api.post("/v1/load_lora_adapter", {"lora_name": entry.name, "lora_path": path})
        if response.is_success:
            log.info("registered adapter %s with vLLM as %s", entry.ref, entry.name)
            return
        message = error_message(_json_or_text(response))
        if response.status_code == 400:
            # "has already been loaded" (doclora restarted, vLLM didn't): check rather than parse
            if any(card.get("id") == entry.name for card in await self.api.models()):
                return
            raise FailedPrecondition(f"vLLM refused adapter {entry.ref}: {message}")
        if response.status_code == 404:
            body = _json_or_text(response)
            if isinstance(body, Mapping) and "detail" in body and "error" not in body:
                raise Unavailable(
                    f"the vLLM server at {self.api.url} has no /v1/load_lora_adapter: start it with "
                    "--enable-lora and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True"
                )
            raise FailedPrecondition(
                f"vLLM can't read adapter {entry.ref} at {path} ({message}); DOCLORA_VLLM_ADAPTER_PATH "
                "must be DOCLORA_VLLM_ADAPTER_DIR as the vLLM server sees it"
            )
        self.api.check(response, f"registering adapter {entry.ref}")

    def _shrink(self) -> None:
        """Unregister unpinned adapters, least recently used first, while over capacity."""
        with self._lock:
            for ref, entry in list(self._entries.items()):
                if len(self._entries) <= self.capacity:
                    return
                if entry.pins or entry.loading is not None:
                    continue
                del self._entries[ref]
                self._drop_later(entry)

    def _drop_later(self, entry: Registered) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        if _running_loop() is not loop:
            loop.call_soon_threadsafe(self._drop_later, entry)
            return
        self._track(loop.create_task(self._drop(entry)))

    def _track(self, task: asyncio.Task) -> None:
        self._drops.add(task)
        task.add_done_callback(self._drops.discard)

    async def _drop(self, entry: Registered) -> None:
        """Unregister from vLLM (404: it didn't have it; fine), then delete the folder. If vLLM
        can't be reached the folder stays: vLLM may still read it."""
        async with self._name_lock(entry.name):
            with self._lock:
                if self._entries.get(entry.ref) is not None:
                    return  # registered again meanwhile (a new chat): keep it
            try:
                response = await self.api.post("/v1/unload_lora_adapter", {"lora_name": entry.name})
                if response.status_code != 404:
                    self.api.check(response, f"unregistering adapter {entry.ref}")
            except DocloraError as exc:
                log.warning("could not unregister adapter %s from vLLM: %s", entry.ref, exc)
                return
            await asyncio.to_thread(shutil.rmtree, self.adapter_dir / entry.name, True)
        log.info("unregistered adapter %s from vLLM", entry.ref)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


# --------------------------------------------------------------------------- the engine


class VllmEngine:
    """Streams chat answers from a vLLM server: the base model, or a bot's LoRA adapter registered
    on demand (`adapters`). Same `astream_chat` as ChatEngine; asyncio only."""

    def __init__(self, settings: Settings, fetch: Callable[[str], Path]):
        backend_of(settings.replace(inference_backend="vllm"))
        self.settings = settings
        self.timeout_s = settings.vllm_timeout_s
        self.api = VllmApi(settings.vllm_url, settings.vllm_api_key.get_secret_value(), self.timeout_s)
        adapter_dir = Path(settings.vllm_adapter_dir or Path(settings.state_dir) / "vllm-adapters")
        self.adapters = VllmAdapters(
            self.api, fetch, adapter_dir.resolve(), settings.vllm_adapter_path, settings.vllm_max_loras
        )
        self._base = settings.vllm_model
        self._synced = False
        self._sync_lock: asyncio.Lock | None = None

    async def close(self) -> None:
        """Let background unregistrations finish, then close the HTTP client (chats still
        running fail with Unavailable)."""
        await self.adapters.settle()
        await self.api.close()

    async def forget(self, adapter_id: str) -> bool:
        """Unregister a deleted bot's adapter from vLLM and delete its folder (`VllmAdapters.forget`)."""
        return await self.adapters.forget(adapter_id)

    async def base_model(self) -> str:
        """The base model's served name: DOCLORA_VLLM_MODEL, else the first base in /v1/models."""
        await self._sync()
        return self._base

    async def astream_chat(
        self,
        messages: Sequence[Mapping[str, str]],
        adapter_id: str | None = None,
        params: GenerationParams | None = None,
        cancel: threading.Event | None = None,
        stats: ChatStats | None = None,
    ) -> AsyncIterator[str]:
        """Yield the answer's text a piece at a time, as vLLM streams it.

        Bad messages or params raise InvalidArgument before anything is sent. Closing this
        generator (or setting `cancel`) closes the HTTP stream, which vLLM takes as an abort, and
        sets `stats.finish_reason` to "cancelled".
        """
        clean, params = check_request(messages, params)
        stats = stats or ChatStats()
        base = await self.base_model()
        held = None if adapter_id is None else await self.adapters.pin(adapter_id)
        model = base if held is None else held.name
        try:
            for attempt in (1, 2):
                try:
                    # aclosing: a consumer that leaves closes the HTTP stream now, not at GC
                    async with contextlib.aclosing(
                        self._stream(_body(model, clean, params), stats, cancel)
                    ) as s:
                        async for piece in s:
                            yield piece
                    return
                except _UnknownModel:
                    if adapter_id is None:
                        raise Unavailable(
                            f"the vLLM server at {self.api.url} does not serve {model!r} (DOCLORA_VLLM_MODEL)"
                        ) from None
                    if attempt == 2:
                        raise Unavailable(
                            f"vLLM lost adapter {adapter_id} again after registering it"
                        ) from None
                    log.info("vLLM no longer knows adapter %s (restarted?): registering it again", adapter_id)
                    await self.adapters.reload(held)
        finally:
            if held is not None:
                self.adapters.unpin(held)

    # ---- internals

    async def _sync(self) -> None:
        """Once: learn the base model's name and adopt the adapters vLLM already has from us."""
        if self._synced:
            return
        if self._sync_lock is None:
            self._sync_lock = asyncio.Lock()
        async with self._sync_lock:
            if self._synced:
                return
            cards = await self.api.models()
            if not self._base:
                bases = [c for c in cards if c.get("parent") is None]
                if not bases:
                    raise Unavailable(f"the vLLM server at {self.api.url} lists no base model")
                self._base = str(bases[0]["id"])
            adopted = await self.adapters.adopt(cards)
            if adopted:
                log.info("vLLM already has %d of doclora's adapters: keeping them", len(adopted))
            self._synced = True

    async def _stream(self, body: dict[str, Any], stats: ChatStats, cancel: threading.Event | None):
        deadline = time.monotonic() + self.timeout_s
        finished = False
        try:
            async with self.api.stream("/v1/chat/completions", body) as response:
                if not response.is_success:
                    await response.aread()
                    if response.status_code == 404:
                        raise _UnknownModel()
                    self.api.check(response, "answering")
                pieces = 0
                try:
                    async for line in response.aiter_lines():
                        if cancel is not None and cancel.is_set():
                            stats.finish_reason = "cancelled"
                            finished = True
                            return
                        if time.monotonic() > deadline:
                            raise Unavailable(f"vLLM's answer took longer than {self.timeout_s:g}s")
                        event = _event(line)
                        if event is None:
                            continue
                        if event == "[DONE]":
                            finished = True
                            break
                        for text in _take(event, stats):
                            pieces += 1
                            yield text
                except httpx.TransportError as exc:
                    raise self.api.unreachable(exc) from exc
                if not finished:
                    raise Unavailable(f"the vLLM server at {self.api.url} ended the answer early")
                if not stats.completion_tokens:
                    stats.completion_tokens = pieces  # a server without usage: one token a piece
                stats.finish_reason = stats.finish_reason or "stop"
        except (GeneratorExit, asyncio.CancelledError):
            stats.finish_reason = "cancelled"
            raise


def _body(model: str, messages: list[dict[str, str]], params: GenerationParams) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "messages": messages,
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": params.max_new_tokens,
        "temperature": params.temperature,
        "top_p": params.top_p,
    }
    if params.stop:
        body["stop"] = list(params.stop)
    if params.seed is not None:
        body["seed"] = params.seed
    if messages and messages[-1]["role"] == "assistant":  # the reply starts with it (vLLM's extension)
        body.update(add_generation_prompt=False, continue_final_message=True)
    return body


def _event(line: str) -> dict[str, Any] | str | None:
    """One SSE line: the chunk's JSON, "[DONE]", or None for blank lines and comments."""
    if not line.startswith("data:"):
        return None
    data = line[5:].strip()
    if data == "[DONE]":
        return data
    try:
        event = json.loads(data)
    except ValueError as exc:
        raise Unavailable(f"vLLM sent a stream event that is not JSON: {data[:200]!r}") from exc
    return event if isinstance(event, dict) else None


def _take(event: dict[str, Any], stats: ChatStats) -> list[str]:
    """The text of one chunk, its finish reason and usage into `stats`; an error event raises."""
    if "error" in event or event.get("object") == "error":
        code = (
            (event.get("error") or {}).get("code")
            if isinstance(event.get("error"), dict)
            else event.get("code")
        )
        message = error_message(event)
        if code == 400:
            raise InvalidArgument(message)
        raise Unavailable(f"vLLM failed while answering: {message}")
    texts = []
    for choice in event.get("choices") or []:
        if choice.get("index", 0) != 0:
            continue
        content = (choice.get("delta") or {}).get("content")
        if content:
            texts.append(content)
        reason = choice.get("finish_reason")
        if reason:
            stats.finish_reason = "length" if reason == "length" else "stop"
    usage = event.get("usage")
    if isinstance(usage, dict):
        stats.prompt_tokens = int(usage.get("prompt_tokens") or 0)
        stats.completion_tokens = int(usage.get("completion_tokens") or 0)
    return texts
