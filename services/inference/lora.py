"""A lean forward for PEFT's LoRA linear layers when each row of a batch has its own adapter.

PEFT runs a mixed batch (`adapter_names=`) through hooks it registers on every LoRA layer for each
call, and each layer then gathers and scatters rows with some fifty small tensor ops per adapter in
the batch; its single-adapter path costs a dozen. For a 30-layer model with LoRA on every linear
layer that is thousands of ops per decode step, as much time as the matmuls themselves on a CPU.

Here the scheduler sets a `Plan` for the step (which rows use which adapter) and the patched
layers read it: the base layer, then for each adapter present `B(A(x[rows])) * scale` added into
its rows — the same arithmetic as PEFT's vanilla LoRA, in four or five ops. Layers only patch over
PEFT's forward: with no plan set, or `adapter_names` given, or anything but vanilla LoRA (DoRA and
other variants, merged weights, adapters off), they run PEFT's own code.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

BASE = "__base__"  # PEFT's adapter name for "no adapter" in a mixed batch


@dataclass(frozen=True)
class Plan:
    """Which rows of this step's batch use which adapter (PEFT names)."""

    uniform: str | None  # every row uses this adapter
    # when rows differ: (adapter, its rows) as a slice when they are contiguous (the scheduler sorts
    # its batch by adapter), else as an index tensor
    groups: tuple[tuple[str, slice | torch.Tensor], ...] = ()

    @classmethod
    def of(cls, names: Sequence[str], device: torch.device) -> Plan | None:
        """The plan for rows using `names`; None when every row is the base model."""
        first = names[0]
        if all(n == first for n in names):
            return None if first == BASE else cls(first)
        rows: dict[str, list[int]] = {}
        for i, name in enumerate(names):
            if name != BASE:
                rows.setdefault(name, []).append(i)
        groups = []
        for name, idx in rows.items():
            if idx[-1] - idx[0] == len(idx) - 1:
                groups.append((name, slice(idx[0], idx[-1] + 1)))
            else:
                groups.append((name, torch.tensor(idx, device=device)))
        return cls(None, tuple(groups))


class PlanHolder:
    """Where the patched layers look for the current step's plan (None: PEFT's own behaviour)."""

    plan: Plan | None = None
    base_only: bool = False  # a step with no adapter at all: skip LoRA entirely
    # compute a decode step's LoRA terms row by row (a batched matmul of one-row matrices), so a
    # row's result never depends on how many rows share its adapter; int8 engines need this
    row_exact: bool = False


def is_vanilla(peft_model: Any, name: str) -> bool:
    """Whether adapter `name` is plain LoRA on linear layers only, which the lean forward covers."""
    from peft.tuners.lora.layer import Linear as LoraLinear
    from peft.tuners.lora.layer import LoraLayer

    config = peft_model.peft_config[name]
    if getattr(config, "modules_to_save", None) or getattr(config, "trainable_token_indices", None):
        return False
    for module in peft_model.modules():
        if not isinstance(module, LoraLayer):
            continue
        holds = name in module.lora_A or name in getattr(module, "lora_embedding_A", {})
        if holds and (type(module) is not LoraLinear or name in getattr(module, "lora_variant", {})):
            return False
    return True


def patch(peft_model: Any, holder: PlanHolder) -> int:
    """Give every LoRA linear layer not yet bound to `holder` the lean forward; returns how many."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    count = 0
    for module in peft_model.modules():
        if type(module) is LoraLinear and getattr(module, "_doclora_holder", None) is not holder:
            # PEFT's own forward, kept from the first patch so a re-bind never wraps a wrapper
            peft_forward = module.__dict__.get("_doclora_peft_forward") or module.forward
            module._doclora_peft_forward = peft_forward
            module._doclora_holder = holder
            module.forward = functools.partial(_forward, module, peft_forward, holder)
            count += 1
    return count


def _forward(layer: Any, peft_forward: Callable, holder: PlanHolder, x: torch.Tensor, *args, **kwargs):
    plan = holder.plan
    if (plan is None and not holder.base_only) or kwargs.get("adapter_names") is not None:
        return peft_forward(x, *args, **kwargs)
    if layer.disable_adapters or layer.merged:
        return peft_forward(x, *args, **kwargs)
    result = layer.base_layer(x, *args, **kwargs)
    if plan is None:
        return result
    if plan.uniform is not None:
        if plan.uniform in layer.lora_A:
            result = result + _delta(layer, plan.uniform, x, result.dtype, holder.row_exact)
        return result
    for name, rows in plan.groups:
        if name in layer.lora_A:
            if isinstance(rows, slice):  # a view: gather and scatter for free
                result[rows].add_(_delta(layer, name, x[rows], result.dtype, holder.row_exact))
            else:
                delta = _delta(layer, name, x.index_select(0, rows), result.dtype, holder.row_exact)
                result.index_add_(0, rows, delta)
    return result


def _delta(layer: Any, name: str, x: torch.Tensor, dtype: torch.dtype, row_exact: bool) -> torch.Tensor:
    """PEFT's vanilla LoRA term, `lora_B(lora_A(x)) * scaling`, in the base layer's dtype."""
    a, b = layer.lora_A[name], layer.lora_B[name]
    if x.dtype != a.weight.dtype:
        x = x.to(a.weight.dtype)
    if row_exact and x.dim() == 3 and x.shape[1] == 1 and a.bias is None and b.bias is None:
        rows = x.shape[0]  # [rows, 1, in] @ [rows, in, r] @ [rows, r, out]: one small matmul per row
        h = torch.bmm(x, a.weight.t().expand(rows, -1, -1))
        delta = torch.bmm(h, b.weight.t().expand(rows, -1, -1)) * layer.scaling[name]
    else:
        delta = F.linear(F.linear(x, a.weight, a.bias), b.weight, b.bias) * layer.scaling[name]
    return delta if delta.dtype == dtype else delta.to(dtype)
