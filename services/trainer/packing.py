"""Sequence packing: the examples of one step concatenated into a single row, no padding.

Each example keeps its own positions (0, 1, 2, ... from its first token) and sees only its own
earlier tokens: a block-diagonal causal mask for the eager and SDPA attention implementations,
and for FlashAttention / flex attention no mask at all, since transformers rebuilds the blocks
from position ids that restart at 0 for each example. Logits are computed only at the positions
whose next token is labelled (the answer), which on a 49k-token vocabulary saves most of the
output-head work on prompt tokens, and the loss is a token-weighted mean over those labels: the
same value a padded batch of the same examples gives, without the compute spent on padding.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100

# attention implementations that take no explicit 4D mask but honour position ids that restart
_POSITION_ONLY = ("flash_attention", "flex_attention", "paged")


class Tokenized(Protocol):
    input_ids: list[int]
    labels: list[int]


@dataclass
class PackedBatch:
    """One row of concatenated examples, ready for a causal LM's forward."""

    input_ids: torch.Tensor  # (1, L)
    position_ids: torch.Tensor  # (1, L), restarting at 0 for each example
    attention_mask: torch.Tensor | None  # (1, 1, L, L), or None where position ids suffice
    loss_positions: torch.Tensor  # (n,) positions p whose next token p + 1 carries a label
    targets: torch.Tensor  # (n,) those labels
    segments: list[tuple[int, int]]  # [start, end) of each example in the row

    @property
    def tokens(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def label_tokens(self) -> int:
        return int(self.targets.numel())


def attention_kind(model: Any) -> str:
    """How packed examples are kept apart for this model: "bool" (SDPA), "additive" (eager and
    other implementations that add the mask to the scores) or "positions" (FlashAttention, flex)."""
    config = getattr(model, "config", None)
    impl = str(getattr(config, "_attn_implementation", None) or "eager")
    if impl.startswith(_POSITION_ONLY) or "flash" in impl:
        return "positions"
    if impl == "sdpa":
        return "bool"
    return "additive"


def block_causal_mask(
    lengths: Sequence[int], kind: str, dtype: torch.dtype = torch.float32, device: torch.device | None = None
) -> torch.Tensor:
    """A (1, 1, L, L) mask letting each token see the tokens of its own example up to itself.

    kind "bool": True where attention is allowed (what SDPA takes); "additive": 0 there and the
    dtype's most negative value elsewhere (what eager attention adds to the scores).
    """
    seg = torch.repeat_interleave(torch.arange(len(lengths), device=device), torch.tensor(lengths, device=device))
    n = seg.numel()
    idx = torch.arange(n, device=device)
    allowed = (seg[:, None] == seg[None, :]) & (idx[None, :] <= idx[:, None])
    if kind == "bool":
        return allowed[None, None]
    mask = torch.zeros((n, n), dtype=dtype, device=device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[None, None]


def pack(
    examples: Sequence[Tokenized],
    *,
    kind: str = "bool",
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> PackedBatch:
    """Concatenate `examples` into one row with restarting positions and a block-causal mask."""
    if not examples:
        raise ValueError("nothing to pack")
    device = torch.device(device)
    ids: list[int] = []
    positions: list[int] = []
    loss_positions: list[int] = []
    targets: list[int] = []
    segments: list[tuple[int, int]] = []
    for e in examples:
        start = len(ids)
        n = len(e.input_ids)
        ids.extend(e.input_ids)
        positions.extend(range(n))
        # a label at an example's first position has nothing of its own before it: skipped, so no
        # token is ever predicted from the previous example
        for i in range(1, n):
            if e.labels[i] != IGNORE_INDEX:
                loss_positions.append(start + i - 1)
                targets.append(e.labels[i])
        segments.append((start, start + n))
    lengths = [end - start for start, end in segments]
    if kind == "positions" or len(examples) == 1:
        mask = None  # one example: the model's own causal mask is the same thing
    else:
        mask = block_causal_mask(lengths, kind, dtype, device)
    return PackedBatch(
        input_ids=torch.tensor([ids], dtype=torch.long, device=device),
        position_ids=torch.tensor([positions], dtype=torch.long, device=device),
        attention_mask=mask,
        loss_positions=torch.tensor(loss_positions, dtype=torch.long, device=device),
        targets=torch.tensor(targets, dtype=torch.long, device=device),
        segments=segments,
    )


def _takes_logits_to_keep(model: Any) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return "logits_to_keep" in inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return False


def answer_logits(model: Any, batch: PackedBatch) -> torch.Tensor:
    """(n, vocab) logits at `batch.loss_positions`, computed only there when the model allows."""
    kwargs: dict[str, Any] = {
        "input_ids": batch.input_ids,
        "position_ids": batch.position_ids,
        "attention_mask": batch.attention_mask,
        "use_cache": False,
    }
    if _takes_logits_to_keep(model):
        out = model(**kwargs, logits_to_keep=batch.loss_positions)
        return out.logits[0]
    out = model(**kwargs)
    return out.logits[0, batch.loss_positions]


def packed_loss(model: Any, batch: PackedBatch) -> torch.Tensor:
    """Mean cross-entropy over the answer tokens of the packed row (fp32 softmax)."""
    logits = answer_logits(model, batch)
    return F.cross_entropy(logits.float(), batch.targets, reduction="mean")


def per_example_losses(model: Any, batch: PackedBatch) -> list[float]:
    """Mean answer loss of each example of the row, for checking that packing keeps them apart."""
    logits = answer_logits(model, batch)
    losses = F.cross_entropy(logits.float(), batch.targets, reduction="none")
    out = []
    for start, end in batch.segments:
        sel = (batch.loss_positions >= start) & (batch.loss_positions < end - 1)
        out.append(float(losses[sel].mean()) if bool(sel.any()) else float("nan"))
    return out
