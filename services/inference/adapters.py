"""LoRA adapters on one shared base model: an LRU bounded by count, with pins for running requests.

Adapters are added to a single PEFT model by name and run side by side: `run(names, ...)` applies
each row's own adapter (or none, for "__base__"), through lora.py's lean layers or PEFT's
`adapter_names=` mixed batches, so switching adapters costs nothing and one batch can mix them.
Loading and deleting change the model's modules, so they happen under `lock`, which every forward
holds too.

An adapter in use by a running request is pinned and never evicted: when every slot is pinned, a
request for another adapter waits for a slot (`can_pin` says no) instead of overflowing the cache.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from services.common.errors import FailedPrecondition
from services.inference import lora

log = logging.getLogger(__name__)

BASE = lora.BASE  # PEFT's adapter name for "no adapter" in a mixed batch


class AdapterCache:
    """LRU of LoRA adapters attached to one shared base model, bounded by count.

    `fetch(adapter_id) -> folder` finds an adapter's PEFT folder (the service downloads it from the
    object store); it raises NotFound for an unknown id. It is called outside the model lock (by
    the requester, through `folder_for`), so a slow download does not stall other chats; concurrent
    calls for one id must be safe.
    """

    def __init__(self, fetch: Callable[[str], Path], capacity: int = 8):
        if capacity < 1:
            raise ValueError("adapter cache capacity must be at least 1")
        self.capacity = capacity
        self._fetch = fetch
        self._names: OrderedDict[str, str] = OrderedDict()  # adapter id -> PEFT adapter name, LRU first
        self._pins: Counter[str] = Counter()  # PEFT name -> running requests using it
        self._retired: set[str] = set()  # evicted by id while pinned: deleted at the last unpin
        # PEFT breaks with zero adapters, so the last one evicted stays in the model, unreachable,
        # until the next one loads
        self._orphan: str | None = None
        self._holder = lora.PlanHolder()  # the current step's rows -> adapters, for lora.py's layers
        self._vanilla: set[str] = set()  # PEFT names of plain-LoRA adapters (lora.is_vanilla)
        self._serial = itertools.count()
        # Held while the shared model runs or changes: forwards and adapter loading exclude each other.
        self.lock = threading.Lock()
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

    def detach(self) -> torch.nn.Module | None:
        """Take every adapter out of the model and unbind from it; returns the bare base model.

        Nothing may be running (the engine calls this from `close`, after stopping its scheduler).
        """
        with self.lock:
            base = self._base
            if self._peft is not None:
                with _normal_tensors():
                    base = self._peft.unload()  # LoRA layers replaced by the layers they wrapped
                if hasattr(base, "peft_config"):
                    del base.peft_config
            self._names.clear()
            self._pins.clear()
            self._retired.clear()
            self._vanilla.clear()
            self._orphan = None
            self._peft = None
            self._base = None
            return base

    # ---- what is loaded

    def __contains__(self, adapter_id: object) -> bool:
        return adapter_id in self._names

    def __len__(self) -> int:
        return len(self._names)

    def loaded(self) -> list[str]:
        """Ids of loaded adapters, least recently used first."""
        return list(self._names)

    def pinned(self) -> dict[str, int]:
        """Running requests per loaded adapter id, for those in use."""
        return {aid: self._pins[name] for aid, name in self._names.items() if self._pins[name]}

    # ---- the model a forward runs

    @property
    def row_exact(self) -> bool:
        """Whether LoRA terms of a decode step are computed row by row (lora.PlanHolder.row_exact)."""
        return self._holder.row_exact

    @row_exact.setter
    def row_exact(self, value: bool) -> None:
        self._holder.row_exact = value

    def forward_model(self) -> torch.nn.Module:
        """The module to call: the PEFT model once an adapter was loaded, else the bare base."""
        if self._base is None:
            raise FailedPrecondition("the adapter cache has no model attached")
        return self._peft if self._peft is not None else self._base

    def run(self, names: list[str], input_ids: torch.Tensor, cache: Any, **inputs: Any) -> torch.Tensor:
        """Logits of one forward over a batch whose row i uses adapter `names[i]` ("__base__": none).

        `cache` is the step's `kv.BatchKV`; `inputs` the other forward arguments, row-aligned.
        With only vanilla LoRA adapters loaded the batch runs once through lora.py's lean layers.
        PEFT can't mix other kinds (DoRA, say) in one batch, so while one is loaded the batch runs
        as one forward per adapter, each the way PEFT runs that adapter alone.
        """
        with self.lock:
            model = self.forward_model()
            if self._peft is None:
                return model(input_ids=input_ids, cache=cache, **inputs).logits
            if set(self._peft.peft_config) <= self._vanilla:
                holder = self._holder
                holder.plan = lora.Plan.of(names, input_ids.device)
                holder.base_only = holder.plan is None
                try:
                    return model(input_ids=input_ids, cache=cache, **inputs).logits
                finally:
                    holder.plan, holder.base_only = None, False
            groups: dict[str, list[int]] = {}
            for i, name in enumerate(names):
                groups.setdefault(name, []).append(i)
            logits = None
            for name, rows in groups.items():
                idx = torch.tensor(rows, device=input_ids.device)
                part = {
                    k: v.index_select(0, idx) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()
                }
                sub = cache.select(rows)
                if name == BASE:
                    with self._peft.disable_adapter():
                        out = model(input_ids=input_ids.index_select(0, idx), cache=sub, **part).logits
                else:
                    if self._peft.active_adapter != name:
                        with _normal_tensors():
                            self._peft.set_adapter(name, inference_mode=True)
                    out = model(input_ids=input_ids.index_select(0, idx), cache=sub, **part).logits
                if logits is None:
                    logits = out.new_empty((len(names), *out.shape[1:]))
                logits.index_copy_(0, idx, out)
            return logits

    # ---- requests

    def folder_for(self, adapter_id: str | None) -> Path | None:
        """Fetch the adapter's folder unless it is loaded already (no lock: may download)."""
        if adapter_id is None or adapter_id in self._names:
            return None
        return Path(self._fetch(adapter_id))

    def can_pin(self, adapter_id: str | None) -> bool:
        """Whether `pin` would succeed now without going over capacity."""
        if adapter_id is None or adapter_id in self._names:
            return True
        return self._occupied() < self.capacity or any(not self._pins[n] for n in self._names.values())

    def pin(self, adapter_id: str | None, folder: Path | None) -> str:
        """Load the adapter if needed and keep it loaded until `unpin`; return its PEFT name.

        None (the base model alone) gives "__base__". Raises FailedPrecondition when the adapter
        doesn't fit the base, NotFound from `fetch` when it was evicted since `folder_for` and is gone.
        """
        if adapter_id is None:
            return BASE
        with self.lock:
            name = self._load_locked(adapter_id, folder)
            self._pins[name] += 1
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
                self._delete(name)
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
                self._delete(name)
            return True

    # ---- internals (under lock)

    def _occupied(self) -> int:
        return len(self._names) + len(self._retired)

    def _load_locked(self, adapter_id: str, folder: Path | None) -> str:
        name = self._names.get(adapter_id)
        if name is not None:
            self._names.move_to_end(adapter_id)
            return name
        if folder is None:  # evicted between the requester's check and now
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
        if self._orphan is not None:
            orphan, self._orphan = self._orphan, None
            self._delete(orphan)
        # load first, then evict: the cache never drops to zero adapters, which PEFT handles poorly
        self._shrink(keep=name)
        return name

    def _shrink(self, keep: str | None = None) -> None:
        """Evict unpinned adapters, least recently used first, while over capacity."""
        for old_id, old_name in list(self._names.items()):
            if self._occupied() <= self.capacity:
                return
            if old_name == keep or self._pins[old_name]:
                continue
            del self._names[old_id]
            self._delete(old_name)
            log.info("evicted adapter %s", old_id)

    def _delete(self, name: str) -> None:
        if set(self._peft.peft_config) == {name}:
            self._orphan = name
            return
        with _normal_tensors():
            self._peft.delete_adapter(name)
        self._vanilla.discard(name)

    def _add(self, folder: Path, name: str) -> None:
        from peft import PeftModel

        device = str(next(self._base.parameters()).device)
        with _normal_tensors():
            if self._peft is None:
                self._peft = PeftModel.from_pretrained(
                    self._base, str(folder), adapter_name=name, is_trainable=False, torch_device=device
                )
            else:
                self._peft.load_adapter(
                    str(folder), adapter_name=name, is_trainable=False, torch_device=device
                )
            self._peft.eval()
        lora.patch(self._peft, self._holder)
        if lora.is_vanilla(self._peft, name):
            self._vanilla.add(name)

    def _discard(self, name: str) -> None:
        """Remove what a failed load left behind, so base chat and other adapters stay exact."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        if self._peft is not None and name in self._peft.peft_config:
            with contextlib.suppress(Exception), _normal_tensors():
                self._peft.delete_adapter(name)
            return
        # a failed first load leaves layers in the base with no PeftModel to delete them through
        with _normal_tensors():
            for module in self._base.modules():
                if isinstance(module, BaseTunerLayer):
                    module.delete_adapter(name)


@contextlib.contextmanager
def _normal_tensors() -> Iterator[None]:
    """Outside inference mode, even when called from the scheduler's inference-mode thread.

    Weights made under inference mode are "inference tensors" that PEFT can't touch later (setting
    requires_grad on them raises), so adapters are loaded and deleted with the mode off.
    """
    with torch.inference_mode(False), torch.no_grad():
        yield
