"""What a session's training run will be, decided before any work: the LoRA settings its options
override, the held-out split, the LoraTrainConfig fields over the server settings, the id of the
adapter a round trains, and where a round's checkpoints go.

Pure functions of the session record and Settings: no I/O, no Runtime, no model. The same
decisions serve the in-thread run (worker.py) and the several-process one (ddp.py), so both train
on the same split with the same config.

Checkpoints come every `train_checkpoint_every_steps` steps or `train_checkpoint_every_s` seconds,
whichever comes first. Held-out evaluation: qagen marks the held-out pairs (`qagen_eval_fraction`
of them, whole chunks, sessions of `qagen_eval_min_pairs` or more); unmarked pairs are split here by
the same settings. At most `train_eval_max_pairs` are scored, with answers of at most
`train_eval_max_new_tokens` tokens: base and adapter each answer them, which on 2 CPU cores took
longer than the training itself at 32 x 48.
"""

from __future__ import annotations

from typing import Any

from doclora.v1 import session_pb2
from services.common import keys
from services.common.config import Settings
from services.common.errors import InvalidArgument

# RAFT-style examples carry up to PASSAGES_MAX_CHARS (~1,200 tokens) of whole passages before the question
PASSAGES_MIN_SEQ_LEN = 1536


def checkpoint_prefix(tenant: str, sid: str, round: int = 0) -> str:
    """Where a round's checkpoints go: its own folder after round 0, so a run of a round that was
    superseded never overwrites (or deletes) the checkpoint of the round that replaced it."""
    base = keys.checkpoints(tenant, sid)
    return base if round <= 0 else f"{base}round-{round}/"


def checkpoint_key(tenant: str, sid: str, round: int = 0) -> str:
    from services.trainer.checkpoint import STATE_FILE

    return checkpoint_prefix(tenant, sid, round) + STATE_FILE


def passages_enabled(options: session_pb2.SessionOptions, settings) -> bool:
    """The session's choice when it made one, else the server's `train_passages` setting."""
    if options.HasField("passages"):
        return options.passages
    return settings.train_passages


def lora_overrides(options: session_pb2.SessionOptions) -> dict[str, Any]:
    """LoraTrainConfig fields set by a session's options; InvalidArgument for values out of range."""
    out: dict[str, Any] = {}
    checks = (
        # option, config field, lowest, highest
        ("lora_rank", "rank", 1, 1024),
        ("lora_alpha", "alpha", 1e-6, 1e6),
        ("lora_dropout", "dropout", 0.0, 0.9),
        ("learning_rate", "lr", 1e-12, 1.0),
        ("epochs", "epochs", 1, 1000),
    )
    for option, name, low, high in checks:
        if not options.HasField(option):
            continue
        value = getattr(options, option)
        if not low <= value <= high:
            raise InvalidArgument(f"{option} must be between {low:g} and {high:g}, got {value:g}")
        out[name] = float(value) if name in ("epochs", "lr", "dropout") else value
    if "alpha" in out and float(out["alpha"]).is_integer():
        out["alpha"] = int(out["alpha"])
    if "epochs" in out:
        out["min_steps"] = 0  # asked for so many epochs: no floor on the steps they take
    return out


def split_for_eval(pairs: list[dict], settings: Settings) -> tuple[list[dict], list[dict]]:
    """(train, held out). Pairs marked by qagen (`"split": "train" | "eval" | "exam"`) keep their
    marks (unmarked ones train; exam pairs do neither, see exam.py); otherwise whole chunks are held
    out here, or nothing for a small session."""
    if any("split" in p for p in pairs):
        held = [p for p in pairs if p.get("split") == "eval"]
        train = [p for p in pairs if p.get("split") not in ("eval", "exam")]
        return (train, held) if train else (pairs, [])
    if len(pairs) < settings.qagen_eval_min_pairs:
        return pairs, []
    from services.trainer.evaluate import split_by_chunk

    train, held = split_by_chunk(pairs, settings.qagen_eval_fraction, settings.train_seed)
    return list(train), list(held)


def checkpoint_every(settings: Settings) -> dict[str, Any]:
    """The LoraTrainConfig fields of how often a run checkpoints (see the module docstring)."""
    return {
        "checkpoint_every_steps": settings.train_checkpoint_every_steps,
        "checkpoint_every_s": settings.train_checkpoint_every_s,
    }


def train_config(
    settings: Settings, max_steps: int, system_prompt: str, overrides: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The LoraTrainConfig fields a session's run sets over the server settings (one place for the
    in-thread run and the several-process one, which gets them as ddp.py's `--config`)."""
    config: dict[str, Any] = {
        "system_prompt": system_prompt or None,
        **checkpoint_every(settings),
        "eval_max_pairs": settings.train_eval_max_pairs,
        "eval_max_new_tokens": settings.train_eval_max_new_tokens,
        **(overrides or {}),
    }
    if max_steps:
        config["max_steps"] = max_steps
    return config


def max_steps_for(options: session_pb2.SessionOptions, settings: Settings) -> int:
    """The session's `max_steps` when it set one, else the server's (0 = derived from the data)."""
    return options.max_steps if options.HasField("max_steps") else settings.train_max_steps
