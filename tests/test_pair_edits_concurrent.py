"""Pair edits that cannot be lost: two qagen replicas (two real gRPC servers, each with its own NATS
connection and S3 client, on the session's nats-server and SeaweedFS) edit the same session's
`qa/pairs.jsonl` at once. The store's conditional write (If-Match / If-None-Match, which SeaweedFS
honours) turns a lost update into a retry on the fresh object, so every edit lands, edits of
different fields of one pair merge, and the pair count in the record follows the last write."""

from __future__ import annotations

import asyncio
import contextlib
import threading

import pytest

from doclora.v1 import qagen_pb2, qagen_pb2_grpc, session_pb2
from services.common import keys
from services.common.errors import Conflict
from services.common.jsonl import from_jsonl, to_jsonl
from services.common.qapair import loose_pair
from services.common.runtime import Runtime
from services.qagen.service import EDIT_ATTEMPTS
from tests.fixtures.served import served

S = session_pb2.SessionState
TENANT = "default"
PAIRS = 24


def _question(i: int) -> str:
    return f"What is fact number {i} about the orchard?"


async def _reviewed_session(rt: Runtime) -> str:
    """A session waiting for review with PAIRS stored pairs of its one document."""
    sid = keys.new_id()
    pairs = [
        {
            **loose_pair(f"p{i:03d}", _question(i), f"Fact {i}.", "d1", "extractive").to_dict(),
            "split": "train",
        }
        for i in range(PAIRS)
    ]
    rt.store.put_bytes(keys.qa_pairs(TENANT, sid), to_jsonl(pairs), content_type="application/x-ndjson")
    doc = session_pb2.DocumentInfo(doc_id="d1", name="d1.md", status=session_pb2.DOCUMENT_STATUS_READY)
    rec = session_pb2.Session(
        session_id=sid, tenant=TENANT, state=S.SESSION_STATE_AWAITING_REVIEW, documents=[doc]
    )
    rec.qa.pairs = PAIRS
    await rt.sessions.create(rec)
    return sid


def _stored(rt: Runtime, sid: str) -> dict[str, dict]:
    return {p["pair_id"]: p for p in from_jsonl(rt.store.get_bytes(keys.qa_pairs(TENANT, sid)))}


@contextlib.asynccontextmanager
async def _replica(rt: Runtime):
    """A QAGenService stub on a server of its own, as `python -m services.qagen` registers it."""
    from services.qagen.__main__ import setup

    register, _ = await setup(rt)
    async with served(rt, register, qagen_pb2_grpc.QAGenServiceStub, auth="auto") as stub:
        yield stub


@pytest.fixture
async def replicas(runtime, nats_server):
    """Two QAGenService replicas: `runtime`'s, and one with its own NATS connection and S3 client."""
    other = await Runtime.connect(runtime.settings.replace(nats_url=nats_server.url), "replica-b")
    try:
        async with _replica(runtime) as a, _replica(other) as b:
            yield a, b
    finally:
        await other.close()


async def test_two_replicas_editing_different_pairs_at_once_lose_no_edit(runtime, replicas):
    """Each replica rewrites half the answers and adds pairs, all at once: every edit is there."""
    a, b = replicas
    sid = await _reviewed_session(runtime)
    half = PAIRS // 2

    def update(stub, i):
        return stub.UpdatePair(
            qagen_pb2.UpdatePairRequest(session_id=sid, pair_id=f"p{i:03d}", answer=f"Edited {i}."),
            timeout=60,
        )

    def add(stub, who, i):
        q = f"Which planting did replica {who} record as number {i}?"
        return stub.AddPair(
            qagen_pb2.AddPairRequest(session_id=sid, question=q, answer=f"Row {i}."), timeout=60
        )

    calls = [update(a, i) for i in range(half)] + [update(b, i) for i in range(half, PAIRS)]
    calls += [add(a, "A", i) for i in range(6)] + [add(b, "B", i) for i in range(6)]
    replies = await asyncio.gather(*calls)

    stored = _stored(runtime, sid)
    assert [stored[f"p{i:03d}"]["answer"] for i in range(PAIRS)] == [f"Edited {i}." for i in range(PAIRS)]
    added = {r.pair.pair_id for r in replies[PAIRS:]}
    assert len(added) == 12 and added <= stored.keys()
    assert len(stored) == PAIRS + 12
    rec = await runtime.sessions.get(sid)
    assert (rec.qa.pairs, rec.qa.edits) == (len(stored), PAIRS + 12)


