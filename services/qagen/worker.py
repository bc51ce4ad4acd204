"""The qagen stage: each ready document's text -> token-aware chunks -> grounded QA pairs from the
session's generator (extractive, local model or OpenAI-compatible endpoint), checked by the quality
gate, with a held-out split marked, written to the store as `chunks.jsonl` and `qa/pairs.jsonl`.

Documents are done one at a time and the files are written after each, with `qa/state.json` saying
which documents are done and which of their chunks failed. A redelivered job (the worker died) or a
later round (sources were added) therefore generates only what is missing: done documents keep
their pairs as they are, edits by people included, and a document with failed chunks is generated
again with its earlier pairs passed as `previous`, so only the failed chunks are asked again.
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
from services.common.jsonl import from_jsonl, to_jsonl
from services.common.qapair import QAPair, read_pairs
from services.common.runtime import Runtime
from services.common.sessions import mark_stage
from services.qagen import quality
from services.qagen.backends import BACKENDS, ExtractiveGenerator, generate_document
from services.qagen.chunk import Chunk, token_length
from services.qagen.extractive import chunk_document
from services.qagen.pairs import provided_pairs

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


@functools.lru_cache(maxsize=1)
def _local_generator(settings: Settings):
    from dataclasses import replace

    from services.common.model import load_base_model
    from services.qagen.backends import LocalGenerator

    model_settings = (
        replace(settings, base_model=settings.qagen_local_model) if settings.qagen_local_model else settings
    )
    model, tokenizer = load_base_model(model_settings)
    return LocalGenerator(model, tokenizer)


def make_generator(settings: Settings, backend: str):
    """The generator of `backend` ("" = the server's default); an OpenAI one must be closed."""
    backend = (backend or settings.qagen_backend or "extractive").strip().lower()
    if backend == "extractive":
        return ExtractiveGenerator()
    if backend == "openai":
        if not settings.qagen_openai_url:
            raise FailedPrecondition(
                "the openai QA backend needs an endpoint: set DOCLORA_QAGEN_OPENAI_URL (and _MODEL, _KEY)"
            )
        from services.qagen.backends import OpenAIGenerator

        return OpenAIGenerator(
            settings.qagen_openai_url,
            settings.qagen_openai_key,
            settings.qagen_openai_model,
            concurrency=settings.qagen_concurrency,
            timeout=settings.qagen_timeout_s,
        )
    if backend == "local":
        try:
            return _local_generator(settings)
        except ImportError as exc:
            raise FailedPrecondition(f"the local QA backend needs torch and transformers: {exc}") from None
    raise InvalidArgument(f"unknown QA backend {backend!r}; use one of {', '.join(BACKENDS)}")


class _Progress:
    """Chunk progress from the generating thread to the event stream, at most every half second."""

    def __init__(self, rt: Runtime, sid: str, total: int, loop: asyncio.AbstractEventLoop):
        self.rt, self.sid, self.total, self.loop = rt, sid, total, loop
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
            self.sid,
            session_pb2.STAGE_QAGEN,
            n,
            self.total,
            f"{n}/{self.total} chunks",
        )


async def _read_state(rt: Runtime, tenant: str, sid: str) -> tuple[list[dict], list[dict], dict]:
    """(pairs, chunks, state) of earlier deliveries and rounds; empty when there are none."""
    try:
        state = await rt.io(rt.store.get_json, keys.qa_state(tenant, sid))
    except NotFound:
        return [], [], {"done": [], "failed": {}}
    pairs = from_jsonl(await rt.io(rt.store.get_bytes, keys.qa_pairs(tenant, sid)))
    chunks = from_jsonl(await rt.io(rt.store.get_bytes, keys.chunks(tenant, sid)))
    return pairs, chunks, state


async def _write(
    rt: Runtime, tenant: str, sid: str, pairs: list[dict], chunks: list[dict], state: dict
) -> None:
    # state last: a crash before it leaves the document to be generated again, and pair ids
    # (hashes of chunk, question and answer) keep a rerun from adding the same pairs twice
    await rt.io(
        rt.store.put_bytes, keys.qa_pairs(tenant, sid), to_jsonl(pairs), content_type="application/x-ndjson"
    )
    await rt.io(
        rt.store.put_bytes, keys.chunks(tenant, sid), to_jsonl(chunks), content_type="application/x-ndjson"
    )
    await rt.io(rt.store.put_json, keys.qa_state(tenant, sid), state)


