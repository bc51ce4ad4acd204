"""The LoRA training core: QA pairs -> chat-formatted examples -> a PEFT adapter folder.

No gRPC, NATS or object-store knowledge: the trainer worker loads the base model, calls
`train_lora`, and uploads `out_dir`. The loop is a plain torch loop (AdamW, linear warmup then
cosine decay, batches padded to their longest example) rather than `transformers.Trainer`: it is
small, deterministic for a seed, cancellable between steps, and reports progress on our terms.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from services.common.config import Settings
from services.common.errors import InvalidArgument

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label value the loss skips

Progress = Callable[[dict[str, Any]], None]


class TrainingCancelled(Exception):
    """`should_stop()` returned True; nothing usable was written to out_dir."""

    def __init__(self, step: int, total_steps: int):
        super().__init__(f"training cancelled at step {step}/{total_steps}")
        self.step = step
        self.total_steps = total_steps


@dataclass
class LoraTrainConfig:
    """Hyperparameters; the defaults suit a few dozen to a few thousand short QA pairs."""

    rank: int = 8
    alpha: int = 16
    dropout: float = 0.0  # tiny data sets are meant to be memorised; dropout also costs ~10% of a CPU step
    # "all-linear" = every nn.Linear but the output head (for Llama: q,k,v,o,gate,up,down)
    target_modules: str | list[str] = "all-linear"
    epochs: float = 3.0
    # a few dozen pairs give ~5 batches an epoch: too few steps to learn their facts, so runs
    # derived from epochs take at least min_steps (measured: 20 pairs need ~50 steps at lr 1e-3)
    min_steps: int = 50
    max_steps: int = 0  # > 0: exactly this many steps; 0 = max(min_steps, ceil(epochs * batches per epoch))
    # 1e-3 suits the 135M default (2e-4 left 20 pairs unlearned after 50 steps); ~2e-4 for 7B models
    lr: float = 1e-3
    warmup_ratio: float = 0.1
    min_lr_ratio: float = 0.0  # cosine decays from lr to lr * min_lr_ratio
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    batch_size: int = 4
    max_seq_len: int = 512
    seed: int = 1234
    # None = the chat template's own default system prompt; inference must use the same value
    system_prompt: str | None = None
    progress_interval_s: float = 2.0
    eval_batch_size: int = 8

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> LoraTrainConfig:
        """Defaults taken from the `DOCLORA_TRAIN_*` settings, then `overrides`."""
        values: dict[str, Any] = {
            "rank": settings.train_lora_rank,
            "alpha": 2 * settings.train_lora_rank,
            "epochs": settings.train_epochs,
            "max_steps": settings.train_max_steps,
            "lr": settings.train_lr,
            "seed": settings.train_seed,
        }
        values.update(overrides)
        return cls(**values)


@dataclass
class Example:
    """One tokenized QA exchange; `labels` is IGNORE_INDEX outside the answer."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool = False

    @property
    def label_count(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


def _messages(question: str, answer: str | None, system_prompt: str | None) -> list[dict[str, str]]:
    msgs = [{"role": "system", "content": system_prompt}] if system_prompt else []
    msgs.append({"role": "user", "content": question})
    if answer is not None:
        msgs.append({"role": "assistant", "content": answer})
    return msgs


def _encode(tokenizer: Any, text: str) -> list[int]:
    # the chat template already writes every special token it wants: add none of our own
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def build_examples(
    tokenizer: Any,
    pairs: Iterable[Mapping[str, Any]],
    system_prompt: str | None = None,
    max_seq_len: int = 512,
) -> list[Example]:
    """Format each {"question", "answer"} pair with the tokenizer's chat template.

    The prompt (system + user turn + assistant header) is tokenized on its own, exactly as
    inference will tokenize it, then the answer and the end-of-turn token follow; only those carry
    labels. Whatever the template writes after the end-of-turn token (a newline) is context only.
    Pairs with an empty side, or whose prompt alone fills `max_seq_len`, are skipped; an example
    longer than `max_seq_len` loses the end of its answer.
    """
    eos = tokenizer.eos_token
    examples: list[Example] = []
    skipped = 0
    for pair in pairs:
        question = str(pair.get("question") or "").strip()
        answer = str(pair.get("answer") or "").strip()
        if not question or not answer:
            skipped += 1
            continue
        prompt = tokenizer.apply_chat_template(
            _messages(question, None, system_prompt), tokenize=False, add_generation_prompt=True
        )
        full = tokenizer.apply_chat_template(_messages(question, answer, system_prompt), tokenize=False)
        if not full.startswith(prompt):
            raise InvalidArgument("the chat template does not render a conversation as prompt + answer")
        completion = full[len(prompt) :]
        cut = completion.find(eos) if eos else -1
        if cut >= 0:
            cut += len(eos)
        else:  # templates without an end-of-turn token: learn the answer and stop there
            cut = len(completion.rstrip())
        prompt_ids = _encode(tokenizer, prompt)
        answer_ids = _encode(tokenizer, completion[:cut])
        tail_ids = _encode(tokenizer, completion[cut:]) if completion[cut:] else []
        input_ids = prompt_ids + answer_ids + tail_ids
        labels = [IGNORE_INDEX] * len(prompt_ids) + answer_ids + [IGNORE_INDEX] * len(tail_ids)
        truncated = len(input_ids) > max_seq_len
        if truncated:
            input_ids, labels = input_ids[:max_seq_len], labels[:max_seq_len]
        example = Example(input_ids, labels, truncated)
        # a label at position 0 has nothing before it to be predicted from
        if sum(1 for x in labels[1:] if x != IGNORE_INDEX) == 0:
            skipped += 1
            continue
        examples.append(example)
    if skipped:
        log.warning("skipped %d QA pairs (empty, or prompt longer than %d tokens)", skipped, max_seq_len)
    return examples


def _collate(examples: Sequence[Example], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example of the batch."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        mask[row, :n] = 1
    return {
        "input_ids": ids.to(device),
        "labels": labels.to(device),
        "attention_mask": mask.to(device),
    }


def lr_factor(step: int, total_steps: int, warmup_steps: int, min_ratio: float = 0.0) -> float:
    """Multiplier of the peak lr for 0-based `step`: linear warmup, then cosine down to min_ratio."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


@torch.no_grad()
def _mean_loss(model: Any, examples: Sequence[Example], batch_size: int, pad_id: int) -> float:
    """Token-weighted mean answer loss over `examples`."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = _collate(examples[start : start + batch_size], pad_id, device)
        n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        if n == 0:
            continue
        out = model(**batch, use_cache=False)
        total += float(out.loss) * n
        count += n
    return total / count if count else float("nan")


def linear_module_names(model: torch.nn.Module) -> list[str]:
    """Sorted short names of the model's nn.Linear layers, the output head excepted.

    Resolving "all-linear" here rather than in peft keeps adapter_config.json short and readable.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return sorted(
        {
            name.rsplit(".", 1)[-1]
            for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and module is not head
        }
    )


@dataclass
class _Restore:
    """What get_peft_model changes on the caller's model, to put back afterwards."""

    requires_grad: dict[str, bool] = field(default_factory=dict)
    training: bool = False
    had_peft_config: bool = False


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
) -> dict[str, Any]:
    """Train a LoRA adapter on `pairs` and save it as a PEFT folder in `out_dir`; return the metrics.

    `out_dir` receives `adapter_config.json`, `adapter_model.safetensors` and, last, `metrics.json`
    (so its presence marks a finished adapter). `progress` gets a dict with step, total_steps,
    epoch, loss, lr, tokens_per_s and eta_s every `cfg.progress_interval_s` and after the last
    step. `should_stop` is polled before every step; True raises `TrainingCancelled`.
    `eval_pairs`, when given, are scored with and without the adapter after training.

    The caller's `model` is borrowed: LoRA layers are injected for the run and removed afterwards
    (also on error or cancel), so it comes back with its weights, requires_grad flags and
    train/eval mode as they were, ready for the next adapter. The global RNG state is untouched.
    One run at a time per model object; cancelling takes effect within one step (~4-7 s for the
    135M default on two CPU cores).
    """
    from peft import LoraConfig, PeftModel, get_peft_model

    cfg = cfg or LoraTrainConfig()
    if isinstance(model, PeftModel):
        raise InvalidArgument("train_lora wants a plain base model, not a PeftModel")
    out = Path(out_dir)
    examples = build_examples(tokenizer, pairs, cfg.system_prompt, cfg.max_seq_len)
    if not examples:
        raise InvalidArgument("no usable QA pairs to train on")
    eval_examples = (
        build_examples(tokenizer, eval_pairs, cfg.system_prompt, cfg.max_seq_len) if eval_pairs else []
    )

    batch_size = max(1, cfg.batch_size)
    batches_per_epoch = math.ceil(len(examples) / batch_size)
    if cfg.max_steps > 0:
        total_steps = cfg.max_steps
    else:
        total_steps = max(1, cfg.min_steps, math.ceil(cfg.epochs * batches_per_epoch))
    warmup_steps = math.ceil(cfg.warmup_ratio * total_steps) if cfg.warmup_ratio > 0 else 0
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    rng_devices = (
        [device.index if device.index is not None else torch.cuda.current_device()]
        if device.type == "cuda"
        else []
    )

    restore = _Restore(
        requires_grad={n: p.requires_grad for n, p in model.named_parameters()},
        training=model.training,
        had_peft_config=hasattr(model, "peft_config"),
    )
    lora_config = LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=linear_module_names(model)
        if cfg.target_modules == "all-linear"
        else cfg.target_modules,
        bias="none",
        task_type="CAUSAL_LM",
    )
    with torch.random.fork_rng(devices=rng_devices):
        torch.manual_seed(cfg.seed)  # LoRA init and dropout draw from the global generator
        order_rng = random.Random(cfg.seed)
        peft_model = get_peft_model(model, lora_config)  # injects into `model` in place
        try:
            metrics = _run(
                peft_model,
                examples,
                eval_examples,
                cfg,
                out,
                batch_size=batch_size,
                total_steps=total_steps,
                warmup_steps=warmup_steps,
                batches_per_epoch=batches_per_epoch,
                pad_id=pad_id,
                device=device,
                order_rng=order_rng,
                progress=progress,
                should_stop=should_stop,
            )
        finally:
            peft_model.unload()  # removes the LoRA layers without merging them
            if not restore.had_peft_config and hasattr(model, "peft_config"):
                del model.peft_config
            for name, param in model.named_parameters():
                param.requires_grad_(restore.requires_grad.get(name, param.requires_grad))
            model.train(restore.training)
    return metrics


