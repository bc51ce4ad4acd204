"""The train stage: a session's QA pairs -> a PEFT LoRA adapter in the store, with progress events,
checkpoints to resume from, an evaluation of base vs adapter on held-out pairs, cancellation within
seconds, and the session READY at the end.

A redelivered job (the previous trainer died) finds the last checkpoint under
`keys.checkpoints(tenant, sid)` and continues from its step: same data split, same total steps,
same adapter as an uninterrupted run. The checkpoints are deleted once the adapter is stored or the
session is cancelled.
"""

from __future__ import annotations

import asyncio
import json
import logging
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

from doclora.v1 import events_pb2, session_pb2, trainer_pb2, trainer_pb2_grpc
from services.common import events, keys
from services.common.errors import DocloraError, NotFound
from services.common.runtime import Runtime
from services.common.sessions import mark_stage
from services.qagen.worker import load_pairs

log = logging.getLogger(__name__)
S = session_pb2.SessionState
CANCEL_POLL_S = 1.0
# checkpoint every this many steps or seconds, whichever comes first (tests set them small)
CHECKPOINT_EVERY_STEPS = 50
CHECKPOINT_EVERY_S = 300.0
# held-out evaluation: a share of the pairs, whole chunks at a time, only for sessions with at
# least EVAL_MIN_PAIRS pairs (smaller ones need every fact in training), scored on at most
# EVAL_MAX_PAIRS of them with answers of at most EVAL_MAX_NEW_TOKENS tokens
EVAL_FRACTION = 0.1
EVAL_MIN_PAIRS = 20
EVAL_MAX_PAIRS = 32
EVAL_MAX_NEW_TOKENS = 48


def checkpoint_key(tenant: str, sid: str) -> str:
    from services.trainer.checkpoint import STATE_FILE

    return keys.checkpoints(tenant, sid) + STATE_FILE


def split_for_eval(pairs: list[dict], seed: int) -> tuple[list[dict], list[dict]]:
    """(train, held out): whole chunks held out, or nothing for a small session."""
    if len(pairs) < EVAL_MIN_PAIRS:
        return pairs, []
    try:
        from services.qagen.quality import split_pairs
    except ImportError:
        from services.trainer.evaluate import split_by_chunk

        train, held = split_by_chunk(pairs, EVAL_FRACTION, seed)
        return list(train), list(held)
    # qagen's split reads QAPair attributes; stored pairs are dicts, some (uploaded) without ids
    views = [
        SimpleNamespace(
            pair_id=str(p.get("pair_id") or f"#{i}"),
            chunk_id=str(p.get("chunk_id") or ""),
            answer=str(p.get("answer") or ""),
            variant_of=str(p.get("variant_of") or ""),
            sources=tuple(p.get("sources") or ()),
            raw=p,
        )
        for i, p in enumerate(pairs)
    ]
    train, held = split_pairs(views, EVAL_FRACTION, seed)
    return [v.raw for v in train], [v.raw for v in held]


def _train_blocking(
    settings, pairs, out_dir: Path, max_steps: int, system_prompt: str, progress, should_stop,
    *, eval_pairs=None, resume=None, on_checkpoint=None,
):
    from services.common.model import load_base_model
    from services.trainer.lora import LoraTrainConfig, train_lora

    model, tokenizer = load_base_model(settings, for_training=True)
    cfg = LoraTrainConfig.from_settings(
        settings,
        system_prompt=system_prompt or None,
        checkpoint_every_steps=CHECKPOINT_EVERY_STEPS,
        checkpoint_every_s=CHECKPOINT_EVERY_S,
        eval_max_pairs=EVAL_MAX_PAIRS,
        eval_max_new_tokens=EVAL_MAX_NEW_TOKENS,
    )
    if max_steps:
        cfg.max_steps = max_steps
    return train_lora(
        model, tokenizer, pairs, out_dir, cfg, progress=progress, should_stop=should_stop,
        eval_pairs=eval_pairs, resume=resume, on_checkpoint=on_checkpoint,
    )


