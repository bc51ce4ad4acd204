"""LoRA adapters on one shared base model: an LRU bounded by count and by bytes, with pins for
running requests, and loads that don't stall the chats already running.

Adapters are added to a single PEFT model by name and run side by side: `run(names, ...)` applies
each row's own adapter (or none, for "__base__"), through lora.py's lean layers or PEFT's
`adapter_names=` mixed batches, so switching adapters costs nothing and one batch can mix them.
Changing the model's modules happens under `lock`, which every forward holds too.

A cold load has a slow part and a quick one. `prefetch` runs the slow part on a loader thread,
outside the lock: download (`fetch`), reading the weights, and PEFT's injection of the LoRA layers,
which for a 30-layer model is about a second of Python. PEFT injects into a skeleton of the base on
the meta device (no weights), so the live model is untouched; the adapter's own weights go into the
skeleton's LoRA layers. `pin` then does the quick part under the lock: it moves those LoRA modules
into the live model's LoRA layers (PEFT's own per-adapter containers, `adapter_layer_names` and
`other_param_names`, the ones its `delete_adapter` empties), a few dictionary writes per layer.
Adapters that can't go that way load through PEFT under the lock as before, stalling the running
chats for the load: the first adapter of a process (there are no LoRA layers to move into yet),
one targeting modules no loaded adapter wraps, and kinds other than plain LoRA (DoRA, ...).

An adapter in use by a running request is pinned and never evicted: when the pinned adapters leave
no room (slots or bytes), a request for another adapter waits (`can_pin` says no) instead of
overflowing the cache.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import logging
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from services.common.errors import FailedPrecondition
from services.inference import fastpath, lora

log = logging.getLogger(__name__)

BASE = lora.BASE  # PEFT's adapter name for "no adapter" in a mixed batch


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
        self._fetch = fetch
        self._names: OrderedDict[str, str] = OrderedDict()  # adapter id -> PEFT adapter name, LRU first
        self._bytes: dict[str, int] = {}  # PEFT name -> bytes of its tensors, while in the model
        self._pins: Counter[str] = Counter()  # PEFT name -> running requests using it
        self._retired: set[str] = set()  # evicted by id while pinned: deleted at the last unpin
        # loads in flight or done and not yet attached, by adapter id
        self._loads: dict[str, Future[Staged]] = {}
        self._loader: ThreadPoolExecutor | None = None
        self.on_staged: Callable[[], None] | None = None  # called when a load finishes (the scheduler wakes)
        self._live_layers: list[Any] = []  # the live model's LoRA layers (for quick deletes)
        # PEFT breaks with zero adapters, so the last one evicted stays in the model, unreachable,
        # until the next one loads
        self._orphan: str | None = None
        self._holder = lora.PlanHolder()  # the current step's rows -> adapters, for lora.py's layers
        self._vanilla: set[str] = set()  # PEFT names of plain-LoRA adapters (lora.is_vanilla)
        self._serial = itertools.count()
        # Held while the shared model runs or changes: forwards and adapter loading exclude each other.
        self.lock = threading.Lock()
        self._loads_lock = threading.Lock()
        self._base: torch.nn.Module | None = None
        self._peft: Any = None  # the PeftModel around the base, made when the first adapter loads
        self._step: fastpath.DecodeStep | None = None  # the lean decode forward, for Llama layouts
        self.fast_decode = True  # use it (False: the model's own forward, e.g. to compare)

    def attach(self, model: torch.nn.Module) -> None:
        """Bind the cache to its base model (once; the engine does this)."""
        from peft import PeftModel

        base = model.get_base_model() if isinstance(model, PeftModel) else model
        if self._base is not None and self._base is not base:
            raise ValueError("this adapter cache is already attached to another model")
        self._base = base
        self._step = fastpath.DecodeStep.of(base)
        if isinstance(model, PeftModel):
            from peft.tuners.lora.layer import LoraLayer

            self._peft = model
            self._live_layers = [m for m in model.modules() if isinstance(m, LoraLayer)]

    def detach(self) -> torch.nn.Module | None:
        """Take every adapter out of the model and unbind from it; returns the bare base model.

        Nothing may be running (the engine calls this from `close`, after stopping its scheduler).
        """
        loader, self._loader = self._loader, None
        if loader is not None:
            loader.shutdown(wait=True, cancel_futures=True)
        with self._loads_lock:
            self._loads.clear()
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
            self._bytes.clear()
            self._live_layers = []
            self._orphan = None
            self._peft = None
            self._base = None
            self._step = None
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
        return self._bytes.get(name, 0) if name is not None else 0

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
                return self._forward(model, input_ids, cache, inputs)
            if set(self._peft.peft_config) <= self._vanilla:
                holder = self._holder
                holder.plan = lora.Plan.of(names, input_ids.device)
                holder.base_only = holder.plan is None
                try:
                    return self._forward(model, input_ids, cache, inputs)
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

    def fuse_int8(self) -> int:
        """Fuse the int8 projections that share an input, for the lean decode step (if any)."""
        return self._step.fuse_int8() if self._step is not None else 0

    def _forward(
        self, model: torch.nn.Module, input_ids: torch.Tensor, cache: Any, inputs: dict
    ) -> torch.Tensor:
        """Logits of the lean decode step for one-token rows where the model has one, else of its
        own forward (prefill chunks, other layouts)."""
        if self._step is not None and self.fast_decode and input_ids.shape[1] == 1:
            return self._step(input_ids, inputs["position_ids"], cache)
        return model(input_ids=input_ids, cache=cache, **inputs).logits

    # ---- loading off the lock

    def prefetch(self, adapter_id: str | None) -> Future[Staged] | None:
        """Start loading an adapter on the loader thread unless it is loaded or on its way.

        Returns its load (a future Staged), or None when there is nothing to load.
        """
        if adapter_id is None or adapter_id in self._names:
            return None
        with self._loads_lock:
            future = self._loads.get(adapter_id)
            if future is None:
                if self._loader is None:
                    self._loader = ThreadPoolExecutor(1, thread_name_prefix="doclora-adapter-load")
                future = self._loader.submit(self._stage, adapter_id)
                self._loads[adapter_id] = future
                future.add_done_callback(self._loaded)
            return future

    def staged(self, adapter_id: str) -> Staged | None:
        """The adapter, loaded off the lock and ready to `pin`; None while its load is running.

        Starts the load if needed. A failed load raises its error (NotFound, FailedPrecondition) and
        is forgotten, so a later request tries again.
        """
        future = self.prefetch(adapter_id)
        if future is None or not future.done():
            return None
        if future.exception() is not None:
            with self._loads_lock:
                if self._loads.get(adapter_id) is future:
                    del self._loads[adapter_id]
            raise future.exception()
        return future.result()

    def forget_staged(self, keep: set[str]) -> None:
        """Drop finished loads that no request waits for any more (their requests were cancelled)."""
        with self._loads_lock:
            for adapter_id in [a for a, f in self._loads.items() if f.done() and a not in keep]:
                del self._loads[adapter_id]

    def _loaded(self, _future: Future) -> None:
        callback = self.on_staged
        if callback is not None:
            callback()

    def _stage(self, adapter_id: str) -> Staged:
        """Loader thread: download, read and prepare an adapter without touching the live model."""
        folder = Path(self._fetch(adapter_id))
        # PEFT adapter names become module keys, so they can't be user ids (dots are not allowed there)
        staged = Staged(adapter_id, folder, f"adapter_{next(self._serial)}")
        started = time.perf_counter()
        try:
            with _normal_tensors():
                self._prepare_layers(staged)
        except Exception as exc:  # a misfit and the like: PEFT's own load says what is wrong, at pin
            log.info("adapter %s loads through PEFT: %s", adapter_id, exc)
            staged.layers = None
        log.info(
            "prepared adapter %s in %.2fs%s", adapter_id, time.perf_counter() - started,
            "" if staged.layers is not None else " (to load through PEFT)",
        )  # fmt: skip
        return staged

    def _prepare_layers(self, staged: Staged) -> None:
        """Put the adapter's LoRA modules, with their weights, into a meta skeleton of the base.

        Leaves `staged.layers` None when the adapter isn't plain LoRA on linear layers or its
        weights don't match what PEFT built for it.
        """
        from peft import PeftConfig, PeftModel, PeftType
        from peft.tuners.lora.layer import Linear as LoraLinear
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils.save_and_load import load_peft_weights

        base = self._base
        if base is None:
            return
        config = PeftConfig.from_pretrained(str(staged.folder))
        if config.peft_type != PeftType.LORA or _special(config):
            return
        config.inference_mode = True
        device = next(base.parameters()).device
        weights = load_peft_weights(str(staged.folder), device=str(device))
        # Everything on the meta device: no memory, no init work. Not PEFT's low_cpu_mem_usage,
        # which patches nn.Module for every thread (accelerate's init_empty_weights), so a load
        # running on the scheduler thread meanwhile would get meta weights; the device context is
        # per thread.
        with torch.device("meta"):
            # a copy of the config: building a model may write to it (its attention implementation)
            skeleton = type(base)(copy.deepcopy(base.config))
            peft = PeftModel(skeleton, config, adapter_name=staged.name).eval()
        layers, nbytes, name = {}, 0, staged.name
        for path, module in peft.base_model.model.named_modules():
            if not isinstance(module, BaseTunerLayer) or name not in getattr(module, "lora_A", {}):
                continue
            if type(module) is not LoraLinear or name in module.lora_variant or module.lora_bias.get(name):
                return
            for part in ("lora_A", "lora_B"):
                tensor = weights.pop(f"base_model.model.{path}.{part}.weight", None)
                target = getattr(module, part)[name]
                if tensor is None or tensor.shape != target.weight.shape:
                    return
                if tensor.dtype in (torch.float16, torch.bfloat16):
                    tensor = tensor.float()  # what PEFT's autocast_adapter_dtype does
                target.weight = torch.nn.Parameter(tensor, requires_grad=False)
                nbytes += tensor.numel() * tensor.element_size()
            layers[path] = module
        if weights or not layers:  # weights of modules PEFT didn't wrap, or nothing at all
            return
        staged.config, staged.layers, staged.nbytes = config, layers, nbytes

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
            held = [n for n in self._bytes if self._pins[n] or n in self._retired]
            # an adapter larger than the whole budget still loads when nothing else is held
            return not held or sum(self._bytes[n] for n in held) + nbytes <= self.max_bytes

    def pin(self, adapter_id: str | None, staged: Staged | Path | None = None) -> str:
        """Load the adapter if needed and keep it loaded until `unpin`; return its PEFT name.

        `staged` comes from `staged()` (quick); a folder, or nothing, loads it here, all of it
        under the lock. None (the base model alone) gives "__base__". Raises FailedPrecondition when
        the adapter doesn't fit the base, NotFound from `fetch` for an unknown one.
        """
        if adapter_id is None:
            return BASE
        if adapter_id not in self._names and not isinstance(staged, Staged):
            folder = staged if staged is not None else Path(self._fetch(adapter_id))
            staged = Staged(adapter_id, folder, f"adapter_{next(self._serial)}")
            with _normal_tensors(), contextlib.suppress(Exception):
                self._prepare_layers(staged)
        with self.lock:
            name = self._load_locked(adapter_id, staged)
            self._pins[name] += 1
        with self._loads_lock:
            future = self._loads.get(adapter_id)
            if future is not None and future.done():
                del self._loads[adapter_id]
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

    def _held_bytes(self) -> int:
        return sum(self._bytes.values())

    def _load_locked(self, adapter_id: str, staged: Staged | None) -> str:
        name = self._names.get(adapter_id)
        if name is not None:
            self._names.move_to_end(adapter_id)
            return name
        assert staged is not None
        name = staged.name
        started = time.perf_counter()
        quick = self._transplant(staged)
        if not quick:
            try:
                self._add(staged.folder, name)
            except (OSError, ValueError, KeyError, RuntimeError) as exc:
                self._discard(name)
                raise FailedPrecondition(
                    f"adapter {adapter_id!r} cannot be loaded onto the base model: {exc}"
                ) from exc
        self._names[adapter_id] = name
        log.info(
            "attached adapter %s as %s in %.3fs (%s)", adapter_id, name, time.perf_counter() - started,
            "prepared off the lock" if quick else "through PEFT, under the lock",
        )  # fmt: skip
        if self._orphan is not None:
            orphan, self._orphan = self._orphan, None
            self._delete(orphan)
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
            self._delete(old_name)
            log.info("evicted adapter %s", old_id)

    def _transplant(self, staged: Staged) -> bool:
        """Move a prepared adapter's LoRA modules into the live LoRA layers; False when some target
        has no live LoRA layer (then it loads through PEFT)."""
        from peft.tuners.lora.layer import Linear as LoraLinear

        if staged.layers is None or self._peft is None:
            return False
        root = self._peft.base_model.model
        pairs = []
        for path, src in staged.layers.items():
            try:
                dst = root.get_submodule(path)
            except AttributeError:
                return False
            if type(dst) is not LoraLinear:
                return False
            pairs.append((src, dst))
        name = staged.name
        for src, dst in pairs:
            for attr in src.adapter_layer_names + src.other_param_names:
                values = getattr(src, attr, None)
                if values is not None and name in values:
                    getattr(dst, attr)[name] = values[name]
        self._peft.peft_config[name] = staged.config
        self._vanilla.add(name)
        self._bytes[name] = staged.nbytes
        staged.layers = None  # the skeleton can go
        return True

    def _delete(self, name: str) -> None:
        if set(self._peft.peft_config) == {name}:
            self._orphan = name
            return
        with _normal_tensors():
            if name in self._vanilla and name not in self._peft.active_adapters:
                # what PeftModel.delete_adapter does for an inactive adapter, without walking the
                # whole model (a quarter of a second on a 30-layer model, the chats waiting)
                del self._peft.peft_config[name]
                for layer in self._live_layers:
                    layer.delete_adapter(name)
            else:
                self._peft.delete_adapter(name)
        self._vanilla.discard(name)
        self._bytes.pop(name, None)

    def _add(self, folder: Path, name: str) -> None:
        from peft import PeftModel
        from peft.tuners.lora.layer import LoraLayer

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
        self._live_layers = [m for m in self._peft.modules() if isinstance(m, LoraLayer)]
        self._bytes[name] = sum(
            p.numel() * p.element_size() for n, p in self._peft.named_parameters() if f".{name}." in n
        )
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


def _special(config: Any) -> bool:
    """LoRA options beyond plain low-rank terms on linear layers: PEFT loads those itself."""
    options = ("use_dora", "modules_to_save", "trainable_token_indices", "layer_replication",
               "target_parameters", "lora_bias", "alora_invocation_tokens", "use_qalora", "arrow_config")  # fmt: skip
    # initializations that rewrite the base weights (PiSSA, OLoRA, LoftQ, ...) need the real model
    init = getattr(config, "init_lora_weights", True)
    return any(getattr(config, o, None) for o in options) or not (
        isinstance(init, bool) or init == "gaussian"
    )
