"""The qagen stage: each ready document's text -> token-aware chunks -> grounded QA pairs from the
session's generator (extractive, local model or OpenAI-compatible endpoint), checked by the quality
gate, with a held-out split marked, written to the store as `chunks.jsonl` and `qa/pairs.jsonl`.

Documents are done one at a time and the files are written after each, with `qa/state.json` saying
which documents are done and which of their chunks failed. A redelivered job (the worker died) or a
later round (sources were added) therefore generates only what is missing: done documents keep
their pairs as they are, edits by people included, and a document with failed chunks is generated
again with its earlier pairs passed as `previous`, so only the failed chunks are asked again.

Here the stage's steps (`generate_session`); the stored state and how a document changes it in
`qa_state.py`, the backend a session asks for in `backends/factory.py`, one document's generation
and checks in `pipeline.py`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable

from doclora.v1 import events_pb2, session_pb2
from services.common import events, keys
from services.common.config import Settings
from services.common.errors import FailedPrecondition, InvalidArgument, NotFound
from services.common.jsonl import from_jsonl
from services.common.options import qa_backend_name, strategy_names
from services.common.qapair import QAPair, read_pairs
from services.common.runtime import Runtime
from services.common.sessions import mark_stage
from services.qagen import quality
from services.qagen.backends.factory import make_generator
from services.qagen.chunk import Chunk, LengthFn, token_length
from services.qagen.extractive import chunk_document
from services.qagen.pipeline import generate_document
from services.qagen.qa_state import QAState

log = logging.getLogger(__name__)
D = session_pb2.DocumentStatus
S = session_pb2.SessionState
PROGRESS_EVERY_S = 0.5
MAX_FAILURES_SHOWN = 5


async def load_pairs(rt: Runtime, tenant: str, sid: str) -> list[dict]:
    """The session's pairs, or FAILED_PRECONDITION when none were generated yet."""
    return await rt.io(read_pairs, rt.store, tenant, sid)


@functools.lru_cache(maxsize=2)
def _length_fn(settings: Settings) -> Callable[[str], int] | None:
    """Token counts with the base model's tokenizer, or None (characters) where it cannot load,
    e.g. in a qagen image without torch to convert the bundled model."""
    if settings.qagen_chunk_tokens <= 0:
        return None
    try:
        from services.common.model import load_tokenizer, resolve_base_model

        return token_length(load_tokenizer(resolve_base_model(settings)))
    except Exception as exc:  # any failure here only costs the token-exact sizes
        log.warning("chunking by characters: the base model's tokenizer did not load (%s)", exc)
        return None


class _Progress:
    """Chunk progress from the generating thread to the event stream, at most every half second."""

    def __init__(self, rt: Runtime, tenant: str, sid: str, total: int, loop: asyncio.AbstractEventLoop):
        self.rt, self.tenant, self.sid, self.total, self.loop = rt, tenant, sid, total, loop
        self.offset = 0
        self.last = 0.0

    def __call__(self, done: int, _total: int) -> None:
        now = time.monotonic()
        n = self.offset + done
        if n < self.total and now - self.last < PROGRESS_EVERY_S:
            return
        self.last = now
        events.progress_from_thread(
            self.loop,
            self.rt.bus,
            self.tenant,
            self.sid,
            session_pb2.STAGE_QAGEN,
            n,
            self.total,
            f"{n}/{self.total} chunks",
        )


