"""The torch.distributed side of a training step, for a run whose processes torchrun started (see
ddp.py and launch.py): which process this is (`world`), its share of a step with the gradients
all-reduced (`distributed_step`), a cancel that stops every process at the same step
(`stop_agreed`), and per-step dropout seeds (`step_seed`) so that rank 0's checkpoint resumes them
all. A one-process run needs none of this but `world` and `stop_agreed`.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import torch

from services.trainer.config import RunPlan, forward_context
from services.trainer.examples import Example
from services.trainer.packing import pack, packed_loss


def world() -> tuple[int, int]:
    """(world size, rank) of the torch.distributed group this process is in, (1, 0) when none."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def distributed_step(
    peft_model: Any, examples: list[Example], params: list[torch.Tensor], plan: RunPlan
) -> tuple[float, int, int, int]:
    """This process's share of one step under torch.distributed: backward of its summed answer
    loss, then one all-reduce of every trainable gradient together with the loss sum and token
    counts, and the gradients divided by the step's label tokens over all processes. The result
    is the token-weighted mean loss's gradient of the whole batch, as one process would compute
    it. Returns (mean loss, example tokens, computed tokens, label tokens) of the whole step."""
    import torch.distributed as dist

    local_sum = torch.zeros((), device=plan.device)
    counts = [0, 0, 0]
    if examples:  # a short last batch may leave a process nothing to do this step
        batch = pack(examples, kind=plan.kind, device=plan.device)
        if batch.label_tokens:
            with forward_context(plan.device, plan.amp):
                loss = packed_loss(peft_model, batch, reduction="sum")
            loss.backward()
            local_sum = loss.detach().float()
        counts = [batch.label_tokens, batch.example_tokens, batch.tokens]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat(
        [g.reshape(-1).float() for g in grads]
        + [local_sum.reshape(1), torch.tensor(counts, dtype=torch.float32, device=plan.device)]
    )
    dist.all_reduce(flat)
    total_sum, labels, example_tokens, computed = (float(x) for x in flat[-4:])
    scale = 1.0 / max(labels, 1.0)
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = (flat[offset : offset + n] * scale).view_as(p).to(p.dtype)
        offset += n
    return total_sum / max(labels, 1.0), int(example_tokens), int(computed), int(labels)


def stop_agreed(should_stop: Callable[[], bool] | None, plan: RunPlan) -> bool:
    """`should_stop()`; under torch.distributed, True on every process when it is True on any
    (one all-reduce of the flags each step), so all stop before the same step and none is left
    waiting in a collective for a process that has gone."""
    stop = should_stop is not None and bool(should_stop())
    if plan.world_size == 1:
        return stop
    import torch.distributed as dist

    flag = torch.tensor([1.0 if stop else 0.0], device=plan.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def step_seed(seed: int, rank: int, step: int) -> int:
    """The seed of one process's random draws (dropout) in one step of a distributed run."""
    return random.Random(f"{seed}:{rank}:{step}").getrandbits(63)
