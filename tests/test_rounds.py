"""Sessions that run again (services/common/runtime.py, stage.py; SessionService.RetrainSession,
IngestService.AddSource) against a real nats-server and SeaweedFS: sources added before training
or to a ready bot start a new round, work of an older round is dropped and never fails the session,
and a finished session retrains from the right stage."""

from __future__ import annotations

import pytest

from doclora.v1 import events_pb2, ingest_pb2, qagen_pb2, session_pb2, session_service_pb2
from services.common import keys
from services.common.errors import AlreadyExists, FailedPrecondition, InvalidArgument
from services.common.jsonl import to_jsonl
from services.common.runtime import Runtime
from services.common.stage import StageWorker
from services.ingest.service import IngestServicer, SessionServicer

S = session_pb2.SessionState
D = session_pb2.DocumentStatus
TEXT = "The Lumen Orchard was founded in 1987 by the botanist Ilse Marrow on the river bank."


@pytest.fixture
def rt(runtime):
    return runtime


@pytest.fixture
def queued(rt, monkeypatch):
    """The work items the runtime publishes (they still reach NATS)."""
    items: list[events_pb2.WorkItem] = []
    real = rt.enqueue

    async def enqueue(sid, tenant, stage, *, round=0, priority=0, again=""):
        items.append(
            events_pb2.WorkItem(session_id=sid, tenant=tenant, stage=stage, round=round, priority=priority)
        )
        await real(sid, tenant, stage, round=round, priority=priority, again=again)

    monkeypatch.setattr(rt, "enqueue", enqueue)
    return items


async def _session(rt: Runtime, state: int, **fields) -> session_pb2.Session:
    sid = keys.new_id()
    doc = session_pb2.DocumentInfo(doc_id="d1", name="a.txt", sha256="aa", status=D.DOCUMENT_STATUS_READY)
    return await rt.sessions.create(
        session_pb2.Session(session_id=sid, tenant="default", state=state, documents=[doc], **fields)
    )


def _text_source(text: str = TEXT) -> session_service_pb2.Source:
    return session_service_pb2.Source(text=text, name="more.txt")


async def test_a_source_added_to_a_ready_bot_starts_a_new_round_from_its_adapter(rt, queued):
    rec = await _session(rt, S.SESSION_STATE_READY, adapter_id="bot1")
    resp = await IngestServicer(rt).AddSource(
        ingest_pb2.AddSourceRequest(session_id=rec.session_id, source=_text_source()), None
    )
    after = await rt.sessions.get(rec.session_id)
    assert after.state == S.SESSION_STATE_QUEUED and after.round == 1
    assert after.continue_from == "bot1" and after.adapter_id == "bot1"  # it chats on while it learns
    assert [d.doc_id for d in after.documents] == ["d1", resp.document.doc_id]
    assert (
        rt.store.get_bytes(keys.doc_original("default", rec.session_id, resp.document.doc_id))
        == TEXT.encode()
    )
    assert [(i.stage, i.round) for i in queued] == [(session_pb2.STAGE_INGEST, 1)]


@pytest.mark.parametrize(
    "state", [S.SESSION_STATE_AWAITING_REVIEW, S.SESSION_STATE_FAILED, S.SESSION_STATE_QUEUED]
)
async def test_a_source_can_be_added_before_training(rt, queued, state):
    rec = await _session(rt, state)
    await IngestServicer(rt).AddSource(
        ingest_pb2.AddSourceRequest(session_id=rec.session_id, source=_text_source()), None
    )
    after = await rt.sessions.get(rec.session_id)
    assert after.state == S.SESSION_STATE_QUEUED and after.round == 1 and len(after.documents) == 2
    assert not after.continue_from and not after.HasField("error")


@pytest.mark.parametrize(
    "state", [S.SESSION_STATE_TRAINING, S.SESSION_STATE_GENERATING, S.SESSION_STATE_CANCELLED]
)
async def test_a_source_cannot_be_added_while_training_or_generating_or_after_cancel(rt, queued, state):
    rec = await _session(rt, state)
    with pytest.raises(FailedPrecondition):
        await IngestServicer(rt).AddSource(
            ingest_pb2.AddSourceRequest(session_id=rec.session_id, source=_text_source()), None
        )
    after = await rt.sessions.get(rec.session_id)
    assert len(after.documents) == 1 and after.round == 0 and not queued


