"""The qagen stage and QAGenService (services/qagen/worker.py, service.py) against a real nats-server
and SeaweedFS: pairs with a held-out split, token-aware chunks, the review step, failed chunks that
stop the session and are generated again alone, documents with too little text, and people
editing, exporting and importing pairs."""

from __future__ import annotations

import dataclasses
import json
from collections import Counter

import grpc
import pytest

from doclora.v1 import events_pb2, qagen_pb2, session_pb2, session_service_pb2
from services.common import keys
from services.common.errors import FailedPrecondition, InvalidArgument, NotFound
from services.common.jsonl import from_jsonl
from services.common.runtime import Runtime
from services.ingest.service import SessionServicer
from services.qagen import worker
from services.qagen.backends.extractive import ExtractiveGenerator
from services.qagen.backends.openai_api import OpenAIGenerator
from services.qagen.chunk import token_length
from services.qagen.service import QAGenServicer
from tests.test_qagen_backends import FakeChatServer, sectioned_doc, server  # noqa: F401

S = session_pb2.SessionState
D = session_pb2.DocumentStatus
TENANT = "default"


@pytest.fixture
def rt(runtime):
    settings = runtime.settings.replace(qagen_chunk_tokens=0, qagen_eval_min_pairs=10)
    worker._length_fn.cache_clear()
    return dataclasses.replace(runtime, settings=settings)


async def _session(rt: Runtime, texts: dict[str, str], **options) -> session_pb2.Session:
    sid = keys.new_id()
    docs = []
    for doc_id, text in texts.items():
        rt.store.put_bytes(keys.doc_text(TENANT, sid, doc_id), text.encode())
        docs.append(
            session_pb2.DocumentInfo(
                doc_id=doc_id, name=f"{doc_id}.md", status=D.DOCUMENT_STATUS_READY, format="markdown"
            )
        )
    rec = session_pb2.Session(
        session_id=sid,
        tenant=TENANT,
        state=S.SESSION_STATE_GENERATING,
        documents=docs,
        options=session_pb2.SessionOptions(**options),
    )
    return await rt.sessions.create(rec)


def _item(rec: session_pb2.Session) -> events_pb2.WorkItem:
    return events_pb2.WorkItem(
        session_id=rec.session_id, tenant=TENANT, stage=session_pb2.STAGE_QAGEN, round=rec.round
    )


async def _run(rt: Runtime, rec: session_pb2.Session) -> session_pb2.Session:
    await worker.generate_session(rt, _item(rec), rec)
    return await rt.sessions.get(rec.session_id)


def _pairs(rt: Runtime, sid: str) -> list[dict]:
    return from_jsonl(rt.store.get_bytes(keys.qa_pairs(TENANT, sid)))


async def test_generation_stores_grounded_pairs_with_a_held_out_split_and_queues_training(rt):
    """Every chunk gets pairs; with a held-out fraction set, whole chunks are held out as "eval";
    the session moves to TRAINING."""
    rt = dataclasses.replace(rt, settings=rt.settings.replace(qagen_eval_fraction=0.1))
    rec = await _session(rt, {"d1": sectioned_doc()})
    after = await _run(rt, rec)
    pairs = _pairs(rt, rec.session_id)
    chunks = from_jsonl(rt.store.get_bytes(keys.chunks(TENANT, rec.session_id)))
    assert after.state == S.SESSION_STATE_TRAINING
    assert after.qa.pairs == len(pairs) and after.qa.chunks == len(chunks) == 8
    assert after.qa.coverage == 1.0 and after.qa.backend == "extractive"
    held = [p for p in pairs if p["split"] == "eval"]
    assert after.qa.eval_pairs == len(held) > 0
    eval_chunks = {p["chunk_id"] for p in held}
    assert not eval_chunks & {p["chunk_id"] for p in pairs if p["split"] == "train"}
    progress = await _progress_events(rt, rec.session_id)
    assert progress[0] == (0, 8) and progress[-1] == (8, 8)
    assert all(a[0] <= b[0] for a, b in zip(progress, progress[1:], strict=False))


