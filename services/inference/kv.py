"""Per-request KV caches and the attention that lets requests of different lengths share one forward.

Batched decoding usually pads every sequence to the longest and masks the padding, which ties all
rows to one cache shape and makes joining and leaving a batch a re-padding job. Here each request
owns its cache instead (`RequestKV`: one preallocated buffer per layer, sized for its prompt plus its
`max_new_tokens`, so decoding never reallocates), and a step stacks only the new tokens: the
linear layers, where the weights are read and almost all the time goes, run once on the whole
batch, while attention runs row by row over each request's own, unpadded cache. A request joins or
leaves a batch by being listed or not; no other row's state changes, so a row computes exactly what
it would alone.

The model is switched to the attention implementation `doclora_rows` (registered with transformers
on import). Its cache object for a step is a `BatchKV` over the rows: transformers' attention
modules call `cache.update(k, v, layer)` and hand what it returns to the attention function, so
`BatchKV.update` returns per-row lists and `rows_attention` walks them. That covers the model
families whose attention follows the Llama layout (Llama, Mistral, Qwen2/3, SmolLM, Phi-3,
Gemma without soft-capping); sliding windows are honoured.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

ATTN_IMPLEMENTATION = "doclora_rows"


class RequestKV:
    """One request's keys and values for every layer, in buffers allocated for its whole length."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.length = 0  # tokens stored (the same in every layer once a forward has finished)
        self._keys: list[torch.Tensor] = []
        self._values: list[torch.Tensor] = []

    def write(
        self, layer: int, keys: torch.Tensor, values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store `keys`/`values` ([1, heads, new, dim]) after what `layer` holds; return all of it."""
        if layer == len(self._keys):  # first forward: size the buffers from what the layer produces
            shape = (1, keys.shape[1], self.capacity, keys.shape[3])
            self._keys.append(torch.empty(shape, dtype=keys.dtype, device=keys.device))
            self._values.append(torch.empty(shape, dtype=values.dtype, device=values.device))
        end = self.length + keys.shape[2]
        if end > self.capacity:
            raise RuntimeError(f"KV cache overflow: {end} tokens in a cache for {self.capacity}")
        k, v = self._keys[layer], self._values[layer]
        new = keys.shape[2]  # narrow: one view op each, where slicing three dims takes three
        k.narrow(2, self.length, new).copy_(keys)
        v.narrow(2, self.length, new).copy_(values)
        return k.narrow(2, 0, end), v.narrow(2, 0, end)

    def advance(self, n: int) -> None:
        """Count `n` tokens as stored, after a forward wrote them into every layer."""
        self.length += n

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self._keys, *self._values))


class BatchKV:
    """The cache a forward sees: row i of the batch reads and writes `rows[i]`."""

    # transformers' mask helpers look for these on a cache; none of them applies to this one
    is_compileable = False

    def __init__(self, rows: Sequence[RequestKV]):
        self.rows = rows

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        if len(self.rows) == 1:
            k, v = self.rows[0].write(layer_idx, key_states, value_states)
            return [k], [v]
        keys, values = [], []
        for i, row in enumerate(self.rows):
            k, v = row.write(layer_idx, key_states[i : i + 1], value_states[i : i + 1])
            keys.append(k)
            values.append(v)
        return keys, values

    def advance(self, n: int) -> None:
        for row in self.rows:
            row.advance(n)

    def select(self, indices: Sequence[int]) -> BatchKV:
        """The cache of a sub-batch made of these rows."""
        return BatchKV([self.rows[i] for i in indices])


def rows_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: list[torch.Tensor] | torch.Tensor,
    value: list[torch.Tensor] | torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention of each row's new queries over that row's own cache; returns [batch, new, heads, dim]."""
    if not isinstance(key, list):
        raise RuntimeError(
            f"the {ATTN_IMPLEMENTATION!r} attention needs the chat engine's cache; "
            "this model belongs to a ChatEngine and can't be called without it"
        )
    if softcap is not None:
        raise NotImplementedError("attention logit soft-capping (Gemma 2) is not supported by row attention")
    # Mistral passes its window as an argument, Qwen2 and others keep it on the module
    window = sliding_window if sliding_window is not None else getattr(module, "sliding_window", None)
    gqa = query.shape[1] != key[0].shape[1]
    outs = []
    for i, (k, v) in enumerate(zip(key, value, strict=True)):
        q = query[i : i + 1]
        mask = _mask(q.shape[2], k.shape[2], window, q.device)
        causal = mask is None and q.shape[2] > 1  # a whole prompt at once: plain causal
        outs.append(
            F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=causal, scale=scaling, enable_gqa=gqa
            )
        )
    out = outs[0] if len(outs) == 1 else torch.cat(outs)
    return out.transpose(1, 2).contiguous(), None


def _mask(new: int, total: int, window: int | None, device: torch.device) -> torch.Tensor | None:
    """Boolean [new, total] mask (True = attend) for queries at the end of a `total`-token sequence.

    None when no mask is needed: a single query seeing everything, or a whole prompt (is_causal).
    """
    past = total - new
    windowed = window is not None and total > window
    if not windowed and (new == 1 or past == 0):
        return None
    q_pos = torch.arange(past, total, device=device)[:, None]
    k_pos = torch.arange(total, device=device)[None, :]
    mask = k_pos <= q_pos
    if windowed:
        mask &= k_pos > q_pos - window
    return mask


def install(model: torch.nn.Module) -> str | None:
    """Switch `model` (and the sub-configs that share its attention) to row attention.

    Returns the implementation it had, for `uninstall`.
    """
    config = model.config
    before = getattr(config, "_attn_implementation", None)
    _set_impl(model, ATTN_IMPLEMENTATION)
    return before


def uninstall(model: torch.nn.Module, before: str | None) -> None:
    if before is not None:
        _set_impl(model, before)


def _set_impl(model: torch.nn.Module, name: str) -> None:
    seen = set()
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and id(config) not in seen and hasattr(config, "_attn_implementation"):
            seen.add(id(config))
            config._attn_implementation = name


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, rows_attention)


_register()
