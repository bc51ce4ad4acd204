"""What a finished LoRA run leaves behind: the held-out evaluation (validation loss of adapter and
base, and their greedy answers scored, see evaluate.py), the run's metrics, and the out_dir they
go to: the PEFT adapter files first and `metrics.json` last, so its presence marks a finished
adapter.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from services.trainer.adapter_io import save_adapter
from services.trainer.config import LoraTrainConfig, RunPlan, forward_context
from services.trainer.evaluate import evaluate_adapter
from services.trainer.examples import Example
from services.trainer.packing import pack, packed_loss
from services.trainer.steps import StepLoop, TrainingCancelled

log = logging.getLogger(__name__)


@torch.no_grad()
def mean_loss(
    model: Any, examples: Sequence[Example], batch_size: int, kind: str, amp: torch.dtype | None
) -> float:
    """Token-weighted mean answer loss over `examples`, packed `batch_size` at a time."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = pack(examples[start : start + batch_size], kind=kind, device=device)
        if batch.label_tokens == 0:
            continue
        with forward_context(device, amp):
            loss = packed_loss(model, batch)
        total += float(loss) * batch.label_tokens
        count += batch.label_tokens
    return total / count if count else float("nan")


@dataclass
class Evaluation:
    """The held-out results of a run: validation losses and the scored answers (eval_* metrics)."""

    eval_loss: float | None = None
    base_eval_loss: float | None = None
    answers: dict[str, Any] = field(default_factory=dict)


def evaluate_run(
    peft_model: Any,
    tokenizer: Any,
    eval_examples: list[Example],
    eval_pairs: list[Mapping[str, Any]],
    extra_evals: Mapping[str, Sequence[Mapping[str, Any]]] | None,
    cfg: LoraTrainConfig,
    plan: RunPlan,
    *,
    should_stop: Callable[[], bool] | None,
    total_steps: int,
) -> Evaluation:
    """Validation loss of adapter and base on `eval_examples`; then `eval_pairs` and each of
    `extra_evals` answered by both and scored (the extra sets' metrics named eval_{name}_*).
    `should_stop` is polled between answer batches and after each set: `TrainingCancelled`."""
    peft_model.eval()
    result = Evaluation()
    if eval_examples:
        result.eval_loss = mean_loss(peft_model, eval_examples, cfg.eval_batch_size, plan.kind, plan.amp)
        with peft_model.disable_adapter():
            result.base_eval_loss = mean_loss(
                peft_model, eval_examples, cfg.eval_batch_size, plan.kind, plan.amp
            )
    sets = {"": eval_pairs, **{name: list(ps) for name, ps in (extra_evals or {}).items()}}
    result.answers = answer_sets(
        peft_model, tokenizer, sets, cfg, should_stop=should_stop, total_steps=total_steps
    )
    return result


def answer_sets(
    peft_model: Any,
    tokenizer: Any,
    sets: Mapping[str, Sequence[Mapping[str, Any]]],
    cfg: LoraTrainConfig,
    *,
    should_stop: Callable[[], bool] | None,
    total_steps: int = 0,
) -> dict[str, Any]:
    """Each of `sets` {name: pairs} answered greedily by the base model and the adapter and scored
    (evaluate.py): eval_* metrics for the set named "", eval_{name}_* for the others, with
    eval_seconds, the time all answering took. `should_stop` is polled between answer batches and
    after each set: `TrainingCancelled`. In eval mode, fp32 like the inference service on a CPU,
    whatever precision trained the adapter."""
    peft_model.eval()
    answers: dict[str, Any] = {}
    eval_started = time.monotonic()
    for name, set_pairs in sets.items():
        if not set_pairs or not cfg.eval_generate:
            continue
        scored = evaluate_adapter(
            peft_model,
            tokenizer,
            set_pairs,
            system_prompt=cfg.system_prompt,
            max_pairs=cfg.eval_max_pairs,
            max_new_tokens=cfg.eval_max_new_tokens,
            batch_size=cfg.eval_generate_batch_size,
            should_stop=should_stop,
        )
        if should_stop is not None and should_stop():
            raise TrainingCancelled(total_steps, total_steps)
        answers.update({k.replace("eval_", f"eval_{name}_", 1) if name else k: v for k, v in scored.items()})
        answers["eval_seconds"] = time.monotonic() - eval_started
    return answers