async def test_two_replicas_editing_one_pair_at_once_merge_the_fields_and_the_last_answer_wins(
    runtime, replicas
):
    """Round after round, one replica rewrites a pair's question while the other rewrites its answer
    and the first its answer too, all at once: every call lands (a loser re-applies its edit to the
    fresh pairs, and with three writers it can lose at most twice), the question edit and the
    answer edits merge, the answer is one of the two, and no other pair changes."""
    a, b = replicas
    sid = await _reviewed_session(runtime)
    for r in range(6):
        q = f"What did the keepers log in round {r}?"
        await asyncio.gather(
            a.UpdatePair(qagen_pb2.UpdatePairRequest(session_id=sid, pair_id="p000", question=q), timeout=60),
            b.UpdatePair(
                qagen_pb2.UpdatePairRequest(session_id=sid, pair_id="p000", answer=f"B{r}."), timeout=60
            ),
            a.UpdatePair(
                qagen_pb2.UpdatePairRequest(session_id=sid, pair_id="p000", answer=f"A{r}."), timeout=60
            ),
        )
        pair = _stored(runtime, sid)["p000"]
        assert pair["question"] == q and pair["answer"] in {f"A{r}.", f"B{r}."}, pair
    stored = _stored(runtime, sid)
    assert all(stored[f"p{i:03d}"]["answer"] == f"Fact {i}." for i in range(1, PAIRS))
    rec = await runtime.sessions.get(sid)
    assert (rec.qa.edits, rec.qa.pairs) == (18, PAIRS)


@pytest.mark.parametrize("losses", [1, EDIT_ATTEMPTS])
async def test_an_edit_that_keeps_losing_the_race_is_refused_with_aborted_and_loses_nothing(
    runtime, monkeypatch, losses
):
    """Another replica writes the pairs between this edit's read and write, `losses` times: once, the
    edit is re-applied to the fresh pairs and both changes are there; every time, the call is
    refused as ABORTED ("retry") with the other replica's changes kept and none of its own."""
    from services.qagen import pairs as pairs_mod
    from services.qagen import service

    sid = await _reviewed_session(runtime)
    key = keys.qa_pairs(TENANT, sid)
    update, interruptions = pairs_mod.update_pair, []

    def interrupted(pairs, pair_id, question, answer):
        if len(interruptions) < losses:  # the other replica's edit lands first
            theirs = from_jsonl(runtime.store.get_bytes(key))
            theirs[1]["answer"] = f"Theirs {len(interruptions)}."
            runtime.store.put_bytes(key, to_jsonl(theirs))
            interruptions.append(1)
        return update(pairs, pair_id, question, answer)

    monkeypatch.setattr(pairs_mod, "update_pair", interrupted)
    call = service.QAGenServicer(runtime).UpdatePair(
        qagen_pb2.UpdatePairRequest(session_id=sid, pair_id="p000", answer="Mine."), None
    )
    stored_before = await runtime.sessions.get(sid)
    if losses < EDIT_ATTEMPTS:
        await call
        mine = "Mine."
    else:
        with pytest.raises(Conflict, match=f"session {sid} were changed meanwhile.*retry") as err:
            await call
        assert err.value.code == "ABORTED"
        mine = "Fact 0."
    stored = _stored(runtime, sid)
    assert stored["p000"]["answer"] == mine and stored["p001"]["answer"] == f"Theirs {losses - 1}."
    rec = await runtime.sessions.get(sid)
    assert rec.qa.edits == stored_before.qa.edits + (losses < EDIT_ATTEMPTS)


def test_a_conditional_put_refuses_a_stale_etag_and_an_existing_object(store):
    """put_bytes(if_match=) writes only over the object read; if_absent only where there is none."""
    first = store.put_bytes("a/k", b"one")
    data, etag = store.get_with_etag("a/k")
    assert (data, etag) == (b"one", first.etag)
    second = store.put_bytes("a/k", b"two", if_match=etag)
    with pytest.raises(Conflict, match="changed meanwhile"):
        store.put_bytes("a/k", b"three", if_match=etag)
    with pytest.raises(Conflict, match="changed meanwhile"):
        store.put_bytes("a/k", b"three", if_absent=True)
    assert store.get_with_etag("a/k") == (b"two", second.etag)
    store.put_bytes("a/new", b"x", if_absent=True)
    with pytest.raises(Conflict):
        store.put_bytes("a/gone", b"x", if_match=etag)
    assert not store.exists("a/gone") and store.get_bytes("a/new") == b"x"


def test_mutate_from_many_threads_applies_every_change_once(store):
    """Eight threads append to one object by `mutate` at once: each append is there exactly once."""

    def append(tag: str):
        return lambda data: (data or b"") + tag.encode() + b"\n"

    def work(t: int):
        for i in range(8):
            store.mutate("a/log", append(f"{t}-{i}"), attempts=50)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    lines = store.get_bytes("a/log").decode().split()
    assert sorted(lines) == sorted(f"{t}-{i}" for t in range(8) for i in range(8))
