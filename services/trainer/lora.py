"""The LoRA training core: QA pairs -> chat-formatted examples -> a PEFT adapter folder.

No gRPC, NATS or object-store knowledge: the trainer worker loads the base model, calls
`train_lora`, and uploads `out_dir`. The loop is a plain torch loop (AdamW, linear warmup then
cosine decay) rather than `transformers.Trainer`: it is small, deterministic for a seed,
cancellable between steps, resumable from a checkpoint, and reports progress on our terms. Each
step's examples are packed into one row without padding (see packing.py), and the loss is taken on
the answer tokens only. After training, held-out pairs are answered by the base model and by the
adapter, and both are scored (see evaluate.py).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import random
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from services.common.config import Settings
from services.common.errors import InvalidArgument
from services.trainer import checkpoint as ckpt
from services.trainer.packing import IGNORE_INDEX, attention_kind, pack, packed_loss

log = logging.getLogger(__name__)

Progress = Callable[[dict[str, Any]], None]
OnCheckpoint = Callable[[dict[str, Any]], None]
PRECISIONS = ("auto", "fp32", "bf16")


class TrainingCancelled(Exception):
    """`should_stop()` returned True; nothing usable was written to out_dir."""

    def __init__(self, step: int, total_steps: int):
        super().__init__(f"training cancelled at step {step}/{total_steps}")
        self.step = step
        self.total_steps = total_steps


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


def step_batches(n_examples: int, batch_size: int, seed: int) -> Iterator[list[int]]:
    """Example indices of each step, forever: every epoch a fresh shuffle drawn from `seed`.

    A pure function of its arguments, so a resumed run gets its next batches by skipping the ones
    already done.
    """
    rng = random.Random(seed)
    while True:
        order = list(range(n_examples))
        rng.shuffle(order)
        for start in range(0, n_examples, batch_size):
            yield order[start : start + batch_size]


def _warmup(cfg: LoraTrainConfig, total_steps: int) -> int:
    return math.ceil(cfg.warmup_ratio * total_steps) if cfg.warmup_ratio > 0 else 0


def lr_factor(step: int, total_steps: int, warmup_steps: int, min_ratio: float = 0.0) -> float:
    """Multiplier of the peak lr for 0-based `step`: linear warmup, then cosine down to min_ratio."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _forward_context(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


