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
    names: tuple[str, ...] = ()  # each row's adapter, when rows differ

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
        return cls(None, tuple(groups), tuple(names))


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
    if not _lean(layer, holder) or kwargs.get("adapter_names") is not None:
        return peft_forward(x, *args, **kwargs)
    return add_terms(layer, holder, x, layer.base_layer(x, *args, **kwargs))


def _lean(layer: Any, holder: PlanHolder) -> bool:
    """Whether the lean forward applies now (a plan is set, the layer's adapters are on and unmerged)."""
    if holder.plan is None and not holder.base_only:
        return False
    return not (layer.disable_adapters or layer.merged)


def project(module: Any, x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """`module(x)`, given `base`, the output of the module's base linear layer for `x` (computed
    elsewhere, e.g. fused with its neighbours): the LoRA terms of the step's plan are added to it,
    or the module runs in full when the lean forward doesn't apply."""
    holder = getattr(module, "_doclora_holder", None)
    if holder is None:
        return base if isinstance(module, torch.nn.Linear) else module(x)
    if not _lean(module, holder):
        return module(x)
    return add_terms(module, holder, x, base)


def add_terms(layer: Any, holder: PlanHolder, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
    """`result` (the base layer's output) plus each row's LoRA term under the current plan."""
    plan = holder.plan
    if plan is None:
        return result
    if holder.row_exact and x.dim() == 3 and x.shape[1] == 1:
        stacked = _stacked(layer, plan.names or (plan.uniform,) * x.shape[0], x)
        if stacked is not None:  # every row's LoRA term in one batched matmul pair
            a, b, scale = stacked
            delta = torch.bmm(torch.bmm(x if x.dtype == a.dtype else x.to(a.dtype), a), b) * scale
            return result.add_(delta if delta.dtype == result.dtype else delta.to(result.dtype))
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


# stacked per-row LoRA weights kept per layer for the current plan, up to this many bytes a layer
_STACK_BYTES = 2**20


def _stacked(layer: Any, names: tuple[str, ...], x: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
    """Per-row A [rows, in, r], B [rows, r, out] and scales [rows, 1, 1] for a row-exact decode step, so
    `bmm(bmm(x, A), B) * scale` gives every row its own adapter's term (zeros for rows without
    one here), each row computed alone as in `_delta`'s row-exact path. Cached for the last plan
    seen: a running batch keeps its plan from step to step. None when the adapters' ranks differ or
    a LoRA layer has a bias (then the groups go one by one).
    """
    cached = layer.__dict__.get("_doclora_stack")
    if cached is not None and cached[0] == names:
        return cached[1]
    present = [n for n in dict.fromkeys(names) if n in layer.lora_A]
    if not present:
        return None
    first = layer.lora_A[present[0]]
    rank = first.weight.shape[0]
    if any(
        layer.lora_A[n].weight.shape[0] != rank
        or layer.lora_A[n].bias is not None
        or layer.lora_B[n].bias is not None
        for n in present
    ):
        return None
    out_features = layer.lora_B[present[0]].weight.shape[0]
    nbytes = len(names) * rank * (first.weight.shape[1] + out_features) * first.weight.element_size()
    if nbytes > _STACK_BYTES:
        return None
    zero_a = first.weight.new_zeros(rank, first.weight.shape[1])
    zero_b = first.weight.new_zeros(out_features, rank)
    # stacked as stored and transposed after, the layout `_delta`'s `weight.t()` has: the matmul
    # kernels (and so the rounding) are the ones a row gets alone
    a = torch.stack([layer.lora_A[n].weight if n in layer.lora_A else zero_a for n in names]).transpose(1, 2)
    b = torch.stack([layer.lora_B[n].weight if n in layer.lora_A else zero_b for n in names]).transpose(1, 2)
    scale = torch.tensor(
        [float(layer.scaling[n]) if n in layer.lora_A else 0.0 for n in names], dtype=a.dtype, device=a.device
    ).view(-1, 1, 1)
    layer._doclora_stack = (names, (a, b, scale))
    return a, b, scale


def add_fused_terms(modules: tuple, x: torch.Tensor, base: torch.Tensor) -> bool:
    """Add the step's LoRA terms of `modules` — layers that read the same `x` and whose base outputs
    lie side by side in `base` (one packed matmul, packed.py) — to `base` in place, in two batched
    matmuls per adapter of the step: `x @ A` with the layers' A matrices side by side, then `@ B`
    with their B matrices (scaled) on a block diagonal. Each row is its own matmul, so its numbers
    don't depend on the rest of the batch.

    Returns False, changing nothing, where this doesn't apply (no plan: PEFT's own behaviour; a
    layer not lean; a LoRA bias): the caller then adds each layer's terms alone. Layers the adapters
    don't wrap (plain linears beside wrapped ones) add nothing.
    """
    holder = None
    for m in modules:  # every LoRA layer of the model is bound to the same holder (`patch`)
        bound = getattr(m, "_doclora_holder", None)
        if bound is not None:
            holder = bound
        elif type(m) is not torch.nn.Linear:  # an unpatched wrapper: PEFT's own forward
            return False
    if holder is None:  # no adapter wraps these layers: nothing to add
        return True
    if not all(_lean(m, holder) for m in modules if type(m) is not torch.nn.Linear):
        return False
    plan = holder.plan
    if plan is None:
        return holder.base_only
    groups = ((plan.uniform, slice(None)),) if plan.uniform is not None else plan.groups
    terms = []
    for name, rows in groups:
        weights = _fused_weights(modules, name)
        if weights is False:
            return False
        if weights is not None:
            terms.append((weights, rows))
    for (a, b), rows in terms:
        part = x[rows] if isinstance(rows, slice) else x.index_select(0, rows)
        if part.dtype != a.dtype:
            part = part.to(a.dtype)
        count = part.shape[0]
        delta = torch.bmm(torch.bmm(part, a.expand(count, -1, -1)), b.expand(count, -1, -1))
        if delta.dtype != base.dtype:
            delta = delta.to(base.dtype)
        if isinstance(rows, slice):
            base[rows].add_(delta)
        else:
            base.index_add_(0, rows, delta)
    return True


def _fused_weights(modules: tuple, name: str) -> tuple[torch.Tensor, torch.Tensor] | None | bool:
    """Adapter `name`'s (A [in, R], B [R, outs]) over `modules`, cached while the adapter is loaded; None when it touches none of them, False when it can't be fused (a bias, or
    ranks that differ between the layers)."""
    # on the first layer's base linear: the same object whichever layers PEFT has wrapped so far
    cache = getattr(modules[0], "base_layer", modules[0]).__dict__.setdefault("_doclora_fused", {})
    if name in cache:
        return cache[name]
    for stale in [n for n in cache if not any(n in getattr(m, "lora_A", ()) for m in modules)]:
        del cache[stale]  # adapters deleted since
    present = [m for m in modules if name in getattr(m, "lora_A", ())]  # plain layers: rank 0
    if not present:
        return None
    if any(m.lora_A[name].bias is not None or m.lora_B[name].bias is not None for m in present):
        return False
    ref = present[0].lora_A[name].weight
    ranks = [m.lora_A[name].weight.shape[0] if m in present else 0 for m in modules]
    outs = [getattr(m, "base_layer", m).out_features for m in modules]
    a = ref.new_zeros(ref.shape[1], sum(ranks))
    b = ref.new_zeros(sum(ranks), sum(outs))
    r0 = o0 = 0
    for m, r, o in zip(modules, ranks, outs, strict=True):
        if r:
            a[:, r0 : r0 + r] = m.lora_A[name].weight.t()
            b[r0 : r0 + r, o0 : o0 + o] = m.lora_B[name].weight.t() * m.scaling[name]
        r0, o0 = r0 + r, o0 + o
    cache[name] = (a, b)
    return cache[name]
