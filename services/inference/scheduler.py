"""Continuous batching: one thread runs every chat on the shared model, one forward per step.

Requests wait in a bounded queue (full: TooManyRequests at once, not a pile-up, with the seconds
until the queue has drained into the batch at the pace requests have been leaving it). Between steps
the scheduler drops cancelled requests, admits waiting ones up to `max_batch` (pinning their
adapters), runs one prefill chunk of a newcomer, then one decode step for all running requests
together, whatever their adapters (`AdapterCache.run` gives each row its own). A request whose
adapter isn't loaded waits in the queue while the adapter cache's loader thread fetches and prepares
it, and joins at the first step after; requests behind it go ahead meanwhile.
Each request keeps its own KV cache (`kv.RequestKV`), so joining and leaving never touch the other
rows, and every request computes what it would alone.

Text is made here too (detokenizing, stop strings), so a stop string ends a request on the very
token that completes it; the consumer gets ("piece", text) items and one ("done", None) or
("error", exc) through the `post` callable of its request.
"""

from __future__ import annotations

import collections
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from services.common.errors import TooManyRequests, Unavailable
from services.inference import kv
from services.inference.adapters import AdapterCache
from services.inference.text import IncrementalDecoder, StopScanner

if TYPE_CHECKING:
    from services.inference.engine import ChatStats, GenerationParams

log = logging.getLogger(__name__)

PIECE, ERROR, DONE = "piece", "error", "done"
# A full queue's Retry-After, in seconds: how long the waiting requests take to move into the batch
# (each batch place frees after the recent average time a request held one), between these bounds;
# before any request has finished, the lower one.
RETRY_AFTER_S = (1, 60)
# Weight of the latest finished request in that average (an exponential moving average).
HOLD_WEIGHT = 0.2


@dataclass(eq=False)
class Request:
    """One chat as the scheduler sees it; the requester fills in the prompt before `ready`."""

    adapter_id: str | None
    params: GenerationParams
    stats: ChatStats
    post: Callable[[tuple[str, Any]], None]
    cancel: Callable[[], bool] = lambda: False
    prompt: list[int] = field(default_factory=list)
    gone: bool = False  # the consumer left: stop as if cancelled
    # the scheduler's state
    name: str | None = None
    cache: kv.RequestKV | None = None
    prefilled: int = 0
    next_token: int = -1
    rng: torch.Generator | None = None
    detok: IncrementalDecoder | None = None
    stops: StopScanner | None = None
    finished: bool = False
    started: float = 0.0  # time.monotonic() when it got its place in the batch

    def cancelled(self) -> bool:
        return self.gone or self.cancel()