async def generate_session(rt: Runtime, item: events_pb2.WorkItem, rec: session_pb2.Session) -> None:
    started = time.monotonic()
    sid, tenant, settings = item.session_id, item.tenant, rt.settings
    docs = [d for d in rec.documents if d.status == D.DOCUMENT_STATUS_READY]
    pairs, chunk_rows, state = await _read_state(rt, tenant, sid)
    done, failed = set(state.get("done", [])), dict(state.get("failed", {}))
    todo = [d for d in docs if d.doc_id not in done or d.doc_id in failed]
    length_fn = (
        await rt.io(_length_fn, settings) if any(not d.format.startswith("qa_") for d in todo) else None
    )
    sizes = {"max_tokens": settings.qagen_chunk_tokens, "overlap_tokens": settings.qagen_chunk_overlap}

    # chunk everything first, so progress counts chunks over the whole session
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
    progress = _Progress(rt, sid, sum(len(c) for _, c in plan), asyncio.get_running_loop())
    await events.progress(rt.bus, sid, session_pb2.STAGE_QAGEN, 0, progress.total, "chunked")

    generator = None
    dropped: dict = dict(state.get("dropped", {}))
    reasons: list[str] = []

    def snapshot() -> dict:
        return {"done": sorted(done), "failed": failed, "dropped": dropped}

    try:
        for doc, chunks in plan:
            if doc.format.startswith("qa_"):  # the person's own pairs skip generation
                rows = from_jsonl(await rt.io(rt.store.get_bytes, keys.doc_qa(tenant, sid, doc.doc_id)))
                known = {p["pair_id"] for p in pairs}
                pairs += [p for p in provided_pairs(rows, doc.doc_id) if p["pair_id"] not in known]
                done.add(doc.doc_id)
                await _write(rt, tenant, sid, pairs, chunk_rows, snapshot())
                continue
            if generator is None:
                generator = make_generator(settings, rec.options.qagen_backend)
            previous = [
                QAPair.from_dict(p) for p in pairs if p.get("doc_id") == doc.doc_id and p.get("chunk_id")
            ]
            kept, stats = await rt.io(
                generate_document,
                generator,
                chunks,
                doc_title=doc.name,
                strategies=list(rec.options.strategies) or None,
                progress=progress,
                previous=previous,
                retry_chunks=[f["chunk_id"] for f in failed.get(doc.doc_id, [])],
                length_fn=length_fn,
            )
            progress.offset += len(chunks)
            if stats.get("error"):
                log.info("%s: %s", doc.name, stats["error"])
                reasons.append(f"{doc.name}: {stats['error']}")
            # this document's generated pairs are replaced by the new set (which holds the earlier
            # ones that passed); pairs people added or imported stay
            pairs = [p for p in pairs if not (p.get("doc_id") == doc.doc_id and p.get("chunk_id"))]
            pairs += [{**p.to_dict(), "split": "train"} for p in kept]
            chunk_rows = [c for c in chunk_rows if c.get("doc_id") != doc.doc_id] + [
                c.to_dict() for c in chunks
            ]
            done.add(doc.doc_id)
            dropped[doc.doc_id] = stats["dropped"]
            if stats["failed_chunks"]:
                failed[doc.doc_id] = stats["failed_chunks"]
            else:
                failed.pop(doc.doc_id, None)
            await _write(rt, tenant, sid, pairs, chunk_rows, snapshot())
    finally:
        close = getattr(generator, "close", None)
        if close is not None:
            close()

    n_failed = sum(len(v) for v in failed.values())
    held_out = quality.mark_split(
        pairs, settings.qagen_eval_fraction, settings.train_seed, settings.qagen_eval_min_pairs
    )
    exam = quality.mark_exam(pairs, settings.qagen_exam_pairs, settings.train_seed)
    stats_pb = _stats(
        pairs, chunk_rows, failed, held_out, rec.options.qagen_backend or settings.qagen_backend
    )
    stats_pb.exam_pairs = exam
    for counts in dropped.values():
        for reason, n in counts.items():
            stats_pb.dropped[reason] += int(n)
    await events.progress(
        rt.bus, sid, session_pb2.STAGE_QAGEN, progress.total, progress.total, f"{len(pairs)} pairs"
    )
    await _write(rt, tenant, sid, pairs, chunk_rows, snapshot())

    def record(r):
        r.qa.CopyFrom(stats_pb)
        mark_stage(r, session_pb2.STAGE_QAGEN, finished=True)

    await rt.sessions.update(sid, record)
    if len(pairs) < settings.min_pairs:
        raise InvalidArgument(
            f"not enough text to learn from: {len(pairs)} question-answer pairs came out of the "
            f"documents, at least {settings.min_pairs} are needed"
            + (f" ({'; '.join(reasons)})" if reasons else "")
        )
    if n_failed and not rec.options.allow_partial:
        raise FailedPrecondition(
            f"{n_failed} of {stats_pb.chunks} chunks failed generation ({'; '.join(stats_pb.failures)}); "
            "retry the session to generate only those again, or set allow_partial to train without them"
        )
    log.info(
        "generated %d pairs from %d chunks (coverage %.0f%%, %d held out, %d chunks failed)",
        stats_pb.pairs,
        stats_pb.chunks,
        100 * stats_pb.coverage,
        held_out,
        n_failed,
    )
    if rec.options.review:
        await events.publish(
            rt.bus,
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
