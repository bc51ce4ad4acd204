"""The train stage: a session's QA pairs -> a PEFT LoRA adapter in the store, with progress events,
checkpoints to resume from, an evaluation of base vs adapter on held-out pairs (written to
metrics.json and the session's TrainStats), cancellation within seconds, and the session READY at
the end.

A redelivered job (the previous trainer died) finds the last checkpoint of its round under
`keys.checkpoints(tenant, sid)` and continues from its step: same data split, same total steps,
same adapter as an uninterrupted run. The checkpoints are deleted once the adapter is stored or the
session is cancelled.

Rounds: each round of a session trains its own adapter (`keys.adapter_id_for`), starting from
`Session.continue_from` when set (continued training, same LoRA shape) and from fresh LoRA weights
otherwise; the session switches to it when READY. A run whose round was replaced while it trained
stops and leaves the record to the newer round. Per-session options set the LoRA settings; qagen's
`split` marks choose the held-out pairs; `passages` trains RAFT-style (see passages.py).

The handler reads in steps: `_prepare` (the job's data and plan.py's decisions), `_Run.train` (the
training, watched for cancellation), `_store_adapter`, `_finish` (stats, READY, clean-up), then
`_take_exam`: the bot's exam (exam.py) is taken after READY, so chat does not wait for it (on 2 CPU
cores it took longer than the 13-page harness document's training steps); the session's
`TrainStats.exam` says `pending` until its figures are in. A trainer that dies during the exam
leaves the work item unacknowledged: its redelivery finds the session READY with the exam pending
and takes the exam again (`resume_exam`) from the stored adapter.

Processes: the run trains in a thread of this process, or with `train_processes` > 1 as torchrun's
processes (launch.py, ddp.py): the same inputs, progress events, checkpoints and cancellation,
from the same code here; only the call that trains differs.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from doclora.v1 import events_pb2, session_pb2
from services.common import events, keys
from services.common.errors import DocloraError, NotFound, Unavailable
from services.common.options import answer_mode_name
from services.common.passages import read_session_passages
from services.common.qapair import read_pairs
from services.common.runtime import Runtime, StaleRound, check_round
from services.common.sessions import mark_stage
from services.trainer.exam import exam_sets, exam_stats, pending_exam
from services.trainer.plan import (
    PASSAGES_MIN_SEQ_LEN,
    checkpoint_key,
    lora_overrides,
    max_steps_for,
    passages_enabled,
    split_for_eval,
    train_config,
)
from services.trainer.stats import train_stats

log = logging.getLogger(__name__)
S = session_pb2.SessionState
CANCEL_POLL_S = 1.0
EXAM_THREAD_SHARE = 2  # the exam runs on 1/this of the CPU threads (see _exam_blocking)
LOW_PRIORITY = 19  # the exam's nice value


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
    from services.trainer.base_weights import load_training_model
    from services.trainer.config import LoraTrainConfig
    from services.trainer.loop import train_lora

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


def _exam_blocking(settings, adapter_dir: Path, sets, config: dict[str, Any], should_stop) -> dict[str, Any]:
    """The exam's sets answered by the base model and by the adapter in `adapter_dir` (call it in a
    thread): eval_{set}_* metrics (results.answer_sets). `TrainingCancelled` when `should_stop`."""
    import torch
    from peft import PeftModel

    from services.trainer.base_weights import load_training_model
    from services.trainer.config import LoraTrainConfig
    from services.trainer.results import answer_sets

    # the bot is READY and may be chatting on this machine: the exam runs at the lowest CPU
    # priority on half of the CPU threads, so chat keeps the cores (a READY bot's chats took 10-30 s
    # instead of about 3 while an exam ran beside them on all of 2 cores)
    def take() -> dict[str, Any]:
        threads = torch.get_num_threads()  # torch keeps the last count set for new threads: put back
        torch.set_num_threads(max(1, threads // EXAM_THREAD_SHARE))
        try:
            model, tokenizer = load_training_model(settings)
            cfg = LoraTrainConfig.from_settings(settings, **config)
            peft_model = PeftModel.from_pretrained(model, str(adapter_dir))
            return answer_sets(peft_model, tokenizer, sets, cfg, should_stop=should_stop)
        finally:
            torch.set_num_threads(threads)

    return at_low_priority(take)


def at_low_priority(fn: Callable[[], Any]) -> Any:
    """`fn()` in a thread of its own at the lowest CPU priority (nice 19; the OpenMP workers it
    starts inherit it), blocking until it ends; its result, or its exception raised here. A thread
    of its own, as a thread's nice value can only go up: a pool thread would keep it."""
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), LOW_PRIORITY)
        except OSError as exc:  # not allowed here: it runs at the normal priority
            log.debug("could not lower the priority: %s", exc)
        try:
            out["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            out["error"] = exc

    thread = threading.Thread(target=run, name="doclora-low-priority", daemon=True)
    thread.start()
    thread.join()
    if "error" in out:
        raise out["error"]
    return out["value"]


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


@dataclasses.dataclass
class _Job:
    """What one train job trains and where its outputs go, decided before any training."""

    sid: str
    tenant: str
    round: int
    adapter_id: str
    pairs: list[dict]  # all of the session's pairs (the exam reads them)
    train_pairs: list[dict]
    eval_pairs: list[dict]
    extra_evals: dict[str, list[dict]]  # answered by the training run (held-out pairs with passages)
    exam: dict[str, list[dict]]  # the exam's sets (exam.exam_sets), answered after READY
    passage_counts: dict | None  # RAFT-style runs: what the examples carry (into metrics.json)
    config: dict[str, Any]  # LoraTrainConfig fields over the server settings
    resume: dict | None  # the round's last checkpoint


async def _prepare(rt: Runtime, item: events_pb2.WorkItem, rec: session_pb2.Session) -> _Job:
    """Read the session's pairs, passages and checkpoint, and plan the run (plan.py)."""
    sid, tenant = item.session_id, item.tenant
    overrides = lora_overrides(rec.options)  # bad values fail the session before any work
    pairs = await rt.io(read_pairs, rt.store, tenant, sid)
    train_pairs, eval_pairs = split_for_eval(pairs, rt.settings)
    passage_counts = None
    session_passages = await rt.io(read_session_passages, rt.store, rec)
    k = rt.settings.retrieval_top_k
    exam = exam_sets(pairs, session_passages, k=k, quote=rt.settings.answer_quote_sentences)
    extra_evals: dict[str, list[dict]] = {}
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
    resume = await rt.io(_load_checkpoint, rt, tenant, sid, this_round)
    config = train_config(
        rt.settings, max_steps_for(rec.options, rt.settings), rec.options.system_prompt, overrides
    )
    return _Job(
        sid, tenant, this_round, keys.adapter_id_for(sid, this_round), pairs, train_pairs, eval_pairs,
        extra_evals, exam, passage_counts, config, resume,
    )  # fmt: skip


class _Run:
    """One attempt at a job: the training thread's callbacks (progress events, checkpoint uploads),
    the task that watches the session for cancellation or a newer round, and checkpoint clean-up."""

    def __init__(self, rt: Runtime, job: _Job):
        self.rt = rt
        self.job = job
        self.loop = asyncio.get_running_loop()
        self.cancelled = threading.Event()
        self.superseded = False  # a newer round replaced this one
        self.last_progress: dict = {}

    def progress(self, p: dict) -> None:  # called from the training thread
        self.last_progress.update(p)
        events.progress_from_thread(
            self.loop,
            self.rt.bus,
            self.job.tenant,
            self.job.sid,
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

    def save_checkpoint(self, data: bytes, step: int) -> None:
        """Called from the training thread; the store blocks."""
        try:
            self.rt.store.put_bytes(checkpoint_key(self.job.tenant, self.job.sid, self.job.round), data)
            log.info("checkpoint saved at step %d", step)
        except DocloraError as exc:  # training goes on; the next checkpoint may get through
            log.warning("checkpoint at step %d not saved: %s", step, exc)

    async def watch_cancel(self) -> None:
        while not self.cancelled.is_set():
            await asyncio.sleep(CANCEL_POLL_S)
            try:
                cur = await self.rt.sessions.get(self.job.sid)
            except NotFound:
                self.cancelled.set()
                return
            if cur.state in (S.SESSION_STATE_CANCELLED, S.SESSION_STATE_FAILED):
                self.cancelled.set()
            elif cur.round > self.job.round:  # a new round replaced this one: its work is wasted
                self.superseded = True
                self.cancelled.set()

    async def drop_own_checkpoint(self) -> None:  # only this round's: a later round's stays
        try:
            await self.rt.io(
                self.rt.store.delete, checkpoint_key(self.job.tenant, self.job.sid, self.job.round)
            )
        except DocloraError as exc:
            log.warning("could not delete the checkpoint: %s", exc)

    async def drop_checkpoints(self) -> None:  # every round's of the session
        try:
            await self.rt.io(self.rt.store.delete_prefix, keys.checkpoints(self.job.tenant, self.job.sid))
        except DocloraError as exc:
            log.warning("could not delete the checkpoints: %s", exc)

    async def train(self, out_dir: Path, init_dir: Path | None) -> dict | None:
        """The run's metrics, or None when it was cancelled or superseded (checkpoints dropped)."""
        from services.trainer.launch import process_count, train_in_processes
        from services.trainer.steps import TrainingCancelled

        processes = process_count(self.rt.settings)
        # one process: in a thread here; more: torchrun's processes, watched from a thread (launch.py)
        trainer = _train_blocking if processes == 1 else functools.partial(train_in_processes, processes)
        job = self.job
        try:
            return await asyncio.to_thread(
                trainer,
                self.rt.settings,
                job.train_pairs,
                out_dir,
                job.config,
                self.progress,
                self.cancelled.is_set,
                eval_pairs=job.eval_pairs,
                resume=job.resume,
                on_checkpoint=self.save_checkpoint,
                init_dir=init_dir,
                extra_evals=job.extra_evals,
            )
        except TrainingCancelled:
            if self.superseded:
                log.info("training of round %d stopped: the session moved on to a later round", job.round)
                await self.drop_own_checkpoint()
                return None
            log.info("training cancelled")
            await self.drop_checkpoints()
            return None


async def _store_adapter(rt: Runtime, job: _Job, out_dir: Path, metrics: dict, started_from: str) -> None:
    """The trained adapter folder, with its doclora.json, under the round's adapter id."""
    if job.passage_counts is not None:
        metrics["passages"] = job.passage_counts
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    meta = {
        "adapter_id": job.adapter_id,
        "session_id": job.sid,
        "base_model": rt.settings.base_model,
        "round": job.round,
        "started_from": started_from,
    }
    (out_dir / "doclora.json").write_text(json.dumps(meta))
    await rt.io(
        rt.store.upload_dir,
        keys.adapter_prefix(job.tenant, job.adapter_id),
        out_dir,
        last=["adapter_config.json"],
    )


@contextlib.asynccontextmanager
async def _watched(
    rt: Runtime, item: events_pb2.WorkItem, rec: session_pb2.Session, prefix: str
) -> AsyncIterator[tuple[_Run, Path]]:
    """The item's job (`_prepare`) as a run watched for cancellation, and a scratch folder, for
    the body; the watch ends (and the run counts as cancelled) on the way out."""
    run = _Run(rt, await _prepare(rt, item, rec))
    watcher = asyncio.create_task(run.watch_cancel())
    try:
        with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
            yield run, Path(tmp)
    finally:
        run.cancelled.set()
        watcher.cancel()


async def train_session(rt: Runtime, item: events_pb2.WorkItem, rec: session_pb2.Session) -> None:
    """The stage handler: prepare the job, train it (watched for cancellation), store the adapter,
    finish (stats, READY, clean-up), then take the exam. Cancelled or superseded runs return
    without an adapter."""
    started = time.monotonic()
    async with _watched(rt, item, rec, "doclora-train-") as (run, tmp):
        job = run.job
        out_dir = tmp / "adapter"
        init_dir = None
        if rec.continue_from:
            init_dir = await rt.io(_fetch_adapter, rt, job.tenant, rec.continue_from, tmp / "init")
        started_from = rec.continue_from if init_dir is not None else ""
        metrics = await run.train(out_dir, init_dir)
        if metrics is None:
            return
        await _store_adapter(rt, job, out_dir, metrics, started_from)
        seconds = time.monotonic() - started
        metrics.setdefault("steps", run.last_progress.get("step", 0))
        metrics.setdefault("total_steps", run.last_progress.get("total_steps", 0))
        stats = train_stats(metrics, seconds, started_from)
        stats.exam.CopyFrom(pending_exam(job.exam, rt.settings.train_eval_max_pairs))
        if await _finish(rt, run, stats, seconds, metrics):
            await _take_exam(rt, run, out_dir, metrics, _answer_mode(rt, rec))


def _answer_mode(rt: Runtime, rec: session_pb2.Session) -> str:
    return answer_mode_name(rec.options) or rt.settings.answer_mode


async def _take_exam(rt: Runtime, run: _Run, adapter_dir: Path, metrics: dict, mode: str) -> None:
    """The exam of a READY session's new adapter: its sets answered (stopped when the session is
    deleted or moves on to a later round), the answers added to the stored metrics.json, and the
    session's `TrainStats.exam` filled in (no longer pending). An exam that fails leaves the bot
    READY with no exam figures; a store or bus outage is raised, so the job is redelivered and
    `resume_exam` takes the exam again."""
    from services.trainer.steps import TrainingCancelled

    job = run.job
    if not job.exam:
        return
    started = time.monotonic()
    try:
        answers = await asyncio.to_thread(
            _exam_blocking, rt.settings, adapter_dir, job.exam, job.config, run.cancelled.is_set
        )
    except TrainingCancelled:
        log.info("exam of round %d stopped: the session was deleted or moved on", job.round)
        return
    except Unavailable:
        raise
    except Exception as exc:  # noqa: BLE001 - the bot is READY: it stays so, without exam figures
        log.warning("exam of adapter %s failed: %s", job.adapter_id, exc, exc_info=True)
        answers = {}
    exam = exam_stats(answers, job.pairs, mode)
    exam.seconds = time.monotonic() - started
    if answers:
        metrics.update(answers)
        body = json.dumps(metrics, indent=2).encode()
        await rt.io(
            rt.store.put_bytes, keys.adapter_prefix(job.tenant, job.adapter_id) + "metrics.json", body
        )

    def record(r: session_pb2.Session) -> None:
        if r.round != job.round or r.adapter_id != job.adapter_id:
            raise StaleRound(f"session {job.sid} moved on from adapter {job.adapter_id}")
        r.train.exam.CopyFrom(exam)

    try:
        await rt.sessions.update(job.sid, record)
    except (StaleRound, NotFound):
        log.info("exam of adapter %s not recorded: the session moved on or is gone", job.adapter_id)
        return
    log.info(
        "exam of adapter %s: %d reworded questions in %.1f s, %d missed in %s mode",
        job.adapter_id, exam.reworded, exam.seconds, exam.missed, exam.mode,
    )  # fmt: skip


async def resume_exam(rt: Runtime, item: events_pb2.WorkItem, rec: session_pb2.Session) -> None:
    """A redelivered job whose session is READY: take the exam again when the trainer that made
    the adapter died before the exam ended (`TrainStats.exam.pending`); otherwise nothing to do."""
    if not rec.train.exam.pending or rec.round != item.round or not rec.adapter_id:
        return
    log.info("taking the exam of adapter %s again (the last attempt did not end)", rec.adapter_id)
    async with _watched(rt, item, rec, "doclora-exam-") as (run, tmp):
        folder = tmp / "adapter"
        await rt.io(rt.store.download_dir, keys.adapter_prefix(run.job.tenant, rec.adapter_id), folder)
        try:
            metrics = json.loads((folder / "metrics.json").read_text())
        except (OSError, ValueError):
            metrics = {}
        await _take_exam(rt, run, folder, metrics, _answer_mode(rt, rec))


async def _finish(
    rt: Runtime, run: _Run, stats: session_pb2.TrainStats, seconds: float, metrics: dict
) -> bool:
    """Publish the stage's end, switch the session to the new adapter (READY), then drop the
    checkpoints and the adapters of older rounds. False when a later round took the session."""
    job = run.job

    def ready(r):
        check_round(r, job.round)
        r.adapter_id = job.adapter_id
        r.continue_from = ""  # used up: a later round says again what it starts from
        r.train.CopyFrom(stats)
        mark_stage(r, session_pb2.STAGE_TRAIN, finished=True)

    await events.publish(
        rt.bus,
        job.tenant,
        job.sid,
        events_pb2.Event(finished=events_pb2.StageFinished(stage=session_pb2.STAGE_TRAIN, seconds=seconds)),
    )
    try:
        await rt.sessions.transition(
            job.sid, S.SESSION_STATE_READY, allowed_from={S.SESSION_STATE_TRAINING}, extra=ready
        )
    except StaleRound:
        log.info(
            "adapter %s stored, but the session moved on to a later round: not switching to it",
            job.adapter_id,
        )
        await run.drop_own_checkpoint()
        return False
    # after READY (a crash before it still finds them and resumes); older rounds' are stale too
    await run.drop_checkpoints()
    await drop_old_adapters(rt, job.tenant, job.sid, job.round)
    if metrics.get("eval_count"):
        log.info(
            "held-out eval on %d pairs: token-F1 base %.3f -> adapter %.3f, exact match %.3f -> %.3f",
            metrics["eval_count"],
            metrics["eval_base_f1"],
            metrics["eval_adapter_f1"],
            metrics["eval_base_em"],
            metrics["eval_adapter_em"],
        )
    log.info("adapter %s ready after %.1f s (%d steps)", job.adapter_id, seconds, stats.steps)
    return True


async def drop_old_adapters(rt: Runtime, tenant: str, sid: str, this_round: int) -> None:
    """Delete the adapters of a session's rounds before the previous one, once `this_round` is READY:
    chats and continued training read only the session's current adapter. The previous round's
    stays (an inference replica that read the record just before this READY may still be loading
    it); it goes when the next round is ready. Idempotent: rounds without an adapter cost a listing."""
    for old_round in range(this_round - 1):
        prefix = keys.adapter_prefix(tenant, keys.adapter_id_for(sid, old_round))
        try:
            removed = await rt.io(rt.store.delete_prefix, prefix)
        except DocloraError as exc:  # left for the next round's clean-up
            log.warning("could not delete the old adapter %s: %s", prefix, exc)
            continue
        if removed:
            log.info("deleted the adapter of round %d (%d objects)", old_round, removed)