async def test_the_same_content_added_twice_is_refused_and_not_stored(rt, queued):
    import hashlib

    rec = await _session(rt, S.SESSION_STATE_READY)

    def same(r):
        r.documents[0].sha256 = hashlib.sha256(TEXT.encode()).hexdigest()

    await rt.sessions.update(rec.session_id, same)
    with pytest.raises(AlreadyExists):
        await IngestServicer(rt).AddSource(
            ingest_pb2.AddSourceRequest(session_id=rec.session_id, source=_text_source()), None
        )
    assert rt.store.list(keys.session_prefix("default", rec.session_id)) == []
    assert (await rt.sessions.get(rec.session_id)).state == S.SESSION_STATE_READY


async def test_a_retried_publish_of_one_round_is_dropped_and_a_new_round_is_not(rt):
    sid = keys.new_id()
    before = await rt.bus.pending_work("qagen")
    await rt.enqueue(sid, "default", session_pb2.STAGE_QAGEN, round=0)
    await rt.enqueue(sid, "default", session_pb2.STAGE_QAGEN, round=0)
    assert await rt.bus.pending_work("qagen") == before + 1
    await rt.enqueue(sid, "default", session_pb2.STAGE_QAGEN, round=1)
    assert await rt.bus.pending_work("qagen") == before + 2


async def test_work_of_an_older_round_is_dropped(rt):
    rec = await _session(rt, S.SESSION_STATE_QUEUED, round=2)
    calls = []

    async def handler(item, r):
        calls.append(item.round)

    stage = StageWorker(rt, session_pb2.STAGE_INGEST, handler)

    class Msg:
        def __init__(self, item):
            self.data = item.SerializeToString()

    for rnd in (1, 2):
        item = events_pb2.WorkItem(
            session_id=rec.session_id, tenant="default", stage=session_pb2.STAGE_INGEST, round=rnd
        )
        await stage._handle(Msg(item))
    assert calls == [2]


async def test_an_old_round_failing_after_a_new_round_began_does_not_fail_the_session(rt):
    rec = await _session(rt, S.SESSION_STATE_QUEUED)

    async def handler(item, r):
        # a source is added while this ingest runs: the session starts round 1 ...
        await rt.sessions.update(item.session_id, lambda x: setattr(x, "round", 1))
        await rt.sessions.transition(item.session_id, S.SESSION_STATE_QUEUED)
        # ... so this round's hand-off finds the session in a state it cannot move on from
        raise FailedPrecondition("session is QUEUED, cannot become GENERATING")

    stage = StageWorker(rt, session_pb2.STAGE_INGEST, handler)
    item = events_pb2.WorkItem(session_id=rec.session_id, tenant="default", stage=session_pb2.STAGE_INGEST)

    class Msg:
        data = item.SerializeToString()

    await stage._handle(Msg())
    after = await rt.sessions.get(rec.session_id)
    assert after.state == S.SESSION_STATE_QUEUED and not after.HasField("error")


async def test_a_ready_bot_retrains_from_its_stored_pairs_and_adapter(rt, queued):
    rec = await _session(rt, S.SESSION_STATE_READY, adapter_id="bot1")
    rt.store.put_bytes(
        keys.qa_pairs("default", rec.session_id), to_jsonl([{"question": "Q?", "answer": "A."}])
    )
    api = SessionServicer(rt)
    req = session_service_pb2.RetrainSessionRequest(
        session_id=rec.session_id, options=session_pb2.SessionOptions(max_steps=7, priority=5)
    )
    out = (await api.RetrainSession(req, None)).session
    assert out.state == S.SESSION_STATE_TRAINING and out.round == 1 and out.continue_from == "bot1"
    assert out.options.max_steps == 7 and out.options.priority == 5
    assert [(i.stage, i.round, i.priority) for i in queued] == [(session_pb2.STAGE_TRAIN, 1, 5)]
    with pytest.raises(FailedPrecondition, match="TRAINING"):  # not while it trains
        await api.RetrainSession(session_service_pb2.RetrainSessionRequest(session_id=rec.session_id), None)