async def generate_session(rt: Runtime, item: events_pb2.WorkItem, rec: session_pb2.Session) -> None:
    """The qagen stage for one session: chunk the documents still to do, generate and store their
    pairs one document at a time, mark the split and the exam, record the stats on the session, then
    hand on to training (or wait for review). INVALID_ARGUMENT when too few pairs came out,
    FAILED_PRECONDITION when chunks failed and the session does not allow a partial set."""
    started = time.monotonic()
    sid, tenant, settings = item.session_id, item.tenant, rt.settings
    docs = [d for d in rec.documents if d.status == D.DOCUMENT_STATUS_READY]
    qa = await QAState.read(rt, tenant, sid)
    todo = [d for d in docs if d.doc_id not in qa.done or d.doc_id in qa.failed]
    length_fn = (
        await rt.io(_length_fn, settings) if any(not d.format.startswith("qa_") for d in todo) else None
    )
    plan = await _chunk_all(rt, tenant, sid, todo, length_fn)
    progress = _Progress(rt, tenant, sid, sum(len(c) for _, c in plan), asyncio.get_running_loop())
    await events.progress(rt.bus, tenant, sid, session_pb2.STAGE_QAGEN, 0, progress.total, "chunked")
    await _generate_all(rt, rec, qa, plan, progress, length_fn)

    n_failed = sum(len(v) for v in qa.failed.values())
    stats_pb, held_out = _finish_pairs(qa, settings, qa_backend_name(rec.options) or settings.qagen_backend)
    await events.progress(
        rt.bus, tenant, sid, session_pb2.STAGE_QAGEN, progress.total, progress.total, f"{len(qa.pairs)} pairs"
    )
    await qa.save()
    await rt.sessions.update(sid, functools.partial(_record, stats_pb))
    _check_outcome(qa, stats_pb, settings.min_pairs, n_failed, rec.options.allow_partial)
    log.info(
        "generated %d pairs from %d chunks (coverage %.0f%%, %d held out, %d chunks failed)",
        stats_pb.pairs,
        stats_pb.chunks,
        100 * stats_pb.coverage,
        held_out,
        n_failed,
    )
    await _hand_on(rt, item, rec, started)


async def _chunk_all(
    rt: Runtime, tenant: str, sid: str, todo: list[session_pb2.DocumentInfo], length_fn: LengthFn | None
) -> list[tuple[session_pb2.DocumentInfo, list[Chunk]]]:
    """Each document to do with its chunks (none for a document of provided pairs): everything is
    chunked first, so progress counts chunks over the whole session."""
    settings = rt.settings
    sizes = {"max_tokens": settings.qagen_chunk_tokens, "overlap_tokens": settings.qagen_chunk_overlap}
    plan: list[tuple[session_pb2.DocumentInfo, list[Chunk]]] = []
    for doc in todo:
        if doc.format.startswith("qa_"):
            plan.append((doc, []))
            continue
        text = (await rt.io(rt.store.get_bytes, keys.doc_text(tenant, sid, doc.doc_id))).decode("utf-8")
        try:
            pages = await rt.io(rt.store.get_json, keys.doc_pages(tenant, sid, doc.doc_id))
        except NotFound:
            pages = None
        chunks = await rt.io(chunk_document, text, doc.doc_id, length_fn=length_fn, pages=pages, **sizes)
        plan.append((doc, chunks))
    return plan


async def _generate_all(
    rt: Runtime,
    rec: session_pb2.Session,
    qa: QAState,
    plan: list[tuple[session_pb2.DocumentInfo, list[Chunk]]],
    progress: _Progress,
    length_fn: LengthFn | None,
) -> None:
    """Each planned document's pairs, saved after each; the generator is made when the first
    document needs it and closed at the end, whatever happens."""
    generator = None
    try:
        for doc, chunks in plan:
            if doc.format.startswith("qa_"):  # the person's own pairs skip generation
                key = keys.doc_qa(qa.tenant, qa.sid, doc.doc_id)
                qa.add_provided(doc.doc_id, from_jsonl(await rt.io(rt.store.get_bytes, key)))
                await qa.save()
                continue
            if generator is None:
                generator = make_generator(rt.settings, qa_backend_name(rec.options))
            previous = [
                QAPair.from_dict(p) for p in qa.pairs if p.get("doc_id") == doc.doc_id and p.get("chunk_id")
            ]
            kept, stats = await rt.io(
                generate_document,
                generator,
                chunks,
                doc_title=doc.name,
                strategies=strategy_names(rec.options) or None,
                progress=progress,
                previous=previous,
                retry_chunks=[f["chunk_id"] for f in qa.failed.get(doc.doc_id, [])],
                length_fn=length_fn,
            )
            progress.offset += len(chunks)
            qa.add_generated(doc, chunks, kept, stats)
            await qa.save()
    finally:
        close = getattr(generator, "close", None)
        if close is not None:
            close()


