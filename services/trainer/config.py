"""What a LoRA run will do, decided before its first step: the hyperparameters (`LoraTrainConfig`,
filled in for the data size by `auto_config`), the precision and gradient checkpointing they
resolve to on a device, the learning-rate schedule, and the `RunPlan` that fixes one run's shape
(steps, batch, device, distributed world, checkpoint fingerprint).

No model is trained here; the loop (loop.py, steps.py) reads these.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from services.common.config import Settings
from services.common.errors import InvalidArgument
from services.trainer import checkpoint as ckpt
from services.trainer.packing import attention_kind

PRECISIONS = ("auto", "fp32", "bf16")


@dataclass
class LoraTrainConfig:
    """Hyperparameters. Fields left None are chosen from the number of examples by `auto_config`."""

    rank: int | None = None
    alpha: int | None = None  # None = 2 * rank
    dropout: float | None = None
    # "all-linear" = every nn.Linear but the output head (for Llama: q,k,v,o,gate,up,down)
    target_modules: str | list[str] = "all-linear"
    epochs: float | None = None
    # a few dozen pairs give ~5 batches an epoch: too few steps to learn their facts, so runs
    # derived from epochs take at least min_steps (measured: 20 pairs need ~50 steps at lr 1e-3)
    min_steps: int | None = None
    max_steps: int = 0  # > 0: exactly this many steps; 0 = max(min_steps, ceil(epochs * batches per epoch))
    # > 0, with steps derived (max_steps 0) in a one-process run: once BUDGET_PROBE_STEPS have shown
    # the step time, the run is shortened to the steps that fit in this many seconds (at least
    # BUDGET_MIN_STEPS), so a long document is READY in minutes on a CPU and a GPU takes many more
    time_budget_s: float = 0.0
    # 1e-3 suits the 135M default (2e-4 left 20 pairs unlearned after 50 steps); ~2e-4 for 7B models
    lr: float = 1e-3
    warmup_ratio: float = 0.1
    min_lr_ratio: float = 0.0  # cosine decays from lr to lr * min_lr_ratio
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    batch_size: int = 4  # examples per step, packed into one row
    max_seq_len: int = 512
    seed: int = 1234
    # None = the chat template's own default system prompt; inference must use the same value
    system_prompt: str | None = None
    # "auto": bf16 autocast on a CPU that multiplies bf16 natively (AMX / AVX-512 BF16), else the
    # model's own dtype (fp32 on CPU, bf16 on a CUDA GPU that has it); "fp32"; "bf16" (autocast)
    precision: str = "auto"
    progress_interval_s: float = 2.0
    eval_batch_size: int = 8
    # generation eval of base vs adapter on the held-out pairs: at most this many, this long
    eval_generate: bool = True
    # prompts per generate() call in that eval, batched by length: on 2 quiet CPU cores an exam set
    # of 16 prompts (11-784 tokens, 32 new) took 24.6 s in batches of 8 by length, 27.6 s of 4,
    # 38.1 s of 2, and 38.2 s in batches of 8 in the order given, the trainer before
    # (bench/bench_exam.py)
    eval_generate_batch_size: int = 8
    eval_max_pairs: int = 32
    eval_max_new_tokens: int = 48
    # on_checkpoint is called every this many steps / seconds (0 = never on that count)
    checkpoint_every_steps: int = 0
    checkpoint_every_s: float = 0.0
    # recompute activations in the backward pass instead of keeping them: "auto" = on CUDA for
    # models of at least GRADIENT_CHECKPOINTING_MIN_PARAMS parameters; "on"; "off"
    gradient_checkpointing: str = "auto"

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> LoraTrainConfig:
        """Defaults taken from the `DOCLORA_TRAIN_*` settings, then `overrides`.

        The rank and epochs settings left at their defaults mean "scaled to the data" (see
        `auto_config`); set to anything else they win. lr, seed and max_steps are taken as they are.
        """
        defaults = Settings()
        values: dict[str, Any] = {
            "max_steps": settings.train_max_steps,
            "time_budget_s": settings.train_time_budget_s,
            "lr": settings.train_lr,
            "seed": settings.train_seed,
        }
        if settings.train_lora_rank != defaults.train_lora_rank:
            values["rank"] = settings.train_lora_rank
            values["alpha"] = 2 * settings.train_lora_rank
        if settings.train_epochs != defaults.train_epochs:
            values["epochs"] = settings.train_epochs
        precision = settings.train_precision
        if precision:
            values["precision"] = precision
        checkpointing = settings.train_gradient_checkpointing
        if checkpointing:
            values["gradient_checkpointing"] = checkpointing
        values.update(overrides)
        return cls(**values)


# (fewer than this many examples, rank, dropout, epochs): more data needs more capacity and fewer
# passes, and starts to overfit without dropout; tiny sets are meant to be memorised. A heuristic:
# the small-data row is the one measured on the 135M default (see min_steps above).
AUTO_TABLE = (
    (200, 8, 0.0, 3.0),
    (2000, 16, 0.0, 3.0),
    (20000, 32, 0.05, 2.0),
    (math.inf, 64, 0.05, 1.0),
)
AUTO_MIN_STEPS = 50
# the time budget is applied after this many steps of a fresh run (the first is slower: allocation),
# and never shortens a run below BUDGET_MIN_STEPS
BUDGET_PROBE_STEPS = 3
BUDGET_MIN_STEPS = 10


def auto_config(cfg: LoraTrainConfig, n_examples: int) -> LoraTrainConfig:
    """A copy of `cfg` with every None field filled in for a data set of `n_examples` examples."""
    _, rank, dropout, epochs = next(row for row in AUTO_TABLE if n_examples < row[0])
    rank = cfg.rank if cfg.rank is not None else rank
    return replace(
        cfg,
        rank=rank,
        alpha=cfg.alpha if cfg.alpha is not None else 2 * rank,
        dropout=cfg.dropout if cfg.dropout is not None else dropout,
        epochs=cfg.epochs if cfg.epochs is not None else epochs,
        min_steps=cfg.min_steps if cfg.min_steps is not None else AUTO_MIN_STEPS,
    )


# a model this large on a GPU keeps enough activations to be worth recomputing (about 1B and up)
GRADIENT_CHECKPOINTING_MIN_PARAMS = 1_000_000_000
CHECKPOINTING_CHOICES = ("auto", "on", "off")


def use_gradient_checkpointing(choice: str, device: torch.device, n_params: int) -> bool:
    """Whether to recompute activations in backward: forced on/off, or "auto" (CUDA, large model)."""
    choice = (choice or "auto").strip().lower()
    if choice not in CHECKPOINTING_CHOICES:
        raise InvalidArgument(
            f"unknown gradient checkpointing choice {choice!r}: use one of {', '.join(CHECKPOINTING_CHOICES)}"
        )
    if choice != "auto":
        return choice == "on"
    return device.type == "cuda" and n_params >= GRADIENT_CHECKPOINTING_MIN_PARAMS


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AMX-BF16 or AVX-512 BF16), from /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"amx_bf16", "avx512_bf16"})
    except OSError:
        pass
    return False


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The dtype to autocast the forward pass to, or None for the model's own dtype."""
    precision = (precision or "auto").strip().lower()
    if precision not in PRECISIONS:
        raise InvalidArgument(f"unknown training precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return None  # CUDA: the model is loaded in bf16 already where the GPU has it


def forward_context(device: torch.device, dtype: torch.dtype | None):
    """Autocast to `dtype` (see `autocast_dtype`) around a forward pass, or nothing when None."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def warmup_steps(cfg: LoraTrainConfig, total_steps: int) -> int:
    """The linear warmup's length in steps for a run of `total_steps`."""
    return math.ceil(cfg.warmup_ratio * total_steps) if cfg.warmup_ratio > 0 else 0


def lr_factor(step: int, total_steps: int, warmup_steps: int, min_ratio: float = 0.0) -> float:
    """Multiplier of the peak lr for 0-based `step`: linear warmup, then cosine down to min_ratio."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class RunPlan:
    """The shape of one run, fixed before its first step."""

    batch_size: int
    total_steps: int
    warmup_steps: int
    batches_per_epoch: int
    device: torch.device
    amp: torch.dtype | None  # autocast dtype, None = the model's own
    kind: str  # how packed examples are kept apart (packing.attention_kind)
    run_id: str  # checkpoint fingerprint
    rng_devices: list[int]
    world_size: int = 1  # processes of a torch.distributed run, each taking a share of every batch
    rank: int = 0
    gradient_checkpointing: bool = False
    init_digest: str | None = None  # sha256 of the adapter the run started from
    time_budget_s: float = 0.0  # > 0: shorten the run to this many seconds of steps (see the config)

    @property
    def main(self) -> bool:
        """The process that reports, checkpoints, evaluates and writes the adapter."""
        return self.rank == 0


def plan_run(
    cfg: LoraTrainConfig,
    model: Any,
    examples: Sequence[Any],
    *,
    world_size: int,
    rank: int,
    init_digest: str | None,
) -> RunPlan:
    """The plan of a run of the resolved `cfg` (see `auto_config`) on `examples` with `model`, as
    process `rank` of `world_size`; `init_digest` is the adapter it continues from, if any."""
    batch_size = max(1, cfg.batch_size) * world_size
    batches_per_epoch = math.ceil(len(examples) / batch_size)
    if cfg.max_steps > 0:
        total_steps = cfg.max_steps
    else:
        total_steps = max(1, cfg.min_steps, math.ceil(cfg.epochs * batches_per_epoch))
    device = next(model.parameters()).device
    model_id = str(getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__)
    amp = autocast_dtype(cfg.precision, device)
    # "auto" precision may resolve differently on another replica: the resolved one counts
    run_key = f"{model_id}|{amp}"
    if init_digest is not None:
        run_key += f"|from:{init_digest}"
    if world_size > 1:
        run_key += f"|world:{world_size}"
    checkpointing = use_gradient_checkpointing(
        cfg.gradient_checkpointing, device, sum(p.numel() for p in model.parameters())
    )
    return RunPlan(
        batch_size=batch_size,
        total_steps=total_steps,
        warmup_steps=warmup_steps(cfg, total_steps),
        batches_per_epoch=batches_per_epoch,
        device=device,
        amp=amp,
        kind=attention_kind(model),
        run_id=ckpt.fingerprint(examples, asdict(cfg), total_steps, run_key),
        rng_devices=[device.index if device.index is not None else torch.cuda.current_device()]
        if device.type == "cuda"
        else [],
        world_size=world_size,
        rank=rank,
        gradient_checkpointing=checkpointing,
        init_digest=init_digest,
        # ranks that timed their own steps could disagree on the length: one-process runs only
        time_budget_s=cfg.time_budget_s if cfg.max_steps <= 0 and world_size == 1 else 0.0,
    )