async def test_retraining_from_scratch_and_after_a_failed_generation(rt, queued):
    api = SessionServicer(rt)
    ready = await _session(rt, S.SESSION_STATE_READY, adapter_id="bot2")
    rt.store.put_bytes(
        keys.qa_pairs("default", ready.session_id), to_jsonl([{"question": "Q?", "answer": "A."}])
    )
    out = (
        await api.RetrainSession(
            session_service_pb2.RetrainSessionRequest(session_id=ready.session_id, from_scratch=True), None
        )
    ).session
    assert out.state == S.SESSION_STATE_TRAINING and out.continue_from == ""

    failed = await _session(
        rt,
        S.SESSION_STATE_FAILED,
        error=session_pb2.StageError(
            code="FAILED_PRECONDITION", message="2 chunks failed", stage=session_pb2.STAGE_QAGEN
        ),
    )
    out = (
        await api.RetrainSession(
            session_service_pb2.RetrainSessionRequest(session_id=failed.session_id), None
        )
    ).session
    assert out.state == S.SESSION_STATE_GENERATING and not out.HasField("error")
    assert queued[-1].stage == session_pb2.STAGE_QAGEN and queued[-1].round == 1


async def test_options_no_stage_could_follow_are_refused_at_creation(rt):
    api = SessionServicer(rt)
    for opts in (
        session_pb2.SessionOptions(qagen_backend="gpt-9"),
        session_pb2.SessionOptions(strategies=["poetry"]),
        session_pb2.SessionOptions(lora_rank=0),
        session_pb2.SessionOptions(answer_mode="psychic"),
    ):
        req = session_service_pb2.CreateSessionRequest(sources=[_text_source()], options=opts)
        with pytest.raises(InvalidArgument):
            await api.CreateSession(req, None)


async def test_sessions_waiting_for_a_trainer_show_their_place_by_priority_then_arrival(rt, queued):
    from services.common.sessions import mark_stage

    api = SessionServicer(rt)
    ids = []
    for priority in (0, 0, 5):
        rec = await _session(
            rt, S.SESSION_STATE_AWAITING_REVIEW, options=session_pb2.SessionOptions(priority=priority)
        )
        await rt.sessions.update(rec.session_id, lambda r: setattr(r.qa, "pairs", 5))
        await api.ApproveSession(session_service_pb2.ApproveSessionRequest(session_id=rec.session_id), None)
        ids.append(rec.session_id)

    async def place(sid):
        return (
            await api.GetSession(session_service_pb2.GetSessionRequest(session_id=sid), None)
        ).session.queue_position

    assert [await place(s) for s in ids] == [2, 3, 1]
    assert [i.priority for i in queued[-3:]] == [0, 0, 5]
    await rt.sessions.update(ids[2], lambda r: mark_stage(r, session_pb2.STAGE_TRAIN, started=True))
    assert [await place(s) for s in ids] == [1, 2, 0]
    listed = await api.ListSessions(session_service_pb2.ListSessionsRequest(), None)
    assert {s.session_id: s.queue_position for s in listed.sessions if s.session_id in ids} == dict(
        zip(ids, [1, 2, 0], strict=True)
    )


async def test_grpc_callers_get_invalid_argument_for_a_negative_list_limit_or_page_token(rt):
    """The gateway bounds these; a gRPC client reaching the services straight gets a clear refusal
    instead of a list that silently lost sessions or a page from the end."""
    from services.qagen.service import QAGenServicer

    await _session(rt, S.SESSION_STATE_READY)
    with pytest.raises(InvalidArgument, match="limit"):
        await SessionServicer(rt).ListSessions(session_service_pb2.ListSessionsRequest(limit=-1), None)
    rec = await _session(rt, S.SESSION_STATE_READY)
    rt.store.put_bytes(
        keys.qa_pairs("default", rec.session_id), to_jsonl([{"question": "Q?", "answer": "A."}])
    )
    with pytest.raises(InvalidArgument, match="page_token"):
        await QAGenServicer(rt).ListPairs(
            qagen_pb2.ListPairsRequest(session_id=rec.session_id, page_token="-5"), None
        )