@torch.no_grad()
def _mean_loss(
    model: Any, examples: Sequence[Example], batch_size: int, kind: str, amp: torch.dtype | None
) -> float:
    """Token-weighted mean answer loss over `examples`, packed `batch_size` at a time."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = pack(examples[start : start + batch_size], kind=kind, device=device)
        if batch.label_tokens == 0:
            continue
        with _forward_context(device, amp):
            loss = packed_loss(model, batch)
        total += float(loss) * batch.label_tokens
        count += batch.label_tokens
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


@dataclass(frozen=True)
class _Plan:
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


@dataclass(frozen=True)
class InitAdapter:
    """A stored PEFT adapter a run starts from instead of freshly initialised LoRA weights."""

    rank: int
    alpha: float
    target_modules: list[str]
    weights: dict[str, torch.Tensor]
    digest: str  # sha256 of the weights file: part of the checkpoint fingerprint


def read_adapter(folder: str | Path) -> InitAdapter:
    """Read a PEFT LoRA folder (adapter_config.json + adapter_model.safetensors) to continue from."""
    import hashlib

    from safetensors.torch import load_file

    folder = Path(folder)
    try:
        config = json.loads((folder / "adapter_config.json").read_text())
        data = (folder / "adapter_model.safetensors").read_bytes()
    except (OSError, ValueError) as exc:
        raise InvalidArgument(f"not a PEFT adapter folder: {exc}") from exc
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise InvalidArgument(f"can only continue from a LoRA adapter, not {config.get('peft_type')}")
    targets = config.get("target_modules")
    if isinstance(targets, str):
        targets = [targets]
    weights = load_file(str(folder / "adapter_model.safetensors"))
    return InitAdapter(
        rank=int(config["r"]),
        alpha=float(config.get("lora_alpha") or config["r"]),
        target_modules=sorted(targets or []),
        weights=weights,
        digest=hashlib.sha256(data).hexdigest(),
    )


def _distributed() -> tuple[int, int]:
    """(world size, rank) of the torch.distributed group this process is in, (1, 0) when none."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


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
    `TrainingCancelled`. `eval_pairs`, when given, get a validation loss and are answered by the
    base model and by the adapter (greedy), scored by token-F1 and exact match (eval_* metrics).
    `extra_evals` {name: pairs} are answered and scored the same way (no loss), as eval_{name}_*
    metrics: e.g. the held-out questions with retrieved passages before them.

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

    `init_adapter` (see `read_adapter`): start from that adapter's weights, with its rank, alpha
    and target modules, rather than from a fresh LoRA initialisation (continued training).

    Under torch.distributed (e.g. launched by torchrun, see ddp.py) every process calls this with
    the same pairs and config and a model on its own device: each step's batch is
    `cfg.batch_size` examples per process, split between them, and the summed gradients are
    all-reduced, so N processes take the step one process would take on the N-times larger batch.
    Only rank 0 reports progress, checkpoints, evaluates and writes `out_dir`. `should_stop` is
    agreed between the processes before every step (any one True stops them all at that step).
    To resume, every process passes the same `resume` state (rank 0's checkpoint: the processes
    hold the same weights, optimizer and counts, and draw dropout per step, see `_step_seed`); it
    matches only a run with the same number of processes (the global batch depends on it).
    """
    from peft import LoraConfig, PeftModel, get_peft_model

    cfg = cfg or LoraTrainConfig()
    if isinstance(model, PeftModel):
        raise InvalidArgument("train_lora wants a plain base model, not a PeftModel")
    out = Path(out_dir)
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

    world_size, rank = _distributed()
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
    if init_adapter is not None:
        run_key += f"|from:{init_adapter.digest}"
    if world_size > 1:
        run_key += f"|world:{world_size}"
    checkpointing = use_gradient_checkpointing(
        cfg.gradient_checkpointing, device, sum(p.numel() for p in model.parameters())
    )
    plan = _Plan(
        batch_size=batch_size,
        total_steps=total_steps,
        warmup_steps=_warmup(cfg, total_steps),
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
        init_digest=init_adapter.digest if init_adapter is not None else None,
        # ranks that timed their own steps could disagree on the length: one-process runs only
        time_budget_s=cfg.time_budget_s if cfg.max_steps <= 0 and world_size == 1 else 0.0,
    )
    if resume is not None and resume.get("fingerprint") != plan.run_id:
        log.warning(
            "ignoring a checkpoint of another run (other data, settings or model): starting at step 0"
        )
        resume = None

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
    was_checkpointing = any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())
    with torch.random.fork_rng(devices=plan.rng_devices):
        torch.manual_seed(cfg.seed)  # LoRA init and dropout draw from the global generator
        peft_model = get_peft_model(model, lora_config)  # injects into `model` in place
        try:
            if init_adapter is not None:
                _load_init_adapter(peft_model, init_adapter)
            if checkpointing and not was_checkpointing:
                _set_checkpointing(model, True)
            metrics = _run(
                peft_model,
                tokenizer,
                examples,
                eval_examples,
                list(eval_pairs or []),
                cfg,
                out,
                plan,
                progress=progress,
                should_stop=should_stop,
                resume=resume,
                on_checkpoint=on_checkpoint,
                extra_evals=extra_evals,
            )
        finally:
            if checkpointing and not was_checkpointing:
                _set_checkpointing(model, False)
            peft_model.unload()  # removes the LoRA layers without merging them
            if not restore.had_peft_config and hasattr(model, "peft_config"):
                del model.peft_config
            for name, param in model.named_parameters():
                param.requires_grad_(restore.requires_grad.get(name, param.requires_grad))
            model.train(restore.training)
    return metrics


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


def _load_init_adapter(peft_model: Any, init: InitAdapter) -> None:
    """Copy a stored adapter's weights into the freshly injected LoRA layers (same shape)."""
    from peft import set_peft_model_state_dict

    expected = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    try:
        result = set_peft_model_state_dict(peft_model, init.weights)
    except RuntimeError as exc:  # a size mismatch: another base model, or another rank
        raise InvalidArgument(f"the adapter to continue from does not fit this model: {exc}") from exc
    missing = expected & set(getattr(result, "missing_keys", ()) or ())
    if missing or getattr(result, "unexpected_keys", None):
        raise InvalidArgument(
            "the adapter to continue from does not fit this model: "
            f"{len(missing)} LoRA weights missing, {len(result.unexpected_keys or ())} unknown"
        )


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