def _finish_pairs(qa: QAState, settings: Settings, backend: str) -> tuple[session_pb2.QAStats, int]:
    """Mark the held-out split and the exam on the session's pairs; (their stats, pairs held out)."""
    held_out = quality.mark_split(
        qa.pairs, settings.qagen_eval_fraction, settings.train_seed, settings.qagen_eval_min_pairs
    )
    exam = quality.mark_exam(qa.pairs, settings.qagen_exam_pairs, settings.train_seed)
    stats_pb = _stats(qa.pairs, qa.chunk_rows, qa.failed, held_out, backend)
    stats_pb.exam_pairs = exam
    for counts in qa.dropped.values():
        for reason, n in counts.items():
            stats_pb.dropped[reason] += int(n)
    return stats_pb, held_out


def _record(stats_pb: session_pb2.QAStats, r: session_pb2.Session) -> None:
    r.qa.CopyFrom(stats_pb)
    mark_stage(r, session_pb2.STAGE_QAGEN, finished=True)


def _check_outcome(
    qa: QAState, stats_pb: session_pb2.QAStats, min_pairs: int, n_failed: int, allow_partial: bool
) -> None:
    """INVALID_ARGUMENT for too few pairs; FAILED_PRECONDITION for failed chunks, unless allowed."""
    if len(qa.pairs) < min_pairs:
        raise InvalidArgument(
            f"not enough text to learn from: {len(qa.pairs)} question-answer pairs came out of the "
            f"documents, at least {min_pairs} are needed"
            + (f" ({'; '.join(qa.reasons)})" if qa.reasons else "")
        )
    if n_failed and not allow_partial:
        raise FailedPrecondition(
            f"{n_failed} of {stats_pb.chunks} chunks failed generation ({'; '.join(stats_pb.failures)}); "
            "retry the session to generate only those again, or set allow_partial to train without them"
        )


async def _hand_on(rt: Runtime, item: events_pb2.WorkItem, rec: session_pb2.Session, started: float) -> None:
    """To review when the session asks for it (the stage's end announced here), else to training."""
    sid = item.session_id
    if rec.options.review:
        await events.publish(
            rt.bus,
            item.tenant,
            sid,
            events_pb2.Event(
                finished=events_pb2.StageFinished(
                    stage=session_pb2.STAGE_QAGEN, seconds=time.monotonic() - started
                )
            ),
        )
        await rt.sessions.transition(
            sid, S.SESSION_STATE_AWAITING_REVIEW, allowed_from={S.SESSION_STATE_GENERATING}
        )
        return
    await rt.handoff(item, session_pb2.STAGE_QAGEN, session_pb2.STAGE_TRAIN, time.monotonic() - started)


def _stats(
    pairs: list[dict], chunk_rows: list[dict], failed: dict, held_out: int, backend: str
) -> session_pb2.QAStats:
    with_pairs = {p.get("chunk_id") for p in pairs if p.get("chunk_id")}
    n_chunks = len(chunk_rows)
    covered = sum(1 for c in chunk_rows if c["chunk_id"] in with_pairs)
    failures = [f"{f['chunk_id']}: {f['reason']}" for items in failed.values() for f in items][
        :MAX_FAILURES_SHOWN
    ]
    return session_pb2.QAStats(
        chunks=n_chunks,
        chunks_with_pairs=covered,
        pairs=len(pairs),
        coverage=covered / n_chunks if n_chunks else 0.0,
        failed_chunks=sum(len(v) for v in failed.values()),
        failures=failures,
        eval_pairs=held_out,
        backend=backend or "extractive",
    )
