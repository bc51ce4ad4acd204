"""Passing outages and lost publishes, against a real nats-server and SeaweedFS: the object store or
a linked web server away for a few seconds is waited out (the work stays in flight) instead of
failing documents for good; an outage longer than `outage_window_s` fails with a message naming it,
and a document that failed that way is fetched again by a retrain; a refused source leaves nothing
stored; the reconciler queues sessions whose work message was lost, once."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time

import pytest

from doclora.v1 import events_pb2, session_pb2, session_service_pb2
from services.common import keys, runtime
from services.common.errors import NotFound, OutageTooLong, Unavailable
from services.common.runtime import wait_out_outage
from services.common.stage import StageWorker
from services.common.store import ArtifactStore
from services.ingest.reconcile import reconcile
from services.ingest.service import SessionServicer
from services.ingest.worker import ingest_session
from tests.fixtures.proxy import TcpProxy
from tests.fixtures.web import DocsServer

S = session_pb2.SessionState
D = session_pb2.DocumentStatus
TEXT = (
    "The Lumen Orchard was founded in 1987 by the botanist Ilse Marrow on the river bank. "
    "It grows glowing pears that are harvested every October by hand."
)


@pytest.fixture(autouse=True)
def quick_backoff(monkeypatch):
    """Back-off of 0.2, 0.4, 0.8 ... s instead of 1, 2, 4 ... s: the same rule, in test time."""
    monkeypatch.setattr(runtime, "OUTAGE_FIRST_DELAY_S", 0.2)
    monkeypatch.setattr(runtime, "OUTAGE_MAX_DELAY_S", 2.0)


class _Delivery:
    def __init__(self, item: events_pb2.WorkItem):
        self.data = item.SerializeToString()


async def _session_with(rt, docs: list[session_pb2.DocumentInfo], state=S.SESSION_STATE_QUEUED):
    sid = keys.new_id()
    return await rt.sessions.create(
        session_pb2.Session(session_id=sid, tenant="default", state=state, documents=docs)
    )


async def _run_ingest(rt, rec: session_pb2.Session) -> session_pb2.Session:
    worker = StageWorker(rt, session_pb2.STAGE_INGEST, lambda item, r: ingest_session(rt, item, r))
    item = events_pb2.WorkItem(
        session_id=rec.session_id, tenant="default", stage=session_pb2.STAGE_INGEST, round=rec.round
    )
    await worker._handle(_Delivery(item))
    return await rt.sessions.get(rec.session_id)


# ---------------------------------------------------------------- the back-off rule


async def test_wait_out_outage_retries_until_the_call_works_and_gives_up_after_the_window():
    calls = []

    async def flaky():
        calls.append(time.monotonic())
        if len(calls) < 4:
            raise Unavailable("the store is restarting")
        return "done"

    assert await wait_out_outage(flaky, window_s=10, what="reading") == "done"
    gaps = [round(b - a, 1) for a, b in zip(calls, calls[1:], strict=False)]
    assert gaps == [0.2, 0.4, 0.8]  # back-off doubles

    async def down():
        raise Unavailable("no route to the store")

    started = time.monotonic()
    with pytest.raises(OutageTooLong, match=r"reading: still unavailable .* outage window is 1 s.*no route"):
        await wait_out_outage(down, window_s=1, what="reading")
    assert time.monotonic() - started < 1.5

    stop = asyncio.Event()
    stop.set()  # a stopping worker hands the work back at once instead of waiting
    with pytest.raises(Unavailable):
        await wait_out_outage(down, window_s=60, what="reading", stop=stop)


# ---------------------------------------------------------------- object store outages


@pytest.fixture
def proxied(runtime, seaweedfs):
    """The runtime with its object store reached through a TcpProxy the test can cut."""
    host, port = seaweedfs.endpoint.rsplit(":", 1)
    proxy = TcpProxy(host, int(port))
    settings = runtime.settings.replace(s3_endpoint=proxy.address, outage_window_s=30.0)
    store = ArtifactStore.from_settings(settings, connect_timeout=1.0, read_timeout=5.0, retries=0)
    try:
        yield dataclasses.replace(runtime, settings=settings, store=store), proxy
    finally:
        store.close()
        proxy.close()


async def _text_session(rt, direct_store) -> session_pb2.Session:
    doc = session_pb2.DocumentInfo(
        doc_id="d1", name="orchard.txt", kind="text", status=D.DOCUMENT_STATUS_PENDING
    )
    rec = await _session_with(rt, [doc])
    direct_store.put_bytes(keys.doc_original("default", rec.session_id, "d1"), TEXT.encode())
    return rec


async def test_an_object_store_outage_during_ingest_is_waited_out(proxied, store):
    rt, proxy = proxied
    rec = await _text_session(rt, store)
    proxy.cut()
    threading.Timer(3.0, proxy.restore).start()
    after = await _run_ingest(rt, rec)
    # before: the document was marked FAILED ("object store unreachable") and the session with it
    assert [d.status for d in after.documents] == [D.DOCUMENT_STATUS_READY], after
    assert after.state == S.SESSION_STATE_GENERATING and not after.HasField("error")
    assert store.exists(keys.doc_text("default", rec.session_id, "d1"))


async def test_an_object_store_outage_longer_than_the_window_fails_the_session_naming_it(proxied, store):
    rt, proxy = proxied
    rt = dataclasses.replace(rt, settings=rt.settings.replace(outage_window_s=1.5))
    rec = await _text_session(rt, store)
    proxy.cut()
    after = await _run_ingest(rt, rec)
    assert after.state == S.SESSION_STATE_FAILED
    assert after.error.code == "UNAVAILABLE"
    assert "outage window" in after.error.message and "object store" in after.error.message
    # the document itself is not blamed: it is still pending, and a retrain runs it
    assert [d.status for d in after.documents] == [D.DOCUMENT_STATUS_PENDING]


# ---------------------------------------------------------------- a linked server away


def flaky_server(down_for_s: float) -> DocsServer:
    """A real HTTP server with the orchard text that answers 503 for its first `down_for_s` s."""
    server = DocsServer()
    server.pages["/orchard.txt"] = ("text/plain; charset=utf-8", TEXT.encode())
    server.down_until = time.monotonic() + down_for_s
    return server


@pytest.fixture
def link_rt(runtime):
    return dataclasses.replace(runtime, settings=runtime.settings.replace(fetch_allow="127.0.0.1"))


async def _url_session(rt, url: str) -> session_pb2.Session:
    doc = session_pb2.DocumentInfo(
        doc_id="d1", name=url, kind="url", final_url=url, status=D.DOCUMENT_STATUS_PENDING
    )
    return await _session_with(rt, [doc])


async def test_a_linked_server_away_for_a_few_seconds_is_waited_out(link_rt):
    rt = dataclasses.replace(link_rt, settings=link_rt.settings.replace(outage_window_s=30.0))
    server = flaky_server(down_for_s=5.0)
    try:
        after = await _run_ingest(rt, await _url_session(rt, server.url("/orchard.txt")))
    finally:
        server.close()
    assert [d.status for d in after.documents] == [D.DOCUMENT_STATUS_READY], after.documents
    assert after.state == S.SESSION_STATE_GENERATING


async def test_a_link_away_past_the_window_fails_its_document_and_a_retrain_fetches_it_again(link_rt):
    rt = dataclasses.replace(link_rt, settings=link_rt.settings.replace(outage_window_s=1.0))
    server = flaky_server(down_for_s=3600)
    try:
        failed = await _run_ingest(rt, await _url_session(rt, server.url("/orchard.txt")))
        (doc,) = failed.documents
        assert doc.status == D.DOCUMENT_STATUS_FAILED and doc.retryable
        assert "503" in doc.error and "outage window" in doc.error
        assert failed.state == S.SESSION_STATE_FAILED

        server.down_until = 0.0  # the site is back
        api = SessionServicer(rt)
        again = (
            await api.RetrainSession(
                session_service_pb2.RetrainSessionRequest(session_id=failed.session_id), None
            )
        ).session
        # before: retrain skipped the failed document for good (it started from generation or failed)
        assert again.state == S.SESSION_STATE_QUEUED and again.round == 1
        assert [(d.status, d.retryable) for d in again.documents] == [(D.DOCUMENT_STATUS_PENDING, False)]
        after = await _run_ingest(rt, again)
    finally:
        server.close()
    assert [d.status for d in after.documents] == [D.DOCUMENT_STATUS_READY]
    assert after.state == S.SESSION_STATE_GENERATING


# ---------------------------------------------------------------- nothing stored without a session


async def test_a_refused_source_leaves_nothing_of_the_other_sources_stored(runtime, store):
    api = SessionServicer(runtime)
    req = session_service_pb2.CreateSessionRequest(
        name="two sources",
        sources=[
            session_service_pb2.Source(text=TEXT, name="notes.txt"),
            session_service_pb2.Source(upload_id=keys.new_id("u")),  # well-formed, never uploaded
        ],
    )
    with pytest.raises(NotFound, match="upload"):
        await api.CreateSession(req, None)
    # before: the pasted text was stored under a session that was never written
    assert store.list("default/") == []
    assert await runtime.sessions.list() == []


# ---------------------------------------------------------------- the reconciler


async def test_the_reconciler_queues_a_stuck_session_once_and_leaves_the_others(runtime):
    rt = runtime
    stuck = await _session_with(rt, [], state=S.SESSION_STATE_GENERATING)
    in_flight = await _session_with(rt, [], state=S.SESSION_STATE_TRAINING)
    await rt.enqueue(in_flight.session_id, "default", session_pb2.STAGE_TRAIN)
    review = await _session_with(rt, [], state=S.SESSION_STATE_AWAITING_REVIEW)
    ready = await _session_with(rt, [], state=S.SESSION_STATE_READY)
    fresh_now = time.time()
    # records younger than reconcile_idle_s are left alone: their publish may still be on its way
    assert await reconcile(rt, fresh_now) == []

    later = fresh_now + rt.settings.reconcile_idle_s + 1
    assert await reconcile(rt, later) == [stuck.session_id]
    assert await rt.bus.pending_work("qagen") == 1
    assert stuck.session_id in await rt.bus.work_sessions()
    # a second pass (or a second ingest replica) finds the work in flight and adds nothing
    assert await reconcile(rt, later) == []
    assert await rt.bus.pending_work("qagen") == 1
    assert await rt.bus.pending_work("train") == 1  # the one in flight was not queued twice
    assert {review.session_id, ready.session_id}.isdisjoint(await rt.bus.work_sessions())
