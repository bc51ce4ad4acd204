"""LoRA adapters on one shared base model: an LRU bounded by count and by bytes, with pins for
running requests, and loads that don't stall the chats already running.

Adapters are added to a single PEFT model by name and run side by side: `run(names, ...)` applies
each row's own adapter (or none, for "__base__"), through lora_rows.py's lean layers or PEFT's
per-adapter forwards (mixed_forward.py), so switching adapters costs nothing and one batch can mix
them. Changing the model's modules happens under `lock`, which every forward holds too.

A cold load has a slow part and a quick one. `prefetch` runs the slow part on a loader thread,
outside the lock (staging.py): download (`fetch`), reading the weights, and PEFT's injection of the
LoRA layers into a meta skeleton of the base. `pin` then does the quick part under the lock: it
moves those LoRA modules into the live model's LoRA layers (peft_slots.py), a few dictionary writes
per layer. Adapters that can't go that way load through PEFT under the lock, stalling the running
chats for the load.

This module holds the cache policy: which adapters are loaded, least recently used first, what is
pinned, and what to evict. An adapter in use by a running request is pinned and never evicted: when
the pinned adapters leave no room (slots or bytes), a request for another adapter waits (`can_pin`
says no) instead of overflowing the cache. Each pin counts as a hit (loaded already) or a miss, and
each eviction is counted (services/common/metrics.py).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch

from services.common import metrics
from services.inference import fastpath, lora_rows
from services.inference.mixed_forward import MixedForward
from services.inference.peft_slots import PeftSlots
from services.inference.staging import Staged, Stager

__all__ = ["BASE", "AdapterCache", "Staged"]

log = logging.getLogger(__name__)

BASE = lora_rows.BASE  # PEFT's adapter name for "no adapter" in a mixed batch


class AdapterCache:
    """LRU of LoRA adapters attached to one shared base model, bounded by count and bytes.

    `fetch(adapter_id) -> folder` finds an adapter's PEFT folder (the service downloads it from the
    object store); it raises NotFound for an unknown id. It runs on the loader thread (`prefetch`),
    never under the model lock, so a slow download doesn't stall other chats.
    `max_bytes` bounds the bytes of the loaded adapters' tensors (0: no bound); the cache may go over
    it only while pinned adapters alone need more.
    """

    def __init__(self, fetch: Callable[[str], Path], capacity: int = 8, max_bytes: int = 0):
        if capacity < 1:
            raise ValueError("adapter cache capacity must be at least 1")
        if max_bytes < 0:
            raise ValueError("adapter cache max_bytes must be >= 0 (0: no bound)")
        self.capacity = capacity
        self.max_bytes = max_bytes
        self._names: OrderedDict[str, str] = OrderedDict()  # adapter id -> PEFT adapter name, LRU first
        self._pins: Counter[str] = Counter()  # PEFT name -> running requests using it
        self._retired: set[str] = set()  # evicted by id while pinned: deleted at the last unpin
        self._slots = PeftSlots()  # the model and the adapters in it (changed under `lock`)
        self._mixed = MixedForward(self._slots)  # forwards over batches mixing adapters (under `lock`)
        self._staging = Stager(fetch, self._slots.prepare)  # loads off the lock (its own lock)
        # Held while the shared model runs or changes: forwards and adapter loading exclude each other.
        self.lock = threading.Lock()

    def attach(self, model: torch.nn.Module) -> None:
        """Bind the cache to its base model (once; the engine does this)."""
        base = self._slots.attach(model)
        self._mixed.step = fastpath.DecodeStep.of(base)

    def detach(self) -> torch.nn.Module | None:
        """Take every adapter out of the model and unbind from it; returns the bare base model.

        Nothing may be running (the engine calls this from `close`, after stopping its scheduler).
        """
        self._staging.shutdown()
        with self.lock:
            base = self._slots.unload()
            self._names.clear()
            self._pins.clear()
            self._retired.clear()
            self._mixed.step = None
            return base

    # ---- what is loaded

    def __contains__(self, adapter_id: object) -> bool:
        return adapter_id in self._names

    def __len__(self) -> int:
        return len(self._names)

    def loaded(self) -> list[str]:
        """Ids of loaded adapters, least recently used first."""
        return list(self._names)

    def nbytes(self, adapter_id: str | None = None) -> int:
        """Bytes of the tensors of one loaded adapter, or of all adapters in the model."""
        if adapter_id is None:
            return self._held_bytes()
        name = self._names.get(adapter_id)
        return self._slots.sizes.get(name, 0) if name is not None else 0

    def pinned(self) -> dict[str, int]:
        """Running requests per loaded adapter id, for those in use."""
        return {aid: self._pins[name] for aid, name in self._names.items() if self._pins[name]}

    # ---- the model a forward runs

    @property
    def row_exact(self) -> bool:
        """Whether LoRA terms of a decode step are computed row by row (lora_rows.PlanHolder.row_exact)."""
        return self._slots.holder.row_exact

    @row_exact.setter
    def row_exact(self, value: bool) -> None:
        self._slots.holder.row_exact = value

    @property
    def fast_decode(self) -> bool:
        """Whether decode steps use the lean decode forward where the model has one (False: the
        model's own forward, e.g. to compare)."""
        return self._mixed.fast_decode

    @fast_decode.setter
    def fast_decode(self, value: bool) -> None:
        self._mixed.fast_decode = value

    def forward_model(self) -> torch.nn.Module:
        """The module to call: the PEFT model once an adapter was loaded, else the bare base."""
        return self._slots.model()

    def run(self, names: list[str], input_ids: torch.Tensor, cache: Any, **inputs: Any) -> torch.Tensor:
        """Logits of one forward over a batch whose row i uses adapter `names[i]` ("__base__": none).

        `cache` is the step's `kv.BatchKV`; `inputs` the other forward arguments, row-aligned.
        With only vanilla LoRA adapters loaded the batch runs once through lora_rows.py's lean layers.
        PEFT can't mix other kinds (DoRA, say) in one batch, so while one is loaded the batch runs
        as one forward per adapter, each the way PEFT runs that adapter alone.
        """
        with self.lock:
            return self._mixed.run(names, input_ids, cache, inputs)

    def fuse_int8(self) -> int:
        """Fuse the int8 projections that share an input, for the lean decode step (if any)."""
        return self._mixed.fuse_int8()

    def pack(self) -> int:
        """Give the lean step oneDNN-packed fp32 weights (packed.py); returns the bytes packed (0: none)."""
        with self.lock:
            return self._mixed.step.pack() if self._mixed.step is not None else 0

    # ---- loading off the lock

    @property
    def on_staged(self) -> Callable[[], None] | None:
        """Called when a load finishes (the scheduler wakes), on the loader thread."""
        return self._staging.on_staged

    @on_staged.setter
    def on_staged(self, callback: Callable[[], None] | None) -> None:
        self._staging.on_staged = callback

    def prefetch(self, adapter_id: str | None) -> Future[Staged] | None:
        """Start loading an adapter on the loader thread unless it is loaded or on its way.

        Returns its load (a future Staged), or None when there is nothing to load.
        """
        if adapter_id is None or adapter_id in self._names:
            return None
        return self._staging.start(adapter_id)

    def staged(self, adapter_id: str) -> Staged | None:
        """The adapter, loaded off the lock and ready to `pin`; None while its load is running.

        Starts the load if needed. A failed load raises its error (NotFound, FailedPrecondition) and
        is forgotten, so a later request tries again.
        """
        return self._staging.ready(adapter_id, self.prefetch(adapter_id))

    def forget_staged(self, keep: set[str]) -> None:
        """Drop finished loads that no request waits for any more (their requests were cancelled)."""
        self._staging.forget(keep)

    # ---- requests

    def can_pin(self, adapter_id: str | None, nbytes: int = 0) -> bool:
        """Whether `pin` would succeed now without going over capacity or `max_bytes` (for an
        adapter of `nbytes`, when known): unpinned adapters make room by being evicted."""
        if adapter_id is None or adapter_id in self._names:
            return True
        with self.lock:
            slot = self._occupied() < self.capacity or any(not self._pins[n] for n in self._names.values())
            if not slot or not self.max_bytes:
                return slot
            sizes = self._slots.sizes
            held = [n for n in sizes if self._pins[n] or n in self._retired]
            # an adapter larger than the whole budget still loads when nothing else is held
            return not held or sum(sizes[n] for n in held) + nbytes <= self.max_bytes

    def pin(self, adapter_id: str | None, staged: Staged | Path | None = None) -> str:
        """Load the adapter if needed and keep it loaded until `unpin`; return its PEFT name.

        `staged` comes from `staged()` (quick); a folder, or nothing, loads it here, all of it
        under the lock. None (the base model alone) gives "__base__". Raises FailedPrecondition when
        the adapter doesn't fit the base, NotFound from `fetch` for an unknown one.
        """
        if adapter_id is None:
            return BASE
        if adapter_id not in self._names and not isinstance(staged, Staged):
            staged = self._staging.now(adapter_id, staged)
        with self.lock:
            name = self._load_locked(adapter_id, staged)
            self._pins[name] += 1
        self._staging.attached(adapter_id)
        return name

    def unpin(self, name: str) -> None:
        if name == BASE:
            return
        with self.lock:
            self._pins[name] -= 1
            if self._pins[name] > 0:
                return
            del self._pins[name]
            if name in self._retired:
                self._retired.discard(name)
                self._slots.delete(name)
            else:
                self._shrink()

    def evict(self, adapter_id: str) -> bool:
        """Unload an adapter now (e.g. its bot was deleted); False if it wasn't loaded.

        An adapter that running requests use leaves the index at once (new requests fetch it again)
        and the model when the last of them ends.
        """
        with self.lock:
            name = self._names.pop(adapter_id, None)
            if name is None:
                return False
            if self._pins[name]:
                self._retired.add(name)
            else:
                self._slots.delete(name)
            return True

    # ---- internals (under lock)

    def _occupied(self) -> int:
        return len(self._names) + len(self._retired)

    def _held_bytes(self) -> int:
        return sum(self._slots.sizes.values())

    def _load_locked(self, adapter_id: str, staged: Staged | None) -> str:
        name = self._names.get(adapter_id)
        if name is not None:
            metrics.ADAPTER_CACHE.labels(result="hit").inc()
            self._names.move_to_end(adapter_id)
            return name
        metrics.ADAPTER_CACHE.labels(result="miss").inc()
        assert staged is not None
        name = staged.name
        started = time.perf_counter()
        quick = self._slots.load(staged)
        self._names[adapter_id] = name
        log.info(
            "attached adapter %s as %s in %.3fs (%s)", adapter_id, name, time.perf_counter() - started,
            "prepared off the lock" if quick else "through PEFT, under the lock",
        )  # fmt: skip
        self._slots.drop_orphan()
        # load first, then evict: the cache never drops to zero adapters, which PEFT handles poorly
        self._shrink(keep=name)
        return name

    def _shrink(self, keep: str | None = None) -> None:
        """Evict unpinned adapters, least recently used first, while over capacity or `max_bytes`."""
        for old_id, old_name in list(self._names.items()):
            over_bytes = self.max_bytes and self._held_bytes() > self.max_bytes
            if self._occupied() <= self.capacity and not over_bytes:
                return
            if old_name == keep or self._pins[old_name]:
                continue
            del self._names[old_id]
            self._slots.delete(old_name)
            metrics.ADAPTER_EVICTIONS.inc()
            log.info("evicted adapter %s", old_id)
