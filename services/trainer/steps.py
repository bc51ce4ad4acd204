"""The optimisation steps of one LoRA run on an injected peft model: AdamW with linear warmup then
cosine decay, each step's examples packed into one row, gradient clipping, progress reports,
checkpoint states to resume from (see checkpoint.py), cancellation between steps, and the time
budget that may shorten a fresh run once its first steps are timed.

`StepLoop` keeps what the steps have done (losses, token counts, seconds) for the metrics that
results.py writes; loop.py sets it up and calls it. The main process also counts the tokens it
trains on, and the run's tokens/s, as Prometheus metrics (services/common/metrics.py).
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch

from services.common import metrics
from services.trainer import checkpoint as ckpt
from services.trainer.config import (
    BUDGET_MIN_STEPS,
    BUDGET_PROBE_STEPS,
    LoraTrainConfig,
    RunPlan,
    forward_context,
    lr_factor,
    warmup_steps,
)
from services.trainer.distributed import distributed_step, step_seed, stop_agreed
from services.trainer.examples import Example, step_batches
from services.trainer.packing import pack, packed_loss

log = logging.getLogger(__name__)

Progress = Callable[[dict[str, Any]], None]
OnCheckpoint = Callable[[dict[str, Any]], None]


class TrainingCancelled(Exception):
    """`should_stop()` returned True; nothing usable was written to out_dir."""

    def __init__(self, step: int, total_steps: int):
        super().__init__(f"training cancelled at step {step}/{total_steps}")
        self.step = step
        self.total_steps = total_steps


class _StepBudget:
    """The time budget of a fresh run: times steps 1..BUDGET_PROBE_STEPS-1 (step 0 carries one-off
    costs), then says once how many steps fit in `seconds` (at least BUDGET_MIN_STEPS)."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.started = 0.0

    def shortened(self, step: int, total_steps: int) -> int | None:
        """Called before each step: the new, shorter total when the budget cuts the run, else None."""
        if self.seconds <= 0:
            return None
        if step == 1:
            self.started = time.monotonic()
        if step != BUDGET_PROBE_STEPS:
            return None
        per_step = (time.monotonic() - self.started) / (BUDGET_PROBE_STEPS - 1)
        fits = max(BUDGET_MIN_STEPS, int(self.seconds / max(per_step, 1e-6)))
        self.seconds = 0.0  # decided once
        if fits >= total_steps:
            return None
        log.info("time budget at %.2f s a step: %d steps instead of %d", per_step, fits, total_steps)
        return fits


