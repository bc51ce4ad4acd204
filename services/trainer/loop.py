"""The LoRA training core's entry: QA pairs -> chat-formatted examples -> a PEFT adapter folder.

No gRPC, NATS or object-store knowledge: the trainer worker loads the base model, calls
`train_lora`, and uploads `out_dir`. The loop is a plain torch loop (AdamW, linear warmup then
cosine decay) rather than `transformers.Trainer`: it is small, deterministic for a seed,
cancellable between steps, resumable from a checkpoint, and reports progress on our terms. Each
step's examples are packed into one row without padding (see packing.py), and the loss is taken on
the answer tokens only. After training, held-out pairs are answered by the base model and by the
adapter, and both are scored (see evaluate.py).

Here: `train_lora` and its setup (the examples, the resolved config and run plan, LoRA injected
into the caller's model and removed again). The parts live beside it: config.py (settings,
precision, plan), examples.py, steps.py (the optimisation steps, checkpoints, cancel),
distributed.py, results.py (evaluation, metrics, out_dir) and adapter_io.py.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from services.common.errors import InvalidArgument
from services.common.metrics import TRAIN_TOKENS_PER_S
from services.trainer.adapter_io import InitAdapter, load_init_adapter, lora_config
from services.trainer.config import LoraTrainConfig, RunPlan, auto_config, plan_run
from services.trainer.distributed import world
from services.trainer.examples import Example, build_examples
from services.trainer.results import evaluate_run, run_metrics, write_results
from services.trainer.steps import OnCheckpoint, Progress, StepLoop

log = logging.getLogger(__name__)


def train_lora(
    model: Any,
    tokenizer: Any,
    pairs: Sequence[Mapping[str, Any]],
    out_dir: str | Path,
    cfg: LoraTrainConfig | None = None,
    *,
    progress: Progress | None = None,
    should_stop: Callable[[], bool] | None = None,
    eval_pairs: Sequence[Mapping[str, Any]] | None = None,
    resume: Mapping[str, Any] | None = None,
    on_checkpoint: OnCheckpoint | None = None,
    init_adapter: InitAdapter | None = None,
    extra_evals: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
) -> dict[str, Any]:
    """Train a LoRA adapter on `pairs` and save it as a PEFT folder in `out_dir`; return the metrics.

    `out_dir` receives `adapter_config.json`, `adapter_model.safetensors` and, last, `metrics.json`
    (so its presence marks a finished adapter). `progress` gets a dict with step, total_steps,
    epoch, loss, lr, tokens_per_s and eta_s every `cfg.progress_interval_s` and after the last
    step. `should_stop` is polled before every step (and between evaluation batches); True raises
    `TrainingCancelled` (steps.py). `eval_pairs`, when given, get a validation loss and are
    answered by the base model and by the adapter (greedy), scored by token-F1 and exact match
    (eval_* metrics). `extra_evals` {name: pairs} are answered and scored the same way (no loss),
    as eval_{name}_* metrics: e.g. the held-out questions with retrieved passages before them.

    Checkpoints: every `cfg.checkpoint_every_steps` steps or `cfg.checkpoint_every_s` seconds,
    `on_checkpoint(state)` gets a state dict (see checkpoint.py; serialise it with
    `checkpoint.to_bytes`). `resume=state` continues that run from its step with the same
    adapter, optimizer, schedule, data order and RNG, so it ends where an uninterrupted run would;
    a state from a different run (other data, settings or model) is ignored with a warning.

    The caller's `model` is borrowed: LoRA layers are injected for the run and removed afterwards
    (also on error or cancel), so it comes back with its weights, requires_grad flags and
    train/eval mode as they were, ready for the next adapter. The global RNG state is untouched.
    One run at a time per model object; cancelling takes effect within one step (2-5 s for the
    135M default on two CPU cores, batches of 4).

    `init_adapter` (see `adapter_io.read_adapter`): start from that adapter's weights, with its
    rank, alpha and target modules, rather than from a fresh LoRA initialisation (continued
    training).

    Under torch.distributed (e.g. launched by torchrun, see ddp.py) every process calls this with
    the same pairs and config and a model on its own device: each step's batch is
    `cfg.batch_size` examples per process, split between them, and the summed gradients are
    all-reduced, so N processes take the step one process would take on the N-times larger batch.
    Only rank 0 reports progress, checkpoints, evaluates and writes `out_dir`. `should_stop` is
    agreed between the processes before every step (any one True stops them all at that step).
    To resume, every process passes the same `resume` state (rank 0's checkpoint: the processes
    hold the same weights, optimizer and counts, and draw dropout per step, see
    `distributed.step_seed`); it matches only a run with the same number of processes (the
    global batch depends on it).
    """
    from peft import PeftModel

    if isinstance(model, PeftModel):
        raise InvalidArgument("train_lora wants a plain base model, not a PeftModel")
    cfg, examples, eval_examples = _resolve(tokenizer, pairs, eval_pairs, cfg, init_adapter)
    plan, resume = _plan(cfg, model, examples, init_adapter, resume)
    with _lora_injected(model, cfg, plan, init_adapter) as peft_model:
        steps = StepLoop(peft_model, examples, cfg, plan, resume)
        try:
            steps.run(progress, should_stop, on_checkpoint)
        finally:
            if plan.main:
                TRAIN_TOKENS_PER_S.set(0)  # the run's steps are over (done, cancelled or failed)
        if not plan.main:  # rank 0 evaluates and writes the adapter; the others are done
            return steps.record()
        evaluation = evaluate_run(
            peft_model,
            tokenizer,
            eval_examples,
            list(eval_pairs or []),
            extra_evals,
            cfg,
            plan,
            should_stop=should_stop,
            total_steps=steps.total_steps,
        )
        metrics = run_metrics(peft_model, steps, examples, eval_examples, evaluation, cfg, plan)
        write_results(peft_model, Path(out_dir), metrics)
    return metrics


def _resolve(
    tokenizer: Any,
    pairs: Sequence[Mapping[str, Any]],
    eval_pairs: Sequence[Mapping[str, Any]] | None,
    cfg: LoraTrainConfig | None,
    init_adapter: InitAdapter | None,
) -> tuple[LoraTrainConfig, list[Example], list[Example]]:
    """The run's config with every None filled in for the data (and the shape of `init_adapter`,
    when continuing from one), its training examples and its held-out examples."""
    cfg = cfg or LoraTrainConfig()
    examples = build_examples(tokenizer, pairs, cfg.system_prompt, cfg.max_seq_len)
    if not examples:
        raise InvalidArgument("no usable QA pairs to train on")
    if init_adapter is not None:  # continued training keeps the adapter's shape
        cfg = replace(
            cfg,
            rank=init_adapter.rank,
            alpha=init_adapter.alpha,
            target_modules=list(init_adapter.target_modules),
        )
    cfg = auto_config(cfg, len(examples))
    eval_examples = (
        build_examples(tokenizer, eval_pairs, cfg.system_prompt, cfg.max_seq_len) if eval_pairs else []
    )
    return cfg, examples, eval_examples


def _plan(
    cfg: LoraTrainConfig,
    model: Any,
    examples: list[Example],
    init_adapter: InitAdapter | None,
    resume: Mapping[str, Any] | None,
) -> tuple[RunPlan, Mapping[str, Any] | None]:
    """The run's plan in this process's torch.distributed world, and `resume` when it is a
    checkpoint of this very run (None, with a warning, when it is another's)."""
    world_size, rank = world()
    plan = plan_run(
        cfg,
        model,
        examples,
        world_size=world_size,
        rank=rank,
        init_digest=init_adapter.digest if init_adapter is not None else None,
    )
    if resume is not None and resume.get("fingerprint") != plan.run_id:
        log.warning(
            "ignoring a checkpoint of another run (other data, settings or model): starting at step 0"
        )
        resume = None
    return plan, resume


@contextlib.contextmanager
def _lora_injected(
    model: Any, cfg: LoraTrainConfig, plan: RunPlan, init_adapter: InitAdapter | None
) -> Iterator[Any]:
    """The caller's `model` with LoRA layers injected (fresh from `cfg.seed`, or `init_adapter`'s
    weights) and gradient checkpointing on when the plan says so, inside a fork of the global RNG;
    on the way out (also on error or cancel) the layers are removed without merging and the
    model's requires_grad flags, train/eval mode and checkpointing are put back."""
    from peft import get_peft_model

    requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    training = model.training
    had_peft_config = hasattr(model, "peft_config")
    config = lora_config(cfg, model)
    was_checkpointing = any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())
    switch_checkpointing = plan.gradient_checkpointing and not was_checkpointing
    with torch.random.fork_rng(devices=plan.rng_devices):
        torch.manual_seed(cfg.seed)  # LoRA init and dropout draw from the global generator
        peft_model = get_peft_model(model, config)  # injects into `model` in place
        try:
            if init_adapter is not None:
                load_init_adapter(peft_model, init_adapter)
            if switch_checkpointing:
                _set_checkpointing(model, True)
            yield peft_model
        finally:
            if switch_checkpointing:
                _set_checkpointing(model, False)
            peft_model.unload()  # removes the LoRA layers without merging them
            if not had_peft_config and hasattr(model, "peft_config"):
                del model.peft_config
            for name, param in model.named_parameters():
                param.requires_grad_(requires_grad.get(name, param.requires_grad))
            model.train(training)


def _set_checkpointing(model: Any, on: bool) -> None:
    """Turn activation (gradient) checkpointing of a transformers model on or off, non-reentrant,
    by the name this transformers version has for it (activation_* since 5.x)."""
    if on:
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable({"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return
    if hasattr(model, "activation_checkpointing_disable"):
        model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_disable()
    if getattr(model, "_require_grads_hook", None) is not None:  # added by enable for the embeddings
        model.disable_input_require_grads()
