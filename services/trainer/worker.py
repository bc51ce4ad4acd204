"""The train stage: a session's QA pairs -> a PEFT LoRA adapter in the store, with progress events,
cancellation within seconds, and the session READY at the end."""

from __future__ import annotations

import asyncio
import json
import logging
import tempfile
import threading
import time
from pathlib import Path

from doclora.v1 import events_pb2, session_pb2, trainer_pb2, trainer_pb2_grpc
from services.common import events, keys
from services.common.errors import NotFound
from services.common.runtime import Runtime
from services.common.sessions import mark_stage
from services.qagen.worker import load_pairs

log = logging.getLogger(__name__)
S = session_pb2.SessionState
CANCEL_POLL_S = 1.0


def _train_blocking(settings, pairs, out_dir: Path, max_steps: int, system_prompt: str, progress, should_stop):
    from services.common.model import load_base_model
    from services.trainer.lora import LoraTrainConfig, train_lora

    model, tokenizer = load_base_model(settings, for_training=True)
    cfg = LoraTrainConfig.from_settings(settings, system_prompt=system_prompt or None)
    if max_steps:
        cfg.max_steps = max_steps
    return train_lora(model, tokenizer, pairs, out_dir, cfg, progress=progress, should_stop=should_stop)


async def train_session(rt: Runtime, item: events_pb2.WorkItem, rec: session_pb2.Session) -> None:
    from services.trainer.lora import TrainingCancelled

    started = time.monotonic()
    sid, tenant = item.session_id, item.tenant
    pairs = await load_pairs(rt, tenant, sid)
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

    max_steps = rec.options.max_steps if rec.options.HasField("max_steps") else rt.settings.train_max_steps
    watcher = asyncio.create_task(watch_cancel())
    try:
        with tempfile.TemporaryDirectory(prefix="doclora-train-") as tmp:
            out_dir = Path(tmp) / "adapter"
            try:
                metrics = await asyncio.to_thread(
                    _train_blocking, rt.settings, pairs, out_dir, max_steps, rec.options.system_prompt,
                    progress, cancelled.is_set,
                )
            except TrainingCancelled:
                log.info("training cancelled")
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
