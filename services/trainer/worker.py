"""The train stage: a session's QA pairs -> a PEFT LoRA adapter in the store, with progress events,
checkpoints to resume from, an evaluation of base vs adapter on held-out pairs (written to
metrics.json and the session's TrainStats), cancellation within seconds, and the session READY at
the end.

A redelivered job (the previous trainer died) finds the last checkpoint of its round under
`keys.checkpoints(tenant, sid)` and continues from its step: same data split, same total steps,
same adapter as an uninterrupted run. The checkpoints are deleted once the adapter is stored or the
session is cancelled.

Rounds: each round of a session trains its own adapter (`adapter_id_for`), starting from
`Session.continue_from` when set (continued training, same LoRA shape) and from fresh LoRA weights
otherwise; the session switches to it when READY. A run whose round was replaced while it trained
stops and leaves the record to the newer round. Per-session options set the LoRA settings; qagen's
`split` marks choose the held-out pairs; `passages` trains RAFT-style (see passages.py).

Processes: the run trains in a thread of this process, or with `train_processes` > 1 as torchrun's
processes (launch.py, ddp.py): the same inputs, progress events, checkpoints and cancellation,
from the same code here; only the call that trains differs.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from doclora.v1 import events_pb2, session_pb2, trainer_pb2, trainer_pb2_grpc
from services.common import events, keys
from services.common.config import Settings
from services.common.errors import DocloraError, InvalidArgument, NotFound
from services.common.passages import read_session_passages
from services.common.qapair import read_pairs
from services.common.runtime import Runtime, StaleRound, check_round
from services.common.sessions import mark_stage
from services.trainer.exam import exam_sets, exam_stats

log = logging.getLogger(__name__)
S = session_pb2.SessionState
CANCEL_POLL_S = 1.0
# checkpoint every this many steps or seconds, whichever comes first (tests set them small)
CHECKPOINT_EVERY_STEPS = 50
CHECKPOINT_EVERY_S = 300.0
# held-out evaluation: qagen marks the held-out pairs (`qagen_eval_fraction` of them, whole chunks,
# sessions of `qagen_eval_min_pairs` or more); unmarked pairs are split here by the same settings.
# At most EVAL_MAX_PAIRS are scored, with answers of at most EVAL_MAX_NEW_TOKENS tokens: base and
# adapter each answer them, which on 2 CPU cores took longer than the training itself at 32 x 48
EVAL_MAX_PAIRS = 16
EVAL_MAX_NEW_TOKENS = 32


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


def adapter_id_for(sid: str, round: int) -> str:
    """The id of the adapter a session's `round` trains: the session id for round 0, then
    `{sid}-r{round}`, so a cache keyed by adapter id never serves an older round's weights."""
    return sid if round <= 0 else f"{sid}-r{round}"


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


