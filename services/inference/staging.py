"""Loading adapters off the model lock: the slow part of a cold load, on a loader thread.

A cold load has a slow part and a quick one. `Stager.start` runs the slow part on a loader thread,
outside the model lock: download (`fetch`), reading the weights, and PEFT's injection of the LoRA
layers into a meta skeleton of the base (`prepare`, peft_slots.py), which for a 30-layer model is
about a second of Python. The result is a `Staged` adapter; `AdapterCache.pin` then does the quick
part under the model lock (peft_slots.py moves the prepared LoRA modules into the live model).

Loads in flight, or done and not yet attached, are kept by adapter id under the stager's own lock,
never the model lock, so a request can ask whether its adapter is ready while a forward runs. A
finished load calls `on_staged` (the scheduler wakes to pin it).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.common import omp

log = logging.getLogger(__name__)


@dataclass
class Staged:
    """An adapter read and prepared off the model lock, waiting for `pin` to attach it."""

    adapter_id: str
    folder: Path
    name: str  # the PEFT adapter name it gets
    config: Any = None  # its LoraConfig, when `layers` is set
    # module path -> LoRA layer of a meta skeleton holding this adapter's modules with their weights;
    # None: it loads through PEFT (under the lock)
    layers: dict[str, Any] | None = None
    nbytes: int = 0  # bytes of its tensors


class Stager:
    """Background loads of adapters, by adapter id.

    `fetch(adapter_id) -> folder` finds an adapter's PEFT folder (it may download; it raises NotFound
    for an unknown id). `prepare(staged)` fills in `staged.layers` when the adapter can be moved into
    the live model quickly, and leaves them None otherwise (it may raise: the adapter then loads
    through PEFT, which says what is wrong).
    """

    def __init__(self, fetch: Callable[[str], Path], prepare: Callable[[Staged], None]):
        self.fetch = fetch
        self._prepare = prepare
        # loads in flight or done and not yet attached, by adapter id
        self._loads: dict[str, Future[Staged]] = {}
        self._loader: ThreadPoolExecutor | None = None
        self.on_staged: Callable[[], None] | None = None  # called when a load finishes (the scheduler wakes)
        self._serial = itertools.count()
        self._loads_lock = threading.Lock()

    def new(self, adapter_id: str, folder: Path) -> Staged:
        """A Staged adapter with a fresh PEFT name, not prepared yet."""
        # PEFT adapter names become module keys, so they can't be user ids (dots are not allowed there)
        return Staged(adapter_id, folder, f"adapter_{next(self._serial)}")

    def start(self, adapter_id: str) -> Future[Staged]:
        """Start loading an adapter on the loader thread unless it is on its way; returns its load."""
        with self._loads_lock:
            future = self._loads.get(adapter_id)
            if future is None:
                if self._loader is None:
                    self._loader = ThreadPoolExecutor(1, thread_name_prefix="doclora-adapter-load")
                future = self._loader.submit(self._stage, adapter_id)
                self._loads[adapter_id] = future
                future.add_done_callback(self._loaded)
            return future

    def ready(self, adapter_id: str, future: Future[Staged] | None) -> Staged | None:
        """The finished load `future` of an adapter; None while it runs (or for no load).

        A failed load raises its error and is forgotten, so a later request tries again.
        """
        if future is None or not future.done():
            return None
        if future.exception() is not None:
            with self._loads_lock:
                if self._loads.get(adapter_id) is future:
                    del self._loads[adapter_id]
            raise future.exception()
        return future.result()

    def now(self, adapter_id: str, folder: Path | None) -> Staged:
        """Fetch (unless `folder` is given) and prepare an adapter on the calling thread."""
        folder = folder if folder is not None else Path(self.fetch(adapter_id))
        staged = self.new(adapter_id, folder)
        with contextlib.suppress(Exception):
            self._prepare(staged)
        return staged

    def attached(self, adapter_id: str) -> None:
        """Forget the adapter's finished load once it is in the model."""
        with self._loads_lock:
            future = self._loads.get(adapter_id)
            if future is not None and future.done():
                del self._loads[adapter_id]

    def forget(self, keep: set[str]) -> None:
        """Drop finished loads of adapters not in `keep`."""
        with self._loads_lock:
            for adapter_id in [a for a, f in self._loads.items() if f.done() and a not in keep]:
                del self._loads[adapter_id]

    def shutdown(self) -> None:
        """Stop the loader thread (waiting for a load running on it) and forget every load."""
        loader, self._loader = self._loader, None
        if loader is not None:
            loader.shutdown(wait=True, cancel_futures=True)
        with self._loads_lock:
            self._loads.clear()

    def _loaded(self, _future: Future) -> None:
        callback = self.on_staged
        if callback is not None:
            callback()

    def _stage(self, adapter_id: str) -> Staged:
        """Loader thread: download, read and prepare an adapter without touching the live model."""
        staged = self.new(adapter_id, Path(self.fetch(adapter_id)))
        started = time.perf_counter()
        try:
            self._prepare(staged)
        except Exception as exc:  # a misfit and the like: PEFT's own load says what is wrong, at pin
            log.info("adapter %s loads through PEFT: %s", adapter_id, exc)
            staged.layers = None
        finally:  # this thread lives on between loads; its OpenMP workers would slow the scheduler's
            omp.release_threads()
        log.info(
            "prepared adapter %s in %.2fs%s", adapter_id, time.perf_counter() - started,
            "" if staged.layers is not None else " (to load through PEFT)",
        )  # fmt: skip
        return staged