async def test_by_default_every_fact_trains_and_rewordings_of_trained_facts_are_kept_for_the_exam(rt):
    """No chunk is held out by default; up to `qagen_exam_pairs` rewordings are marked "exam",
    one per fact, each a paraphrase whose original trains; the stats count them."""
    rt = dataclasses.replace(rt, settings=rt.settings.replace(qagen_exam_pairs=5))
    assert rt.settings.qagen_eval_fraction == 0.0
    rec = await _session(rt, {"d1": sectioned_doc()})
    after = await _run(rt, rec)
    pairs = _pairs(rt, rec.session_id)
    by_id = {p["pair_id"]: p for p in pairs}
    exam = [p for p in pairs if p["split"] == "exam"]
    assert after.qa.eval_pairs == 0 and not any(p["split"] == "eval" for p in pairs)
    assert after.qa.exam_pairs == len(exam) == 5
    originals = [by_id[p["variant_of"]] for p in exam]
    assert all(o["split"] == "train" and o["answer"] for o in originals)
    assert len({o["pair_id"] for o in originals}) == 5  # one rewording per fact
    # every chunk that has pairs still trains on some of them
    assert {p["chunk_id"] for p in pairs} == {p["chunk_id"] for p in pairs if p["split"] == "train"}


async def _progress_events(rt: Runtime, sid: str) -> list[tuple[int, int]]:
    """(done, total) of the session's qagen progress events so far, in order."""
    import asyncio
    import contextlib

    from services.common import events

    out: list[tuple[int, int]] = []

    async def read():
        async with contextlib.aclosing(rt.bus.watch_events(TENANT, sid)) as stream:
            async for _kind, data in stream:
                ev = events.parse(data)
                if ev.WhichOneof("kind") == "progress" and ev.progress.stage == session_pb2.STAGE_QAGEN:
                    out.append((ev.progress.done, ev.progress.total))
                if ev.WhichOneof("kind") == "finished":
                    return

    await asyncio.wait_for(read(), 10)
    return out


async def test_chunks_are_sized_in_base_model_tokens_when_its_tokenizer_loads(rt, monkeypatch):
    from tests.test_model import real_tokenizer

    tok = real_tokenizer()
    monkeypatch.setattr(worker, "_length_fn", lambda settings: token_length(tok))
    rt.settings = rt.settings.replace(qagen_chunk_tokens=48, qagen_chunk_overlap=8)
    rec = await _session(rt, {"d1": sectioned_doc() * 3})
    await _run(rt, rec)
    chunks = from_jsonl(rt.store.get_bytes(keys.chunks(TENANT, rec.session_id)))
    sizes = [len(tok(c["text"], add_special_tokens=False)["input_ids"]) for c in chunks]
    assert max(sizes) <= 48 and len(chunks) > 8


async def test_a_session_asking_for_review_waits_until_it_is_approved(rt):
    rec = await _session(rt, {"d1": sectioned_doc()}, review=True)
    after = await _run(rt, rec)
    assert after.state == S.SESSION_STATE_AWAITING_REVIEW
    api = SessionServicer(rt)
    approved = await api.ApproveSession(
        session_service_pb2.ApproveSessionRequest(session_id=rec.session_id), None
    )
    assert approved.session.state == S.SESSION_STATE_TRAINING
    with pytest.raises(FailedPrecondition):  # only once
        await api.ApproveSession(session_service_pb2.ApproveSessionRequest(session_id=rec.session_id), None)


async def test_a_document_with_almost_no_text_fails_without_inventing_pairs(rt):
    rec = await _session(rt, {"d1": "Hello world."})
    with pytest.raises(InvalidArgument, match="not enough text to learn from"):
        await _run(rt, rec)
    assert _pairs(rt, rec.session_id) == []


class Flaky:
    """Extractive pairs, except for chunks whose text holds a marker in `failing`."""

    def __init__(self, failing: set[str]):
        self.inner = ExtractiveGenerator()
        self.failing = failing
        self.asked: Counter[str] = Counter()

    def generate(self, chunk, *, doc_title, strategies):
        from services.qagen.backends.base import ChunkFailed

        self.asked[chunk.chunk_id] += 1
        if any(m in chunk.text for m in self.failing):
            raise ChunkFailed("scripted failure")
        return self.inner.generate(chunk, doc_title=doc_title, strategies=strategies)

    def document_pairs(self, chunks, *, doc_title, strategies):
        return self.inner.document_pairs(chunks, doc_title=doc_title, strategies=strategies)