def _distributed_step(
    peft_model: Any, examples: list[Example], params: list[torch.Tensor], plan: _Plan
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
            with _forward_context(plan.device, plan.amp):
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


def _stop_agreed(should_stop: Callable[[], bool] | None, plan: _Plan) -> bool:
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


def _step_seed(seed: int, rank: int, step: int) -> int:
    """The seed of one process's random draws (dropout) in one step of a distributed run."""
    return random.Random(f"{seed}:{rank}:{step}").getrandbits(63)


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


def _sort_target_modules(path: Path) -> None:
    """peft stores target_modules as a set, so its order varies with the hash seed; sort it so one
    seed gives one byte-identical adapter folder."""
    config = json.loads(path.read_text())
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
        path.write_text(json.dumps(config, indent=2, sort_keys=True))


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


def _run(
    peft_model: Any,
    tokenizer: Any,
    examples: list[Example],
    eval_examples: list[Example],
    eval_pairs: list[Mapping[str, Any]],
    cfg: LoraTrainConfig,
    out: Path,
    plan: _Plan,
    *,
    progress: Progress | None,
    should_stop: Callable[[], bool] | None,
    resume: Mapping[str, Any] | None,
    on_checkpoint: OnCheckpoint | None,
    extra_evals: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
) -> dict[str, Any]:
    from services.trainer.evaluate import evaluate_adapter

    named = [(n, p) for n, p in peft_model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    for p in params:
        # peft keeps adapters fp32 on a bf16 base; make sure, since AdamW in bf16 loses small updates
        if p.dtype != torch.float32:
            p.data = p.data.float()
    trainable = sum(p.numel() for p in params)
    total_steps = plan.total_steps
    if resume is not None:  # a run shortened by its time budget resumes at its chosen length
        total_steps = int(resume.get("total_steps") or total_steps)
    warmup_steps = _warmup(cfg, total_steps) if total_steps != plan.total_steps else plan.warmup_steps
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    # reads total_steps and warmup_steps at each step: the time budget may shorten the run
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, warmup_steps, cfg.min_lr_ratio)
    )

    losses: list[float] = []
    tokens = label_tokens = computed_tokens = 0
    prior_seconds = 0.0
    start_step = 0
    if resume is not None:
        start_step = min(int(resume["step"]), total_steps)
        with torch.no_grad():
            for name, p in named:
                p.copy_(resume["adapter"][name].to(p.device))
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        torch.set_rng_state(resume["torch_rng"])
        for index, state in zip(plan.rng_devices, resume.get("cuda_rng") or [], strict=False):
            torch.cuda.set_rng_state(state, index)
        losses = [float(x) for x in resume["losses"]]
        tokens, label_tokens = int(resume["tokens"]), int(resume["label_tokens"])
        computed_tokens = int(resume.get("computed_tokens", 0))
        prior_seconds = float(resume["seconds"])
        log.info("resuming LoRA training at step %d/%d", start_step, total_steps)

    def state(step: int) -> dict[str, Any]:
        return {
            "version": ckpt.VERSION,
            "fingerprint": plan.run_id,
            "step": step,
            "total_steps": total_steps,
            "adapter": {name: p.detach().to("cpu", copy=True) for name, p in named},
            "optimizer": _to_cpu(optimizer.state_dict()),
            "scheduler": _to_cpu(scheduler.state_dict()),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": [torch.cuda.get_rng_state(i) for i in plan.rng_devices],
            "losses": list(losses),
            "tokens": tokens,
            "label_tokens": label_tokens,
            "computed_tokens": computed_tokens,
            "seconds": prior_seconds + time.monotonic() - started,
        }

    batch_iter = step_batches(len(examples), plan.batch_size, cfg.seed)
    for _ in range(start_step):  # the batches the interrupted run already took
        next(batch_iter)
    run_tokens = 0
    started = last_report = last_checkpoint = time.monotonic()
    last_checkpoint_step = start_step
    since_report: list[float] = []
    peft_model.train()
    log.info(
        "training LoRA r=%d on %d examples: %d steps, batch %d (packed), %d trainable params, %s%s",
        cfg.rank,
        len(examples),
        total_steps,
        plan.batch_size,
        trainable,
        plan.device,
        " bf16 autocast" if plan.amp is not None else "",
    )
    budget = _StepBudget(plan.time_budget_s if start_step == 0 else 0.0)
    for step in itertools.count(start_step):
        if step >= total_steps:
            break
        if (fits := budget.shortened(step, total_steps)) is not None:
            total_steps, warmup_steps = fits, min(warmup_steps, _warmup(cfg, fits))
        if _stop_agreed(should_stop, plan):
            raise TrainingCancelled(step, total_steps)
        if plan.world_size > 1:
            # each process's dropout masks come from its own (seed, rank, step) stream, not from a
            # generator carried over from step 0: so rank 0's checkpoint resumes every process
            torch.manual_seed(_step_seed(cfg.seed, plan.rank, step))
        indices = next(batch_iter)
        if plan.world_size == 1:
            batch = pack([examples[i] for i in indices], kind=plan.kind, device=plan.device)
            with _forward_context(plan.device, plan.amp):
                loss = packed_loss(peft_model, batch)
            loss.backward()
            value = float(loss.detach())
            step_tokens, step_computed, step_labels = batch.example_tokens, batch.tokens, batch.label_tokens
        else:
            value, step_tokens, step_computed, step_labels = _distributed_step(
                peft_model, [examples[i] for i in indices[plan.rank :: plan.world_size]], params, plan
            )
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        losses.append(value)
        since_report.append(value)
        tokens += step_tokens
        run_tokens += step_tokens
        computed_tokens += step_computed
        label_tokens += step_labels
        now = time.monotonic()
        done = step + 1
        if not plan.main:
            continue
        if progress is not None and (
            done == start_step + 1 or done == total_steps or now - last_report >= cfg.progress_interval_s
        ):
            elapsed = max(now - started, 1e-9)
            progress(
                {
                    "step": done,
                    "total_steps": total_steps,
                    "epoch": done / plan.batches_per_epoch,
                    "loss": sum(since_report) / len(since_report),
                    "lr": lr,
                    "tokens_per_s": run_tokens / elapsed,
                    "eta_s": elapsed / (done - start_step) * (total_steps - done),
                }
            )
            since_report.clear()
            last_report = now
        if on_checkpoint is not None and done < total_steps:
            every_steps, every_s = cfg.checkpoint_every_steps, cfg.checkpoint_every_s
            if (every_steps > 0 and done - last_checkpoint_step >= every_steps) or (
                every_s > 0 and now - last_checkpoint >= every_s
            ):
                on_checkpoint(state(done))
                last_checkpoint_step, last_checkpoint = done, time.monotonic()
    run_seconds = time.monotonic() - started
    seconds = prior_seconds + run_seconds
    if not plan.main:  # rank 0 evaluates and writes the adapter; the others are done
        return {"steps": len(losses), "total_steps": total_steps, "losses": losses, "rank": plan.rank}

    peft_model.eval()
    eval_loss = base_eval_loss = None
    if eval_examples:
        eval_loss = _mean_loss(peft_model, eval_examples, cfg.eval_batch_size, plan.kind, plan.amp)
        with peft_model.disable_adapter():
            base_eval_loss = _mean_loss(peft_model, eval_examples, cfg.eval_batch_size, plan.kind, plan.amp)
    answers: dict[str, Any] = {}
    eval_started = time.monotonic()
    sets = {"": eval_pairs, **{name: list(ps) for name, ps in (extra_evals or {}).items()}}
    for name, set_pairs in sets.items():
        if not set_pairs or not cfg.eval_generate:
            continue
        # fp32 like the inference service on a CPU, whatever precision trained the adapter
        scored = evaluate_adapter(
            peft_model,
            tokenizer,
            set_pairs,
            system_prompt=cfg.system_prompt,
            max_pairs=cfg.eval_max_pairs,
            max_new_tokens=cfg.eval_max_new_tokens,
            batch_size=cfg.eval_batch_size,
            should_stop=should_stop,
        )
        if should_stop is not None and should_stop():
            raise TrainingCancelled(total_steps, total_steps)
        answers.update({k.replace("eval_", f"eval_{name}_", 1) if name else k: v for k, v in scored.items()})
        answers["eval_seconds"] = time.monotonic() - eval_started

    out.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(str(out))
    _sort_target_modules(out / "adapter_config.json")
    tail = losses[-plan.batches_per_epoch :]
    metrics: dict[str, Any] = {
        "steps": len(losses),
        "total_steps": total_steps,
        "resumed_from_step": start_step,
        "epochs": total_steps / plan.batches_per_epoch,
        "examples": len(examples),
        "truncated_examples": sum(e.truncated for e in examples),
        "trainable_params": trainable,
        "tokens": tokens,
        "label_tokens": label_tokens,
        # tokens the model ran: fewer than `tokens`, as each step's shared prompt prefix runs once
        "computed_tokens": computed_tokens,
        "seconds": seconds,
        "tokens_per_s": run_tokens / run_seconds if run_seconds > 0 else 0.0,
        "final_loss": losses[-1],
        "final_epoch_loss": sum(tail) / len(tail),
        "losses": losses,
        "eval_loss": eval_loss,
        "base_eval_loss": base_eval_loss,
        "eval_examples": len(eval_examples),
        **answers,
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
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    log.info("trained %d steps in %.1f s, final loss %.4f", total_steps, seconds, losses[-1])
    return metrics