def _to_cpu(obj: Any) -> Any:
    """A deep copy of a (nested) state dict with every tensor cloned to the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_cpu(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_to_cpu(v) for v in obj)
    return obj


class StepLoop:
    """The steps of one run: set up (trainable weights in fp32, optimizer, schedule), resumed from
    a checkpoint state when given one, then `run` to the end. Its counters (losses, tokens,
    label_tokens, computed_tokens, seconds, ...) are the run's record afterwards."""

    def __init__(
        self,
        peft_model: Any,
        examples: list[Example],
        cfg: LoraTrainConfig,
        plan: RunPlan,
        resume: Mapping[str, Any] | None = None,
    ):
        self.model, self.examples, self.cfg, self.plan = peft_model, examples, cfg, plan
        self.named = [(n, p) for n, p in peft_model.named_parameters() if p.requires_grad]
        self.params = [p for _, p in self.named]
        for p in self.params:
            # peft keeps adapters fp32 on a bf16 base; make sure, since AdamW in bf16 loses small updates
            if p.dtype != torch.float32:
                p.data = p.data.float()
        self.trainable = sum(p.numel() for p in self.params)
        self.total_steps = plan.total_steps
        if resume is not None:  # a run shortened by its time budget resumes at its chosen length
            self.total_steps = int(resume.get("total_steps") or self.total_steps)
        self.warmup_steps = (
            warmup_steps(cfg, self.total_steps) if self.total_steps != plan.total_steps else plan.warmup_steps
        )
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        # reads total_steps and warmup_steps at each step: the time budget may shorten the run
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, self.total_steps, self.warmup_steps, cfg.min_lr_ratio)
        )
        self.losses: list[float] = []
        self.tokens = self.label_tokens = self.computed_tokens = 0
        self.prior_seconds = 0.0  # of the run(s) before the resume
        self.start_step = 0
        self.run_tokens = 0  # of this call's steps
        self.started = self.run_seconds = 0.0
        # the cadence of progress reports and checkpoints, reset by `run`
        self._since_report: list[float] = []
        self._last_report = self._last_checkpoint = 0.0
        self._last_checkpoint_step = 0
        if resume is not None:
            self._resume(resume)

    @property
    def seconds(self) -> float:
        """Training seconds of the whole run, the interrupted parts before a resume included."""
        return self.prior_seconds + self.run_seconds

    def record(self) -> dict[str, Any]:
        """The result of a process other than rank 0, which neither evaluates nor writes out_dir."""
        return {
            "steps": len(self.losses),
            "total_steps": self.total_steps,
            "losses": self.losses,
            "rank": self.plan.rank,
        }

    def _resume(self, resume: Mapping[str, Any]) -> None:
        """Continue from a checkpoint state: weights, optimizer, schedule, RNG and counters."""
        self.start_step = min(int(resume["step"]), self.total_steps)
        with torch.no_grad():
            for name, p in self.named:
                p.copy_(resume["adapter"][name].to(p.device))
        self.optimizer.load_state_dict(resume["optimizer"])
        self.scheduler.load_state_dict(resume["scheduler"])
        torch.set_rng_state(resume["torch_rng"])
        for index, state in zip(self.plan.rng_devices, resume.get("cuda_rng") or [], strict=False):
            torch.cuda.set_rng_state(state, index)
        self.losses = [float(x) for x in resume["losses"]]
        self.tokens, self.label_tokens = int(resume["tokens"]), int(resume["label_tokens"])
        self.computed_tokens = int(resume.get("computed_tokens", 0))
        self.prior_seconds = float(resume["seconds"])
        log.info("resuming LoRA training at step %d/%d", self.start_step, self.total_steps)

    def state(self, step: int) -> dict[str, Any]:
        """A checkpoint state after `step` steps (see checkpoint.py), every tensor copied to the CPU."""
        return {
            "version": ckpt.VERSION,
            "fingerprint": self.plan.run_id,
            "step": step,
            "total_steps": self.total_steps,
            "adapter": {name: p.detach().to("cpu", copy=True) for name, p in self.named},
            "optimizer": _to_cpu(self.optimizer.state_dict()),
            "scheduler": _to_cpu(self.scheduler.state_dict()),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": [torch.cuda.get_rng_state(i) for i in self.plan.rng_devices],
            "losses": list(self.losses),
            "tokens": self.tokens,
            "label_tokens": self.label_tokens,
            "computed_tokens": self.computed_tokens,
            "seconds": self.prior_seconds + time.monotonic() - self.started,
        }

    def run(
        self,
        progress: Progress | None = None,
        should_stop: Callable[[], bool] | None = None,
        on_checkpoint: OnCheckpoint | None = None,
    ) -> None:
        """Take the steps from `start_step` to the end; `TrainingCancelled` when told to stop."""
        plan, cfg = self.plan, self.cfg
        batch_iter = step_batches(len(self.examples), plan.batch_size, cfg.seed)
        for _ in range(self.start_step):  # the batches the interrupted run already took
            next(batch_iter)
        self.run_tokens = 0
        self.started = self._last_report = self._last_checkpoint = time.monotonic()
        self._last_checkpoint_step = self.start_step
        self._since_report = []
        self.model.train()
        log.info(
            "training LoRA r=%d on %d examples: %d steps, batch %d (packed), %d trainable params, %s%s",
            cfg.rank,
            len(self.examples),
            self.total_steps,
            plan.batch_size,
            self.trainable,
            plan.device,
            " bf16 autocast" if plan.amp is not None else "",
        )
        budget = _StepBudget(plan.time_budget_s if self.start_step == 0 else 0.0)
        for step in itertools.count(self.start_step):
            if step >= self.total_steps:
                break
            if (fits := budget.shortened(step, self.total_steps)) is not None:
                self.total_steps, self.warmup_steps = fits, min(self.warmup_steps, warmup_steps(cfg, fits))
            if stop_agreed(should_stop, plan):
                raise TrainingCancelled(step, self.total_steps)
            if plan.world_size > 1:
                # each process's dropout masks come from its own (seed, rank, step) stream, not from a
                # generator carried over from step 0: so rank 0's checkpoint resumes every process
                torch.manual_seed(step_seed(cfg.seed, plan.rank, step))
            lr = self._step(next(batch_iter))
            if plan.main:
                self._report(step + 1, lr, progress, on_checkpoint)
        self.run_seconds = time.monotonic() - self.started

    def _step(self, indices: list[int]) -> float:
        """One optimizer step on the examples at `indices`; returns the lr it was taken at."""
        plan = self.plan
        if plan.world_size == 1:
            batch = pack([self.examples[i] for i in indices], kind=plan.kind, device=plan.device)
            with forward_context(plan.device, plan.amp):
                loss = packed_loss(self.model, batch)
            loss.backward()
            value = float(loss.detach())
            step_tokens, step_computed, step_labels = batch.example_tokens, batch.tokens, batch.label_tokens
        else:
            share = [self.examples[i] for i in indices[plan.rank :: plan.world_size]]
            value, step_tokens, step_computed, step_labels = distributed_step(
                self.model, share, self.params, plan
            )
        if self.cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

        self.losses.append(value)
        self._since_report.append(value)
        self.tokens += step_tokens
        self.run_tokens += step_tokens
        self.computed_tokens += step_computed
        self.label_tokens += step_labels
        if plan.main:  # the step's tokens over every process
            metrics.TRAIN_TOKENS.inc(step_tokens)
            metrics.TRAIN_TOKENS_PER_S.set(self.run_tokens / max(time.monotonic() - self.started, 1e-9))
        return lr

    def _report(
        self, done: int, lr: float, progress: Progress | None, on_checkpoint: OnCheckpoint | None
    ) -> None:
        """After step `done` on the main process: a progress report and a checkpoint, when due."""
        now = time.monotonic()
        cfg, total_steps = self.cfg, self.total_steps
        if progress is not None and (
            done == self.start_step + 1
            or done == total_steps
            or now - self._last_report >= cfg.progress_interval_s
        ):
            elapsed = max(now - self.started, 1e-9)
            progress(
                {
                    "step": done,
                    "total_steps": total_steps,
                    "epoch": done / self.plan.batches_per_epoch,
                    "loss": sum(self._since_report) / len(self._since_report),
                    "lr": lr,
                    "tokens_per_s": self.run_tokens / elapsed,
                    "eta_s": elapsed / (done - self.start_step) * (total_steps - done),
                }
            )
            self._since_report.clear()
            self._last_report = now
        if on_checkpoint is not None and done < total_steps:
            every_steps, every_s = cfg.checkpoint_every_steps, cfg.checkpoint_every_s
            if (every_steps > 0 and done - self._last_checkpoint_step >= every_steps) or (
                every_s > 0 and now - self._last_checkpoint >= every_s
            ):
                on_checkpoint(self.state(done))
                self._last_checkpoint_step, self._last_checkpoint = done, time.monotonic()