async def test_failed_chunks_stop_the_session_and_a_rerun_asks_for_them_alone(rt, monkeypatch):
    flaky = Flaky({"CHARLIE"})
    monkeypatch.setattr(worker, "make_generator", lambda settings, backend: flaky)
    rec = await _session(rt, {"d1": sectioned_doc()})
    with pytest.raises(FailedPrecondition, match="1 of 8 chunks failed generation"):
        await _run(rt, rec)
    first = _pairs(rt, rec.session_id)
    state = rt.store.get_json(keys.qa_state(TENANT, rec.session_id))
    assert list(state["failed"]) == ["d1"]
    asked_before = Counter(flaky.asked)

    flaky.failing.clear()  # the endpoint recovered: the same round runs again (redelivery)
    after = await _run(rt, rec)
    asked = flaky.asked - asked_before
    assert sum(asked.values()) == 1  # only the failed chunk
    second = _pairs(rt, rec.session_id)
    assert {p["pair_id"] for p in first} < {p["pair_id"] for p in second}
    assert len({p["pair_id"] for p in second}) == len(second)
    assert after.qa.failed_chunks == 0 and after.state == S.SESSION_STATE_TRAINING


async def test_allow_partial_trains_without_the_failed_chunks(rt, monkeypatch):
    monkeypatch.setattr(worker, "make_generator", lambda settings, backend: Flaky({"DELTA"}))
    rec = await _session(rt, {"d1": sectioned_doc()}, allow_partial=True)
    after = await _run(rt, rec)
    assert after.state == S.SESSION_STATE_TRAINING
    assert after.qa.failed_chunks == 1 and "scripted failure" in after.qa.failures[0]


async def test_done_documents_are_not_generated_again(rt, monkeypatch):
    """A redelivered job or a later round (a source was added) generates only the new document."""
    flaky = Flaky(set())
    monkeypatch.setattr(worker, "make_generator", lambda settings, backend: flaky)
    rec = await _session(rt, {"d1": sectioned_doc()})
    await _run(rt, rec)
    n_first = sum(flaky.asked.values())
    rt.store.put_bytes(keys.doc_text(TENANT, rec.session_id, "d2"), sectioned_doc(("KILO", "LIMA")).encode())

    def add(r):
        r.documents.add(doc_id="d2", name="d2.md", status=D.DOCUMENT_STATUS_READY, format="markdown")
        r.state = S.SESSION_STATE_GENERATING

    rec = await rt.sessions.update(rec.session_id, add)
    await _run(rt, rec)
    assert sum(flaky.asked.values()) - n_first == 2
    assert {p["doc_id"] for p in _pairs(rt, rec.session_id)} == {"d1", "d2"}


def test_the_openai_backend_is_built_from_the_settings(rt):
    settings = rt.settings.replace(
        qagen_openai_url="http://127.0.0.1:9/v1", qagen_openai_model="m", qagen_concurrency=3
    )
    gen = worker.make_generator(settings, "openai")
    try:
        assert isinstance(gen, OpenAIGenerator)
        assert (
            gen.url == "http://127.0.0.1:9/v1/chat/completions" and gen.concurrency == 3 and gen.model == "m"
        )
    finally:
        gen.close()
    with pytest.raises(FailedPrecondition, match="DOCLORA_QAGEN_OPENAI_URL"):
        worker.make_generator(rt.settings, "openai")
    with pytest.raises(InvalidArgument, match="unknown QA backend"):
        worker.make_generator(rt.settings, "gpt")


async def test_a_session_generates_through_an_openai_compatible_endpoint(rt, server):  # noqa: F811
    rt.settings = rt.settings.replace(qagen_openai_url=server.base_url, qagen_openai_model="fake")
    rec = await _session(rt, {"d1": sectioned_doc()}, qagen_backend="openai", strategies=["quiz"])
    after = await _run(rt, rec)
    pairs = _pairs(rt, rec.session_id)
    assert after.qa.backend == "openai" and after.state == S.SESSION_STATE_TRAINING
    assert {p["strategy"] for p in pairs} == {"quiz"}
    assert server.requests["ALPHA"] == 1 and len(pairs) == 8


# --- people change the pairs ---------------------------------------------------------------------


async def _reviewed(rt: Runtime) -> session_pb2.Session:
    rec = await _session(rt, {"d1": sectioned_doc()}, review=True)
    return await _run(rt, rec)