class Scheduler:
    """Runs requests on `adapters`' model in batches of up to `max_batch`, `max_queue` waiting."""

    def __init__(
        self,
        adapters: AdapterCache,
        tokenizer: Any,
        eos_ids: frozenset[int],
        device: torch.device,
        *,
        max_batch: int = 8,
        max_queue: int = 64,
        prefill_chunk: int = 512,
    ):
        if max_batch < 1 or max_queue < 1 or prefill_chunk < 1:
            raise ValueError("max_batch, max_queue and prefill_chunk must be at least 1")
        self.adapters = adapters
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.device = device
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.prefill_chunk = prefill_chunk
        self._cond = threading.Condition()
        self._reserved = 0  # requests counted in the queue while their requester prepares them
        self._ready: collections.deque[Request] = collections.deque()
        self._prefilling: list[Request] = []
        self._running: list[Request] = []
        self._thread: threading.Thread | None = None
        self._closed = False
        self._wakeups = 0  # bumped by anything the loop may be waiting for
        adapters.on_staged = self.wake
        self.steps = 0  # decode steps run, for tests and metrics
        self.max_rows_seen = 0
        self.hold_s = 0.0  # average seconds a request held its place in the batch (0: none yet)

    # ---- requester side (any thread)

    def reserve(self) -> None:
        """Count a new request in the queue, or raise TooManyRequests (with the seconds to wait)
        when the queue is full. The batch's free places count as queue places: a burst of chats
        that arrive before the loop has moved the first ones into the batch still fills the batch
        (`max_batch + max_queue` places in all), not only the queue."""
        with self._cond:
            if self._closed:
                raise Unavailable("the chat engine is shut down")
            waiting = self._reserved + len(self._ready)
            room = self._room()
            if waiting >= self.max_queue + room:
                raise TooManyRequests(
                    f"too many chats waiting ({self.max_queue}); try again shortly",
                    retry_after_s=self.retry_after_s(waiting - room),
                )
            self._reserved += 1

    def _room(self) -> int:
        """Free places of the batch: those not held by a request prefilling or decoding that has
        not finished (what `_admit` fills, and what `reserve` counts as queue places)."""
        return max(0, self.max_batch - sum(not r.finished for r in (*self._prefilling, *self._running)))

    def retry_after_s(self, waiting: int) -> int:
        """Seconds until `waiting` requests have moved into the batch, at the pace of the recent
        ones (`max_batch` places, each held `hold_s` on average), within RETRY_AFTER_S."""
        low, high = RETRY_AFTER_S
        return min(high, max(low, math.ceil(self.hold_s * waiting / self.max_batch)))

    def unreserve(self) -> None:
        """Give back a reservation whose request will never be submitted (preparing it failed)."""
        with self._cond:
            self._reserved -= 1

    def submit(self, req: Request) -> None:
        """Queue a prepared request (turning its reservation into a queue place)."""
        with self._cond:
            self._reserved -= 1
            if self._closed:
                self._finish(req, None, Unavailable("the chat engine is shut down"))
                return
            self._ready.append(req)
            self._wakeups += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="doclora-scheduler", daemon=True)
                self._thread.start()
            self._cond.notify()

    def wake(self) -> None:
        """Have the loop look again now (a consumer left, an adapter finished loading)."""
        with self._cond:
            self._wakeups += 1
            self._cond.notify()

    def alive(self) -> bool:
        return self._thread is None or self._thread.is_alive()

    def counts(self) -> dict[str, int]:
        """How many requests are preparing, queued, prefilling and decoding."""
        with self._cond:
            return {
                "reserved": self._reserved,
                "queued": len(self._ready),
                "prefilling": sum(not r.finished for r in self._prefilling),
                "running": sum(not r.finished for r in self._running),
            }

    def close(self, timeout: float = 10.0) -> None:
        """Stop the loop; requests still queued or running end with Unavailable."""
        with self._cond:
            self._closed = True
            self._cond.notify()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    # ---- the loop (scheduler thread)

    def _run(self) -> None:
        try:
            with torch.inference_mode():
                self._loop()
        finally:  # closed, or died of a bug: nobody may be left waiting for an item
            with self._cond:
                self._closed = True
                waiting = list(self._ready)
                self._ready.clear()
            for req in waiting + self._prefilling + self._running:
                self._finish(req, None, Unavailable("the chat engine is shut down"))
            self._prefilling, self._running = [], []

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._closed and not self._has_work():
                    self._cond.wait()
                if self._closed:
                    return
                seen = self._wakeups
            try:
                busy = self._step()
            except Exception as exc:  # a bug or an OOM: fail the batch, keep serving
                log.exception("chat batch failed")
                for req in self._prefilling + self._running:
                    self._finish(req, None, exc)
                self._prefilling, self._running = [], []
                busy = True
            if not busy:  # only requests whose adapters are loading: sleep until something changes
                with self._cond:
                    if self._wakeups == seen and not self._closed:
                        self._cond.wait(timeout=1.0)

    def _has_work(self) -> bool:
        return bool(self._running or self._prefilling or self._ready)

    def _step(self) -> bool:
        """One round of the loop; False when there was nothing it could do."""
        self._reap()
        busy = self._admit()
        if self._prefilling:
            self._prefill(self._prefilling[0])
            busy = True
        if self._running:
            self._decode(self._running)
            busy = True
        return busy

    def _reap(self) -> None:
        """Drop cancelled requests wherever they are."""
        for group in (self._prefilling, self._running):
            for req in [r for r in group if r.cancelled()]:
                self._finish(req, "cancelled")
        self._prefilling = [r for r in self._prefilling if not r.finished]
        self._running = [r for r in self._running if not r.finished]
        with self._cond:
            gone = [r for r in self._ready if r.cancelled()]
            for req in gone:
                self._ready.remove(req)
        for req in gone:
            self._finish(req, "cancelled")

    def _admit(self) -> bool:
        """Move waiting requests into the batch, first come first served, while there is room.

        A request whose adapter is still loading (off this thread) is passed over until it is
        ready; one that waits for an adapter slot holds back those behind it, so it isn't passed
        forever. Returns whether any request was admitted or failed.
        """
        with self._cond:
            waiting = list(self._ready)
        # the next few requests' adapters load in the background while they wait
        cold = [r.adapter_id for r in waiting[: self.max_batch] if r.adapter_id not in self.adapters]
        for adapter_id in dict.fromkeys(a for a in cold if a is not None):
            self.adapters.prefetch(adapter_id)
        room = self._room()
        busy = False
        failed: dict[str, BaseException] = {}
        for req in waiting:
            if room <= 0:
                break
            adapter_id, staged = req.adapter_id, None
            if adapter_id is not None and adapter_id not in self.adapters:
                error = failed.get(adapter_id)
                if error is None:
                    try:
                        staged = self.adapters.staged(adapter_id)
                    except Exception as exc:  # NotFound and the like: every request for it fails
                        error = failed[adapter_id] = exc
                if error is not None:
                    self._dequeue(req)
                    self._finish(req, None, error)
                    busy = True
                    continue
                if staged is None:
                    continue  # still loading
            if not self.adapters.can_pin(adapter_id, staged.nbytes if staged is not None else 0):
                break
            self._dequeue(req)
            busy = True
            try:
                req.name = self.adapters.pin(adapter_id, staged)
            except Exception as exc:
                self._finish(req, None, exc)
                continue
            room -= 1
            self._start(req)
        self.adapters.forget_staged(set(cold))
        return busy

    def _dequeue(self, req: Request) -> None:
        with self._cond:
            self._ready.remove(req)

    def _start(self, req: Request) -> None:
        """Give an admitted request its cache, sampler and text state; it prefills next."""
        params = req.params
        req.cache = kv.RequestKV(len(req.prompt) + params.max_new_tokens)
        req.rng = torch.Generator(device=self.device)
        if params.seed is None:
            req.rng.seed()  # a fresh Generator has a fixed default seed; unseeded requests must differ
        else:
            req.rng.manual_seed(params.seed)
        req.detok = IncrementalDecoder(self.tokenizer)
        req.stops = StopScanner(params.stop)
        req.stats.finish_reason = None
        req.started = time.monotonic()
        self._prefilling.append(req)

    def _prefill(self, req: Request) -> None:
        """Run the next chunk of a newcomer's prompt; after the last one it picks its first token."""
        start = req.prefilled
        chunk = req.prompt[start : start + self.prefill_chunk]
        logits = self._forward([req], [chunk], [list(range(start, start + len(chunk)))])
        req.prefilled += len(chunk)
        if req.prefilled < len(req.prompt):
            return
        self._prefilling.remove(req)
        self._take(req, logits[0])
        if not req.finished:
            self._running.append(req)

    def _decode(self, rows: list[Request]) -> None:
        rows = sorted(rows, key=lambda r: r.name)  # each adapter's rows together: lora_rows.py slices them
        logits = self._forward(rows, [[r.next_token] for r in rows], [[r.cache.length] for r in rows])
        self.steps += 1
        self.max_rows_seen = max(self.max_rows_seen, len(rows))
        greedy = None
        if any(r.params.temperature == 0 for r in rows):
            greedy = logits.argmax(dim=-1).tolist()  # one call for the whole batch
        for i, req in enumerate(rows):
            self._take(
                req, logits[i], greedy[i] if greedy is not None and req.params.temperature == 0 else None
            )
        self._running = [r for r in self._running if not r.finished]

    def _forward(self, rows: list[Request], ids: list[list[int]], positions: list[list[int]]) -> torch.Tensor:
        batch = kv.BatchKV([r.cache for r in rows])
        logits = self.adapters.run(
            [r.name for r in rows],
            input_ids=torch.tensor(ids, device=self.device),
            position_ids=torch.tensor(positions, device=self.device),
            cache=batch,
            use_cache=True,
            logits_to_keep=1,
        )
        batch.advance(len(ids[0]))
        return logits[:, -1]

    def _take(self, req: Request, logits: torch.Tensor, token: int | None = None) -> None:
        """Pick the request's next token from its logits and stream what it adds."""
        if token is None:
            token = pick(logits, req.params, req.rng)
        stats = req.stats
        if token in self.eos_ids:
            self._finish(req, "stop")
            return
        stats.completion_tokens += 1
        text, hit = req.stops.push(req.detok.push(token))
        if text:
            req.post((PIECE, text))
        if hit:
            self._finish(req, "stop", flush=False)
        elif stats.completion_tokens >= req.params.max_new_tokens:
            self._finish(req, "length")
        else:
            req.next_token = token

    def _finish(
        self, req: Request, reason: str | None, error: BaseException | None = None, *, flush: bool = True
    ) -> None:
        """End a request: release its adapter and cache, tell its consumer."""
        if req.finished:
            return
        req.finished = True
        if reason in ("stop", "length") and flush and req.detok is not None:
            text, hit = req.stops.push(req.detok.flush())
            if not hit:
                text += req.stops.flush()
            if text:
                req.post((PIECE, text))
        if reason is not None:
            req.stats.finish_reason = reason
        if req.name is not None:
            name, req.name = req.name, None
            try:
                self.adapters.unpin(name)
            except Exception:  # never leave the consumer hanging over a cache bookkeeping error
                log.exception("unpinning adapter %s failed", name)
        req.cache = None
        if req.started:  # it held a place in the batch: how long, for a full queue's Retry-After
            held = time.monotonic() - req.started
            self.hold_s = held if not self.hold_s else self.hold_s + HOLD_WEIGHT * (held - self.hold_s)
        req.post((ERROR, error) if error is not None else (DONE, None))


def pick(logits: torch.Tensor, params: GenerationParams, rng: torch.Generator) -> int:
    """The next token: argmax at temperature 0, else a sample (nucleus when top_p < 1)."""
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