def _sort_target_modules(path: Path) -> None:
    """peft stores target_modules as a set, so its order varies with the hash seed; sort it so one
    seed gives one byte-identical adapter folder."""
    config = json.loads(path.read_text())
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
        path.write_text(json.dumps(config, indent=2, sort_keys=True))


def _run(
    peft_model: Any,
    examples: list[Example],
    eval_examples: list[Example],
    cfg: LoraTrainConfig,
    out: Path,
    *,
    batch_size: int,
    total_steps: int,
    warmup_steps: int,
    batches_per_epoch: int,
    pad_id: int,
    device: torch.device,
    order_rng: random.Random,
    progress: Progress | None,
    should_stop: Callable[[], bool] | None,
) -> dict[str, Any]:
    params = [p for p in peft_model.parameters() if p.requires_grad]
    for p in params:
        # peft keeps adapters fp32 on a bf16 base; make sure, since AdamW in bf16 loses small updates
        if p.dtype != torch.float32:
            p.data = p.data.float()
    trainable = sum(p.numel() for p in params)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, warmup_steps, cfg.min_lr_ratio)
    )

    def batches():
        while True:  # epochs; each a fresh seeded shuffle
            order = list(range(len(examples)))
            order_rng.shuffle(order)
            for start in range(0, len(order), batch_size):
                yield [examples[i] for i in order[start : start + batch_size]]

    losses: list[float] = []
    tokens = label_tokens = 0
    started = last_report = time.monotonic()
    since_report: list[float] = []
    peft_model.train()
    log.info(
        "training LoRA r=%d on %d examples: %d steps, batch %d, %d trainable params, %s",
        cfg.rank,
        len(examples),
        total_steps,
        batch_size,
        trainable,
        device,
    )
    batch_iter = batches()
    for step in range(total_steps):
        if should_stop is not None and should_stop():
            raise TrainingCancelled(step, total_steps)
        batch = _collate(next(batch_iter), pad_id, device)
        result = peft_model(**batch, use_cache=False)
        loss = result.loss
        loss.backward()
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        value = float(loss.detach())
        losses.append(value)
        since_report.append(value)
        tokens += int(batch["attention_mask"].sum())
        label_tokens += int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        now = time.monotonic()
        done = step + 1
        if progress is not None and (
            done == 1 or done == total_steps or now - last_report >= cfg.progress_interval_s
        ):
            elapsed = max(now - started, 1e-9)
            progress(
                {
                    "step": done,
                    "total_steps": total_steps,
                    "epoch": done / batches_per_epoch,
                    "loss": sum(since_report) / len(since_report),
                    "lr": lr,
                    "tokens_per_s": tokens / elapsed,
                    "eta_s": elapsed / done * (total_steps - done),
                }
            )
            since_report.clear()
            last_report = now
    seconds = time.monotonic() - started

    peft_model.eval()
    eval_loss = base_eval_loss = None
    if eval_examples:
        eval_loss = _mean_loss(peft_model, eval_examples, cfg.eval_batch_size, pad_id)
        with peft_model.disable_adapter():
            base_eval_loss = _mean_loss(peft_model, eval_examples, cfg.eval_batch_size, pad_id)

    out.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(str(out))
    _sort_target_modules(out / "adapter_config.json")
    tail = losses[-batches_per_epoch:]
    metrics: dict[str, Any] = {
        "total_steps": total_steps,
        "epochs": total_steps / batches_per_epoch,
        "examples": len(examples),
        "truncated_examples": sum(e.truncated for e in examples),
        "trainable_params": trainable,
        "tokens": tokens,
        "label_tokens": label_tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds if seconds > 0 else 0.0,
        "final_loss": losses[-1],
        "final_epoch_loss": sum(tail) / len(tail),
        "losses": losses,
        "eval_loss": eval_loss,
        "base_eval_loss": base_eval_loss,
        "eval_examples": len(eval_examples),
        "device": str(device),
        "dtype": str(next(peft_model.parameters()).dtype).removeprefix("torch."),
        "config": asdict(cfg),
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    log.info("trained %d steps in %.1f s, final loss %.4f", total_steps, seconds, losses[-1])
    return metrics