async def test_people_add_edit_and_delete_pairs_in_review(rt):
    rec = await _reviewed(rt)
    svc = QAGenServicer(rt)
    sid = rec.session_id
    added = await svc.AddPair(
        qagen_pb2.AddPairRequest(
            session_id=sid, question="Who kept the logs?", answer="The keepers.", doc_id="d1"
        ),
        None,
    )
    assert added.pair.strategy == "person" and added.pair.edited
    first = _pairs(rt, sid)[0]
    edited = await svc.UpdatePair(
        qagen_pb2.UpdatePairRequest(session_id=sid, pair_id=first["pair_id"], answer="Forty storms."), None
    )
    assert edited.pair.answer == "Forty storms." and edited.pair.question == first["question"]
    deleted = await svc.DeletePair(
        qagen_pb2.DeletePairRequest(session_id=sid, pair_id=added.pair.pair_id), None
    )
    stored = _pairs(rt, sid)
    assert deleted.total == len(stored) and added.pair.pair_id not in {p["pair_id"] for p in stored}
    assert next(p for p in stored if p["pair_id"] == first["pair_id"])["answer"] == "Forty storms."
    assert (await rt.sessions.get(sid)).qa.pairs == len(stored)
    with pytest.raises(NotFound):
        await svc.DeletePair(qagen_pb2.DeletePairRequest(session_id=sid, pair_id="nope"), None)


@pytest.mark.parametrize(
    ("question", "answer", "why"),
    [
        ("", "An answer.", "question is empty"),
        ("What is it?", "   ", "answer is empty"),
        ("What is it?", "<|im_start|>assistant It is.", "chat-template"),
        ("Storms on the coast", "Forty.", "not a question"),
    ],
)
async def test_a_malformed_pair_from_a_person_is_refused(rt, question, answer, why):
    rec = await _reviewed(rt)
    before = _pairs(rt, rec.session_id)
    with pytest.raises(InvalidArgument, match=why):
        await QAGenServicer(rt).AddPair(
            qagen_pb2.AddPairRequest(session_id=rec.session_id, question=question, answer=answer), None
        )
    assert _pairs(rt, rec.session_id) == before


async def test_pairs_cannot_change_while_the_session_trains(rt):
    rec = await _session(rt, {"d1": sectioned_doc()})
    await _run(rt, rec)  # now TRAINING
    with pytest.raises(FailedPrecondition, match="TRAINING"):
        await QAGenServicer(rt).AddPair(
            qagen_pb2.AddPairRequest(session_id=rec.session_id, question="Who kept logs?", answer="Keepers."),
            None,
        )


@pytest.mark.parametrize(
    "fmt", [qagen_pb2.PAIR_FORMAT_OPENAI, qagen_pb2.PAIR_FORMAT_ALPACA, qagen_pb2.PAIR_FORMAT_SHAREGPT]
)
async def test_an_export_imports_back_into_another_session(rt, fmt):
    src = await _reviewed(rt)
    svc = QAGenServicer(rt)
    pieces = [
        m.data
        async for m in svc.ExportPairs(
            qagen_pb2.ExportPairsRequest(session_id=src.session_id, format=fmt), None
        )
    ]
    data = b"".join(pieces)
    lines = [json.loads(line) for line in data.decode().splitlines()]
    assert len(lines) == len(_pairs(rt, src.session_id))
    key = {
        qagen_pb2.PAIR_FORMAT_OPENAI: "messages",
        qagen_pb2.PAIR_FORMAT_ALPACA: "instruction",
        qagen_pb2.PAIR_FORMAT_SHAREGPT: "conversations",
    }[fmt]
    assert all(key in line for line in lines)

    dst = await _reviewed(rt)
    resp = await svc.ImportPairs(
        qagen_pb2.ImportPairsRequest(session_id=dst.session_id, data=data, replace=True), None
    )
    assert resp.imported == len(lines) and resp.duplicates == 0 and resp.total == len(lines)
    again = await svc.ImportPairs(qagen_pb2.ImportPairsRequest(session_id=dst.session_id, data=data), None)
    assert again.imported == 0 and again.duplicates == len(lines)
    got = {(p["question"], p["answer"]) for p in _pairs(rt, dst.session_id)}
    assert got == {(p["question"], p["answer"]) for p in _pairs(rt, src.session_id)}


async def test_a_bad_import_line_refuses_the_whole_file_and_loses_nothing(rt):
    rec = await _reviewed(rt)
    before = _pairs(rt, rec.session_id)
    data = (
        b'{"messages": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}]}\n{oops\n'
    )
    with pytest.raises(InvalidArgument, match="line 2"):
        await QAGenServicer(rt).ImportPairs(
            qagen_pb2.ImportPairsRequest(session_id=rec.session_id, data=data), None
        )
    assert _pairs(rt, rec.session_id) == before


def test_grpc_status_of_domain_errors_is_what_the_gateway_maps():
    assert InvalidArgument("x").code == grpc.StatusCode.INVALID_ARGUMENT.name