def _load_checkpoint(rt: Runtime, tenant: str, sid: str) -> dict | None:
    """The last checkpoint of this session's training, or None (none, or unreadable)."""
    from services.trainer import checkpoint

    key = checkpoint_key(tenant, sid)
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
    from services.trainer import checkpoint
    from services.trainer.lora import TrainingCancelled

    started = time.monotonic()
    sid, tenant = item.session_id, item.tenant
    pairs = await load_pairs(rt, tenant, sid)
    train_pairs, eval_pairs = split_for_eval(pairs, rt.settings.train_seed)
    resume = await rt.io(_load_checkpoint, rt, tenant, sid)
    loop = asyncio.get_running_loop()
    cancelled = threading.Event()
    last_progress: dict = {}

    def progress(p: dict) -> None:  # called from the training thread
        last_progress.update(p)
        fut = asyncio.run_coroutine_threadsafe(
            events.progress(
                rt.bus, sid, session_pb2.STAGE_TRAIN, int(p.get("step", 0)), int(p.get("total_steps", 0)),
                f"step {p.get('step')}/{p.get('total_steps')} loss {p.get('loss', float('nan')):.4f}",
                loss=p.get("loss"), eta_s=p.get("eta_s"), learning_rate=p.get("lr"),
                tokens_per_s=p.get("tokens_per_s"), epoch=p.get("epoch"),
            ),
            loop,
        )
        fut.add_done_callback(lambda f: f.exception() and log.warning("progress event lost: %s", f.exception()))

    def save_checkpoint(state: dict) -> None:  # called from the training thread; the store blocks
        try:
            rt.store.put_bytes(checkpoint_key(tenant, sid), checkpoint.to_bytes(state))
            log.info("checkpoint saved at step %d", state["step"])
        except DocloraError as exc:  # training goes on; the next checkpoint may get through
            log.warning("checkpoint at step %d not saved: %s", state["step"], exc)

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

    async def drop_checkpoints() -> None:
        try:
            await rt.io(rt.store.delete_prefix, keys.checkpoints(tenant, sid))
        except DocloraError as exc:
            log.warning("could not delete the checkpoints: %s", exc)

    max_steps = rec.options.max_steps if rec.options.HasField("max_steps") else rt.settings.train_max_steps
    watcher = asyncio.create_task(watch_cancel())
    try:
        with tempfile.TemporaryDirectory(prefix="doclora-train-") as tmp:
            out_dir = Path(tmp) / "adapter"
            try:
                metrics = await asyncio.to_thread(
                    _train_blocking, rt.settings, train_pairs, out_dir, max_steps, rec.options.system_prompt,
                    progress, cancelled.is_set,
                    eval_pairs=eval_pairs, resume=resume, on_checkpoint=save_checkpoint,
                )
            except TrainingCancelled:
                log.info("training cancelled")
                await drop_checkpoints()
                return
            adapter_id = sid  # one adapter per session: a redelivered job rewrites the same keys
            meta = {"adapter_id": adapter_id, "session_id": sid, "base_model": rt.settings.base_model}
            (out_dir / "doclora.json").write_text(json.dumps(meta))
            await rt.io(rt.store.upload_dir, keys.adapter_prefix(tenant, adapter_id), out_dir, last=["adapter_config.json"])
    finally:
        cancelled.set()
        watcher.cancel()

    seconds = time.monotonic() - started
    stats = session_pb2.TrainStats(
        steps=int(metrics.get("steps", last_progress.get("step", 0))),
        total_steps=int(metrics.get("total_steps", last_progress.get("total_steps", 0))),
        final_loss=float(metrics.get("final_loss", 0.0)),
        seconds=seconds,
        tokens=int(metrics.get("tokens", 0)),
    )

    def ready(r):
        r.adapter_id = adapter_id
        r.train.CopyFrom(stats)
        mark_stage(r, session_pb2.STAGE_TRAIN, finished=True)

    await events.publish(
        rt.bus, sid, events_pb2.Event(finished=events_pb2.StageFinished(stage=session_pb2.STAGE_TRAIN, seconds=seconds))
    )
    await rt.sessions.transition(sid, S.SESSION_STATE_READY, allowed_from={S.SESSION_STATE_TRAINING}, extra=ready)
    await drop_checkpoints()  # after READY: a crash before it still finds them and resumes
    if metrics.get("eval_count"):
        log.info(
            "held-out eval on %d pairs: token-F1 base %.3f -> adapter %.3f, exact match %.3f -> %.3f",
            metrics["eval_count"], metrics["eval_base_f1"], metrics["eval_adapter_f1"],
            metrics["eval_base_em"], metrics["eval_adapter_em"],
        )
    log.info("adapter %s ready after %.1f s (%d steps)", adapter_id, seconds, stats.steps)


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