def train_config(
    max_steps: int, system_prompt: str, overrides: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The LoraTrainConfig fields a session's run sets over the server settings (one place for the
    in-thread run and the several-process one, which gets them as ddp.py's `--config`)."""
    config: dict[str, Any] = {
        "system_prompt": system_prompt or None,
        "checkpoint_every_steps": CHECKPOINT_EVERY_STEPS,
        "checkpoint_every_s": CHECKPOINT_EVERY_S,
        "eval_max_pairs": EVAL_MAX_PAIRS,
        "eval_max_new_tokens": EVAL_MAX_NEW_TOKENS,
        **(overrides or {}),
    }
    if max_steps:
        config["max_steps"] = max_steps
    return config


def _train_blocking(
    settings,
    pairs,
    out_dir: Path,
    config: dict[str, Any],
    progress,
    should_stop,
    *,
    eval_pairs=None,
    resume=None,
    on_checkpoint=None,
    init_dir: Path | None = None,
    extra_evals=None,
):
    """One run in this process (call it in a thread); launch.train_in_processes takes the same
    arguments. `on_checkpoint(data, step)` gets each checkpoint serialised."""
    from services.trainer import checkpoint
    from services.trainer.adapter_io import read_adapter
    from services.trainer.config import LoraTrainConfig
    from services.trainer.loop import train_lora
    from services.trainer.quant import load_training_model

    model, tokenizer = load_training_model(settings)
    cfg = LoraTrainConfig.from_settings(settings, **config)
    init = read_adapter(init_dir) if init_dir is not None else None
    return train_lora(
        model,
        tokenizer,
        pairs,
        out_dir,
        cfg,
        progress=progress,
        should_stop=should_stop,
        eval_pairs=eval_pairs,
        resume=resume,
        on_checkpoint=(lambda state: on_checkpoint(checkpoint.to_bytes(state), state["step"]))
        if on_checkpoint is not None
        else None,
        init_adapter=init,
        extra_evals=extra_evals,
    )


def _fetch_adapter(rt: Runtime, tenant: str, adapter_id: str, folder: Path) -> Path | None:
    """Download a stored adapter to continue from; None when it is gone or was trained on another
    base model (its weights would not fit), so training starts from the base model instead."""
    prefix = keys.adapter_prefix(tenant, adapter_id)
    if not keys.is_valid_id(adapter_id):
        log.warning(
            "cannot continue from adapter %r: not a valid id; starting from the base model", adapter_id
        )
        return None
    rt.store.download_dir(prefix, folder)
    if not (folder / "adapter_config.json").is_file() or not (folder / "adapter_model.safetensors").is_file():
        log.warning(
            "adapter %s to continue from is not in the store; starting from the base model", adapter_id
        )
        return None
    try:
        base = json.loads((folder / "doclora.json").read_text()).get("base_model")
    except (OSError, ValueError):
        base = None
    if base and base != rt.settings.base_model:
        log.warning(
            "adapter %s was trained on %s, not %s; starting from the base model",
            adapter_id,
            base,
            rt.settings.base_model,
        )
        return None
    return folder


def precision_label(metrics: dict) -> str:
    """What TrainStats.precision shows: "bf16" (autocast or bf16 weights), "fp32", "fp16", or
    "nf4+bf16" style for a 4-bit base model with its compute dtype."""
    dtype = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
    compute = (
        "bf16" if metrics.get("precision") == "bf16-autocast" else dtype.get(metrics.get("dtype", ""), "")
    )
    quant = metrics.get("quantization")
    if quant:
        return f"{quant}+{compute}" if compute else str(quant)
    return compute or str(metrics.get("dtype", ""))


def train_stats(metrics: dict, seconds: float, started_from: str) -> session_pb2.TrainStats:
    """The session's TrainStats from a run's metrics (see loop.train_lora)."""
    stats = session_pb2.TrainStats(
        steps=int(metrics.get("steps", 0)),
        total_steps=int(metrics.get("total_steps", 0)),
        final_loss=float(metrics.get("final_loss", 0.0)),
        seconds=seconds,
        tokens=int(metrics.get("tokens", 0)),
        eval_count=int(metrics.get("eval_count") or 0),
        precision=precision_label(metrics),
        device=str(metrics.get("device", "")).split(":", 1)[0],
        started_from=started_from,
    )
    stats.eval_passages_count = int(metrics.get("eval_passages_count") or 0)
    for key in (
        "eval_base_f1", "eval_adapter_f1", "eval_base_em", "eval_adapter_em", "eval_loss",
        "eval_passages_base_f1", "eval_passages_adapter_f1", "eval_passages_base_em", "eval_passages_adapter_em",
    ):  # fmt: skip
        value = metrics.get(key)
        if value is not None and value == value:  # None or NaN: left unset
            setattr(stats, key, float(value))
    return stats


def _load_checkpoint(rt: Runtime, tenant: str, sid: str, round: int = 0) -> dict | None:
    """The last checkpoint of this session's training in `round`, or None (none, or unreadable)."""
    from services.trainer import checkpoint

    key = checkpoint_key(tenant, sid, round)
    try:
        data = rt.store.get_bytes(key)
    except NotFound:
        return None
    try:
        state = checkpoint.from_bytes(data)
    except Exception as exc:  # a corrupt or foreign object: start over rather than fail the session
        log.warning("ignoring unreadable checkpoint %s: %s", key, exc)
        return None
    log.info("found a checkpoint at step %s", state.get("step"))
    return state


async def train_session(rt: Runtime, item: events_pb2.WorkItem, rec: session_pb2.Session) -> None:
    from services.trainer.launch import process_count, train_in_processes
    from services.trainer.steps import TrainingCancelled

    started = time.monotonic()
    sid, tenant = item.session_id, item.tenant
    overrides = lora_overrides(rec.options)  # bad values fail the session before any work
    pairs = await rt.io(read_pairs, rt.store, tenant, sid)
    train_pairs, eval_pairs = split_for_eval(pairs, rt.settings)
    passage_counts = None
    session_passages = await rt.io(read_session_passages, rt.store, rec)
    k = rt.settings.retrieval_top_k
    extra_evals = exam_sets(pairs, session_passages, k=k)
    if passages_enabled(rec.options, rt.settings):
        from services.trainer.passages import raft_pairs, retrieved_pairs

        train_pairs, passage_counts = raft_pairs(
            train_pairs, session_passages, k=k, seed=rt.settings.train_seed
        )
        if session_passages and eval_pairs:  # the held-out questions also as chat asks them, open-book
            extra_evals["passages"] = retrieved_pairs(eval_pairs, session_passages, k=k)
        overrides["max_seq_len"] = max(overrides.get("max_seq_len", 0), PASSAGES_MIN_SEQ_LEN)
        log.info("training with passages: %s", passage_counts)
    # one adapter per round: a redelivered job rewrites the same keys, a later round gets new ones
    this_round = max(item.round, rec.round)
    adapter_id = adapter_id_for(sid, this_round)
    resume = await rt.io(_load_checkpoint, rt, tenant, sid, this_round)
    loop = asyncio.get_running_loop()
    superseded = False
    cancelled = threading.Event()
    last_progress: dict = {}

    def progress(p: dict) -> None:  # called from the training thread
        last_progress.update(p)
        events.progress_from_thread(
            loop,
            rt.bus,
            sid,
            session_pb2.STAGE_TRAIN,
            int(p.get("step", 0)),
            int(p.get("total_steps", 0)),
            f"step {p.get('step')}/{p.get('total_steps')} loss {p.get('loss', float('nan')):.4f}",
            loss=p.get("loss"),
            eta_s=p.get("eta_s"),
            learning_rate=p.get("lr"),
            tokens_per_s=p.get("tokens_per_s"),
            epoch=p.get("epoch"),
        )

    def save_checkpoint(data: bytes, step: int) -> None:  # called from the training thread; the store blocks
        try:
            rt.store.put_bytes(checkpoint_key(tenant, sid, this_round), data)
            log.info("checkpoint saved at step %d", step)
        except DocloraError as exc:  # training goes on; the next checkpoint may get through
            log.warning("checkpoint at step %d not saved: %s", step, exc)

    async def watch_cancel() -> None:
        while not cancelled.is_set():
            await asyncio.sleep(CANCEL_POLL_S)
            try:
                cur = await rt.sessions.get(sid)
            except NotFound:
                cancelled.set()
                return
            if cur.state in (S.SESSION_STATE_CANCELLED, S.SESSION_STATE_FAILED):
                cancelled.set()
            elif cur.round > this_round:  # a new round replaced this one: its work is wasted
                nonlocal superseded
                superseded = True
                cancelled.set()

    async def drop_own_checkpoint() -> None:  # only this round's: a later round's stays
        try:
            await rt.io(rt.store.delete, checkpoint_key(tenant, sid, this_round))
        except DocloraError as exc:
            log.warning("could not delete the checkpoint: %s", exc)

    async def drop_checkpoints(prefix: str) -> None:
        try:
            await rt.io(rt.store.delete_prefix, prefix)
        except DocloraError as exc:
            log.warning("could not delete the checkpoints: %s", exc)

    max_steps = rec.options.max_steps if rec.options.HasField("max_steps") else rt.settings.train_max_steps
    config = train_config(max_steps, rec.options.system_prompt, overrides)
    processes = process_count(rt.settings)
    # one process: in a thread here; more: torchrun's processes, watched from a thread (launch.py)
    trainer = _train_blocking if processes == 1 else functools.partial(train_in_processes, processes)
    watcher = asyncio.create_task(watch_cancel())
    try:
        with tempfile.TemporaryDirectory(prefix="doclora-train-") as tmp:
            out_dir = Path(tmp) / "adapter"
            init_dir = None
            if rec.continue_from:
                init_dir = await rt.io(_fetch_adapter, rt, tenant, rec.continue_from, Path(tmp) / "init")
            started_from = rec.continue_from if init_dir is not None else ""
            try:
                metrics = await asyncio.to_thread(
                    trainer,
                    rt.settings,
                    train_pairs,
                    out_dir,
                    config,
                    progress,
                    cancelled.is_set,
                    eval_pairs=eval_pairs,
                    resume=resume,
                    on_checkpoint=save_checkpoint,
                    init_dir=init_dir,
                    extra_evals=extra_evals,
                )
            except TrainingCancelled:
                if superseded:
                    log.info(
                        "training of round %d stopped: the session moved on to a later round", this_round
                    )
                    await drop_own_checkpoint()
                    return
                log.info("training cancelled")
                await drop_checkpoints(keys.checkpoints(tenant, sid))
                return
            if passage_counts is not None:
                metrics["passages"] = passage_counts
                (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
            meta = {
                "adapter_id": adapter_id,
                "session_id": sid,
                "base_model": rt.settings.base_model,
                "round": this_round,
                "started_from": started_from,
            }
            (out_dir / "doclora.json").write_text(json.dumps(meta))
            await rt.io(
                rt.store.upload_dir,
                keys.adapter_prefix(tenant, adapter_id),
                out_dir,
                last=["adapter_config.json"],
            )
    finally:
        cancelled.set()
        watcher.cancel()

    seconds = time.monotonic() - started
    metrics.setdefault("steps", last_progress.get("step", 0))
    metrics.setdefault("total_steps", last_progress.get("total_steps", 0))
    stats = train_stats(metrics, seconds, started_from)
    stats.exam.CopyFrom(exam_stats(metrics, pairs, rec.options.answer_mode or rt.settings.answer_mode))

    def ready(r):
        check_round(r, this_round)
        r.adapter_id = adapter_id
        r.continue_from = ""  # used up: a later round says again what it starts from
        r.train.CopyFrom(stats)
        mark_stage(r, session_pb2.STAGE_TRAIN, finished=True)

    await events.publish(
        rt.bus,
        sid,
        events_pb2.Event(finished=events_pb2.StageFinished(stage=session_pb2.STAGE_TRAIN, seconds=seconds)),
    )
    try:
        await rt.sessions.transition(
            sid, S.SESSION_STATE_READY, allowed_from={S.SESSION_STATE_TRAINING}, extra=ready
        )
    except StaleRound:
        log.info(
            "adapter %s stored, but the session moved on to a later round: not switching to it", adapter_id
        )
        await drop_own_checkpoint()
        return
    # after READY (a crash before it still finds them and resumes); older rounds' are stale too
    await drop_checkpoints(keys.checkpoints(tenant, sid))
    await drop_old_adapters(rt, tenant, sid, this_round)
    if metrics.get("eval_count"):
        log.info(
            "held-out eval on %d pairs: token-F1 base %.3f -> adapter %.3f, exact match %.3f -> %.3f",
            metrics["eval_count"],
            metrics["eval_base_f1"],
            metrics["eval_adapter_f1"],
            metrics["eval_base_em"],
            metrics["eval_adapter_em"],
        )
    log.info("adapter %s ready after %.1f s (%d steps)", adapter_id, seconds, stats.steps)


async def drop_old_adapters(rt: Runtime, tenant: str, sid: str, this_round: int) -> None:
    """Delete the adapters of a session's rounds before the previous one, once `this_round` is READY:
    chats and continued training read only the session's current adapter. The previous round's
    stays (an inference replica that read the record just before this READY may still be loading
    it); it goes when the next round is ready. Idempotent: rounds without an adapter cost a listing."""
    for old_round in range(this_round - 1):
        prefix = keys.adapter_prefix(tenant, adapter_id_for(sid, old_round))
        try:
            removed = await rt.io(rt.store.delete_prefix, prefix)
        except DocloraError as exc:  # left for the next round's clean-up
            log.warning("could not delete the old adapter %s: %s", prefix, exc)
            continue
        if removed:
            log.info("deleted the adapter of round %d (%d objects)", old_round, removed)


class TrainerServicer(trainer_pb2_grpc.TrainerServiceServicer):
    def __init__(self, rt: Runtime):
        self.rt = rt

    async def GetAdapter(self, request, context):
        if not keys.is_valid_id(request.adapter_id):
            raise NotFound(f"adapter {request.adapter_id!r} not found")
        prefix = keys.adapter_prefix(self.rt.settings.tenant, request.adapter_id)
        try:
            meta = await self.rt.io(self.rt.store.get_json, prefix + "doclora.json")
            metrics = await self.rt.io(self.rt.store.get_bytes, prefix + "metrics.json")
        except NotFound:
            raise NotFound(f"adapter {request.adapter_id!r} not found") from None
        return trainer_pb2.GetAdapterResponse(
            adapter=trainer_pb2.AdapterInfo(
                adapter_id=request.adapter_id,
                session_id=meta.get("session_id", ""),
                base_model=meta.get("base_model", ""),
                metrics_json=metrics.decode("utf-8"),
            )
        )
