"""The PEFT side of the adapter cache: one PeftModel around the shared base, adapters added to it and
deleted from it by name.

Adapters that were prepared off the model lock (staging.py) are moved in quickly: PEFT injects an
adapter's LoRA layers into a skeleton of the base on the meta device (no weights), so the live model
is untouched, and the adapter's own weights go into the skeleton's LoRA layers (`prepare`). Under
the lock, `transplant` then moves those LoRA modules into the live model's LoRA layers (PEFT's own
per-adapter containers, `adapter_layer_names` and `other_param_names`, the ones its `delete_adapter`
empties), a few dictionary writes per layer. Adapters that can't go that way load through PEFT
under the lock (`add`), stalling the running chats for the load: the first adapter of a process
(there are no LoRA layers to move into yet), one targeting modules no loaded adapter wraps, and
kinds other than plain LoRA (DoRA, ...).

PEFT breaks with zero adapters, so the last adapter deleted stays in the model, unreachable (the
orphan), until the next one loads.

Everything here but `prepare` changes the live model, so it runs under `AdapterCache.lock`.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from services.common.errors import FailedPrecondition
from services.inference import lora_rows
from services.inference.staging import Staged


class PeftSlots:
    """The base model, the PeftModel around it once an adapter was loaded, and its adapters' state."""

    def __init__(self) -> None:
        self.base: torch.nn.Module | None = None
        self.peft: Any = None  # the PeftModel around the base, made when the first adapter loads
        self.holder = lora_rows.PlanHolder()  # the current step's rows -> adapters, for lora_rows.py's layers
        self.vanilla: set[str] = set()  # PEFT names of plain-LoRA adapters (lora_rows.is_vanilla)
        self.sizes: dict[str, int] = {}  # PEFT name -> bytes of its tensors, while in the model
        self._live_layers: list[Any] = []  # the live model's LoRA layers (for quick deletes)
        self._orphan: str | None = None  # deleted last, still in the model (PEFT needs one adapter)

    def attach(self, model: torch.nn.Module) -> torch.nn.Module:
        """Bind to the base model (a PeftModel's, when given one); returns the base."""
        from peft import PeftModel

        base = model.get_base_model() if isinstance(model, PeftModel) else model
        if self.base is not None and self.base is not base:
            raise ValueError("this adapter cache is already attached to another model")
        self.base = base
        if isinstance(model, PeftModel):
            from peft.tuners.lora.layer import LoraLayer

            self.peft = model
            self._live_layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
        return base

    def unload(self) -> torch.nn.Module | None:
        """Take every adapter out of the model and unbind from it; returns the bare base model."""
        base = self.base
        if self.peft is not None:
            with normal_tensors():
                base = self.peft.unload()  # LoRA layers replaced by the layers they wrapped
            if hasattr(base, "peft_config"):
                del base.peft_config
        self.vanilla.clear()
        self.sizes.clear()
        self._live_layers = []
        self._orphan = None
        self.peft = None
        self.base = None
        return base

    def model(self) -> torch.nn.Module:
        """The module to call: the PEFT model once an adapter was loaded, else the bare base."""
        if self.base is None:
            raise FailedPrecondition("the adapter cache has no model attached")
        return self.peft if self.peft is not None else self.base

    def prepare(self, staged: Staged) -> None:
        """Put the adapter's LoRA modules, with their weights, into a meta skeleton of the base.

        Runs off the lock (the loader thread), outside inference mode. Leaves `staged.layers` None
        when the adapter isn't plain LoRA on linear layers or its weights don't match what PEFT
        built for it.
        """
        with normal_tensors():
            self._prepare(staged)

    def _prepare(self, staged: Staged) -> None:
        from peft import PeftConfig, PeftModel, PeftType
        from peft.tuners.lora.layer import Linear as LoraLinear
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils.save_and_load import load_peft_weights

        base = self.base
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

    def load(self, staged: Staged) -> bool:
        """Add a staged adapter to the model: moved in when it was prepared and fits the live LoRA
        layers (True), else loaded through PEFT (False). Raises FailedPrecondition, with nothing
        left behind, when it doesn't fit the base."""
        if self.transplant(staged):
            return True
        try:
            self.add(staged.folder, staged.name)
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            self.discard(staged.name)
            raise FailedPrecondition(
                f"adapter {staged.adapter_id!r} cannot be loaded onto the base model: {exc}"
            ) from exc
        return False

    def transplant(self, staged: Staged) -> bool:
        """Move a prepared adapter's LoRA modules into the live LoRA layers; False when some target
        has no live LoRA layer (then it loads through PEFT)."""
        from peft.tuners.lora.layer import Linear as LoraLinear

        if staged.layers is None or self.peft is None:
            return False
        root = self.peft.base_model.model
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
        self.peft.peft_config[name] = staged.config
        self.vanilla.add(name)
        self.sizes[name] = staged.nbytes
        staged.layers = None  # the skeleton can go
        return True

    def add(self, folder: Path, name: str) -> None:
        """Load an adapter through PEFT (making the PeftModel for the first one)."""
        from peft import PeftModel
        from peft.tuners.lora.layer import LoraLayer

        device = str(next(self.base.parameters()).device)
        with normal_tensors():
            if self.peft is None:
                self.peft = PeftModel.from_pretrained(
                    self.base, str(folder), adapter_name=name, is_trainable=False, torch_device=device
                )
            else:
                self.peft.load_adapter(
                    str(folder), adapter_name=name, is_trainable=False, torch_device=device
                )
            self.peft.eval()
        lora_rows.patch(self.peft, self.holder)
        self._live_layers = [m for m in self.peft.modules() if isinstance(m, LoraLayer)]
        self.sizes[name] = sum(
            p.numel() * p.element_size() for n, p in self.peft.named_parameters() if f".{name}." in n
        )
        if lora_rows.is_vanilla(self.peft, name):
            self.vanilla.add(name)

    def drop_orphan(self) -> None:
        """Delete the adapter kept only because PEFT needs one, now that another is in."""
        if self._orphan is not None:
            orphan, self._orphan = self._orphan, None
            self.delete(orphan)

    def delete(self, name: str) -> None:
        """Take an adapter out of the model (the last one stays, as the orphan)."""
        if set(self.peft.peft_config) == {name}:
            self._orphan = name
            return
        with normal_tensors():
            if name in self.vanilla and name not in self.peft.active_adapters:
                # what PeftModel.delete_adapter does for an inactive adapter, without walking the
                # whole model (a quarter of a second on a 30-layer model, the chats waiting)
                del self.peft.peft_config[name]
                for layer in self._live_layers:
                    layer.delete_adapter(name)
            else:
                self.peft.delete_adapter(name)
        self.vanilla.discard(name)
        self.sizes.pop(name, None)

    def discard(self, name: str) -> None:
        """Remove what a failed load left behind, so base chat and other adapters stay exact."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        if self.peft is not None and name in self.peft.peft_config:
            with contextlib.suppress(Exception), normal_tensors():
                self.peft.delete_adapter(name)
            return
        # a failed first load leaves layers in the base with no PeftModel to delete them through
        with normal_tensors():
            for module in self.base.modules():
                if isinstance(module, BaseTunerLayer):
                    module.delete_adapter(name)


@contextlib.contextmanager
def normal_tensors() -> Iterator[None]:
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