def _quant_config(peft_model: Any) -> Callable[[str], Any] | None:
    """A getter over the model's quantization config (a dict or an object), None when it has none."""
    config = getattr(getattr(peft_model, "config", None), "quantization_config", None)
    if config is None:
        return None
    if isinstance(config, dict):
        return config.get
    return lambda key: getattr(config, key, None)


def _base_dtype(peft_model: Any) -> str:
    """The dtype the frozen base weights compute in (the adapter's own are fp32): the compute
    dtype of a 4-bit model, else the weights' own."""
    get = _quant_config(peft_model)
    if get is not None and get("bnb_4bit_compute_dtype") is not None:
        return str(get("bnb_4bit_compute_dtype")).removeprefix("torch.")
    frozen = next((p for p in peft_model.parameters() if not p.requires_grad), None)
    param = frozen if frozen is not None else next(peft_model.parameters())
    return str(param.dtype).removeprefix("torch.")


def _quantization(peft_model: Any) -> str | None:
    """ "nf4" / "fp4" for a bitsandbytes 4-bit base model, "int8" for 8-bit, else None."""
    get = _quant_config(peft_model)
    if get is None:
        return None
    if get("load_in_4bit"):
        return str(get("bnb_4bit_quant_type") or "4bit")
    if get("load_in_8bit"):
        return "int8"
    return str(get("quant_method") or "quantized")


def run_metrics(
    peft_model: Any,
    steps: StepLoop,
    examples: list[Example],
    eval_examples: list[Example],
    evaluation: Evaluation,
    cfg: LoraTrainConfig,
    plan: RunPlan,
) -> dict[str, Any]:
    """The metrics of a finished run, in the order metrics.json lists them."""
    losses, run_seconds = steps.losses, steps.run_seconds
    tail = losses[-plan.batches_per_epoch :]
    return {
        "steps": len(losses),
        "total_steps": steps.total_steps,
        "resumed_from_step": steps.start_step,
        "epochs": steps.total_steps / plan.batches_per_epoch,
        "examples": len(examples),
        "truncated_examples": sum(e.truncated for e in examples),
        "trainable_params": steps.trainable,
        "tokens": steps.tokens,
        "label_tokens": steps.label_tokens,
        # tokens the model ran: fewer than `tokens`, as each step's shared prompt prefix runs once
        "computed_tokens": steps.computed_tokens,
        "seconds": steps.seconds,
        "tokens_per_s": steps.run_tokens / run_seconds if run_seconds > 0 else 0.0,
        "final_loss": losses[-1],
        "final_epoch_loss": sum(tail) / len(tail),
        "losses": losses,
        "eval_loss": evaluation.eval_loss,
        "base_eval_loss": evaluation.base_eval_loss,
        "eval_examples": len(eval_examples),
        **evaluation.answers,
        "device": str(plan.device),
        "dtype": _base_dtype(peft_model),
        "precision": "bf16-autocast" if plan.amp is not None else "model-dtype",
        "quantization": _quantization(peft_model),
        "packing": plan.kind,
        "gradient_checkpointing": plan.gradient_checkpointing,
        "world_size": plan.world_size,
        "started_from_adapter": plan.init_digest,
        "config": asdict(cfg),
    }


def write_results(peft_model: Any, out: Path, metrics: dict[str, Any]) -> None:
    """The adapter folder in `out`, then metrics.json, which marks it finished."""
    save_adapter(peft_model, out)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    log.info(
        "trained %d steps in %.1f s, final loss %.4f",
        metrics["total_steps"],
        metrics["seconds"],
        metrics["losses"][-1],
    )
