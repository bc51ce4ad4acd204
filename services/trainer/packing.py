"""Sequence packing: the examples of one step concatenated into a single row, no padding, and
the prefix they all share (the chat template's system prompt and user header) run once.

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
    segments: list[tuple[int, int]]  # [start, end) of each example's own tokens in the row
    prefix: int = 0  # tokens at the row's start that every example shares
    example_tokens: int = 0  # the examples' own lengths summed: the data tokens this row trains on

    @property
    def tokens(self) -> int:
        """Tokens the model actually runs: the row's length."""
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
    lengths: Sequence[int],
    kind: str,
    dtype: torch.dtype = torch.float32,
    device: torch.device | None = None,
    prefix: int = 0,
) -> torch.Tensor:
    """A (1, 1, L, L) mask, L = prefix + sum(lengths), letting each token see the tokens of its own
    example up to itself and the `prefix` tokens that open the row, which every example shares.

    kind "bool": True where attention is allowed (what SDPA takes); "additive": 0 there and the
    dtype's most negative value elsewhere (what eager attention adds to the scores).
    """
    seg = torch.cat(
        [
            torch.full((prefix,), -1, dtype=torch.long, device=device),
            torch.repeat_interleave(
                torch.arange(len(lengths), device=device), torch.tensor(lengths, device=device)
            ),
        ]
    )
    n = seg.numel()
    idx = torch.arange(n, device=device)
    allowed = ((seg[:, None] == seg[None, :]) | (seg[None, :] == -1)) & (idx[None, :] <= idx[:, None])
    if kind == "bool":
        return allowed[None, None]
    mask = torch.zeros((n, n), dtype=dtype, device=device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[None, None]


def shared_prefix_length(examples: Sequence[Tokenized], minimum: int = 2) -> int:
    """Length of the token prefix all `examples` share (the chat template's system prompt and user
    header, typically), stopping before the token ahead of the first label of any of them, so no
    shared position ever predicts a label. 0 when shorter than `minimum` or for one example."""
    if len(examples) < 2:
        return 0
    first = examples[0].input_ids
    limit = min(len(e.input_ids) for e in examples)
    for e in examples:
        labelled = next((i for i, lab in enumerate(e.labels) if lab != IGNORE_INDEX), len(e.labels))
        limit = min(limit, labelled - 1)
    p = 0
    while p < limit and all(e.input_ids[p] == first[p] for e in examples):
        p += 1
    return p if p >= minimum else 0


def pack(
    examples: Sequence[Tokenized],
    *,
    kind: str = "bool",
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    share_prefix: bool = True,
) -> PackedBatch:
    """Concatenate `examples` into one row with their own positions and a block-causal mask.

    With `share_prefix` (and a mask to express it), the tokens that open every example are put in
    the row once, and each example continues from them at the positions it would have alone: the
    prefix's states do not depend on what follows it (causal attention), so every example's
    logits, and the summed gradients, are those of the examples run separately.
    """
    if not examples:
        raise ValueError("nothing to pack")
    device = torch.device(device)
    p = shared_prefix_length(examples) if share_prefix and kind != "positions" else 0
    ids: list[int] = list(examples[0].input_ids[:p])
    positions: list[int] = list(range(p))
    loss_positions: list[int] = []
    targets: list[int] = []
    segments: list[tuple[int, int]] = []
    for e in examples:
        start = len(ids)
        n = len(e.input_ids)
        ids.extend(e.input_ids[p:])
        positions.extend(range(p, n))
        # a label at an example's first position has nothing of its own before it: skipped, so no
        # token is ever predicted from the previous example (nor, by the prefix's limit, from the
        # shared prefix)
        for i in range(max(1, p + 1), n):
            if e.labels[i] != IGNORE_INDEX:
                loss_positions.append(start + i - 1 - p)
                targets.append(e.labels[i])
        segments.append((start, start + n - p))
    lengths = [end - start for start, end in segments]
    if kind == "positions" or len(examples) == 1:
        mask = None  # one example: the model's own causal mask is the same thing
    else:
        mask = block_causal_mask(lengths, kind, dtype, device, prefix=p)
    return PackedBatch(
        input_ids=torch.tensor([ids], dtype=torch.long, device=device),
        position_ids=torch.tensor([positions], dtype=torch.long, device=device),
        attention_mask=mask,
        loss_positions=torch.tensor(loss_positions, dtype=torch.long, device=device),
        targets=torch.tensor(targets, dtype=torch.long, device=device),
        segments=segments,
        prefix=p,
        example_tokens=sum(len(e.input_ids) for e in examples),
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


def packed_loss(model: Any, batch: PackedBatch, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy over the answer tokens of the packed row (fp32 softmax), their mean or
    (`reduction="sum"`, for batches split between processes) their sum."""
    logits = answer_logits(model, batch)
    return F.cross_entropy(logits.float(), batch.targets, reduction=reduction)


def per_example_losses(model: Any, batch: PackedBatch) -> list[float]:
    """Mean answer loss of each example of the row, for checking that packing keeps them apart."""
    logits = answer_logits(model, batch)
    losses = F.cross_entropy(logits.float(), batch.targets, reduction="none")
    out = []
    for start, end in batch.segments:
        sel = (batch.loss_positions >= start) & (batch.loss_positions < end - 1)
        out.append(float(losses[sel].mean()) if bool(sel.any()) else float("nan"))
    return out
