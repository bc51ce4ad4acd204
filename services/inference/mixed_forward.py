"""One forward over a batch whose rows use different adapters of the shared model.

Each row of a step names its own adapter (or "__base__" for none). With only vanilla LoRA adapters
in the model, the batch runs once: the step's `lora_rows.Plan` goes into the `PlanHolder` that lora_rows.py's
patched layers read, so switching adapters costs nothing and one batch can mix them. PEFT can't mix
other kinds (DoRA, say) in one batch, so while one is loaded the batch runs as one forward per
adapter, each the way PEFT runs that adapter alone. Decode steps of Llama-layout models go through
fastpath.py's lean step, prefill chunks through the model's own forward.

The caller holds `AdapterCache.lock`: forwards and adapter loading exclude each other.
"""

from __future__ import annotations

from typing import Any

import torch

from services.inference import fastpath, lora_rows
from services.inference.peft_slots import PeftSlots, normal_tensors


class MixedForward:
    """Runs `slots`' model over batches that mix adapters."""

    def __init__(self, slots: PeftSlots):
        self.slots = slots
        self.step: fastpath.DecodeStep | None = None  # the lean decode forward, for Llama layouts
        self.fast_decode = True  # use it (False: the model's own forward, e.g. to compare)

    def run(self, names: list[str], input_ids: torch.Tensor, cache: Any, inputs: dict) -> torch.Tensor:
        """Logits of one forward over a batch whose row i uses adapter `names[i]` ("__base__": none).

        `cache` is the step's `kv.BatchKV`; `inputs` the other forward arguments, row-aligned.
        """
        slots = self.slots
        model = slots.model()
        if slots.peft is None:
            return self.forward(model, input_ids, cache, inputs)
        if set(slots.peft.peft_config) <= slots.vanilla:
            holder = slots.holder
            holder.plan = lora_rows.Plan.of(names, input_ids.device)
            holder.base_only = holder.plan is None
            try:
                return self.forward(model, input_ids, cache, inputs)
            finally:
                holder.plan, holder.base_only = None, False
        return self._per_adapter(model, names, input_ids, cache, inputs)

    def _per_adapter(
        self, model: torch.nn.Module, names: list[str], input_ids: torch.Tensor, cache: Any, inputs: dict
    ) -> torch.Tensor:
        """The batch as one PEFT forward per adapter, its rows' logits put back in place."""
        peft = self.slots.peft
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
            if name == lora_rows.BASE:
                with peft.disable_adapter():
                    out = model(input_ids=input_ids.index_select(0, idx), cache=sub, **part).logits
            else:
                if peft.active_adapter != name:
                    with normal_tensors():
                        peft.set_adapter(name, inference_mode=True)
                out = model(input_ids=input_ids.index_select(0, idx), cache=sub, **part).logits
            if logits is None:
                logits = out.new_empty((len(names), *out.shape[1:]))
            logits.index_copy_(0, idx, out)
        return logits

    def forward(
        self, model: torch.nn.Module, input_ids: torch.Tensor, cache: Any, inputs: dict
    ) -> torch.Tensor:
        """Logits of the lean step where the model has one (decode steps, and prefill chunks once
        the step has packed weights), else of its own forward (other layouts)."""
        step = self.step
        if step is not None and self.fast_decode and (input_ids.shape[1] == 1 or step.packed):
            return step(input_ids, inputs["position_ids"], cache)
        return model(input_ids=input_ids, cache=cache, **inputs).logits

    def fuse_int8(self) -> int:
        """Fuse the int8 projections that share an input, for the lean decode step (if any)."""
        return self.step.fuse_int8() if self.step is not None else 0
