"""Deleting a session and deleting one document (services/ingest/deletion.py) on a real nats-server
and SeaweedFS: after a delete nothing of the session is left in the store (documents, chunks,
pairs, checkpoints, the adapters of every round), nor its record or events, while another
session's objects are untouched; another tenant's session is NOT_FOUND and nothing is deleted; a
training run of the session stops and writes nothing after the delete; inference replicas drop the
session's adapters from memory and their cache folder; what a worker wrote after a delete is swept
up; and the same through a real SessionService with API keys. Also: a PDF's password leaves the
record once its document was ingested."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time

import grpc
import pytest

from doclora.v1 import access_pb2, events_pb2, session_pb2, session_service_pb2, session_service_pb2_grpc
from services.common import access, events, keys
from services.common.bus import EVENTS_STREAM
from services.common.errors import FailedPrecondition, NotFound
from services.common.jsonl import from_jsonl, to_jsonl
from services.ingest.deletion import delete_document, delete_session, sweep_orphans
from services.ingest.service import SessionServicer
from tests.fixtures.served import served

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
S = session_pb2.SessionState
D = session_pb2.DocumentStatus
TENANT_A, TENANT_B = "tenant-a", "tenant-b"


def as_caller(tenant: str, role: str = "member", key_id: str = "k1") -> None:
    """Act, for the rest of the test, as a key of `tenant` (as the auth interceptor binds one)."""
    access.bind(access.Caller(tenant, role, key_id))


def session_objects(store, tenant: str, sid: str, docs=("d1", "d2"), rounds: int = 2) -> dict:
    """Blocking: store what a trained session holds; returns the chunk and pair rows written."""
    chunks, pairs = [], []
    for d in docs:
        store.put_bytes(keys.doc_original(tenant, sid, d), f"original of {d}".encode())
        store.put_bytes(keys.doc_text(tenant, sid, d), f"Text of {d}.".encode())
        store.put_json(keys.doc_pages(tenant, sid, d), [{"page": 1, "start": 0}])
        for i in range(2):
            chunks.append({"chunk_id": f"{d}-c{i}", "doc_id": d, "text": f"chunk {i} of {d}"})
            pairs.append(
                {"pair_id": f"{d}-p{i}", "doc_id": d, "chunk_id": f"{d}-c{i}", "question": "q?", "answer": "a",
                 "split": "eval" if i else "train"}
            )  # fmt: skip
    store.put_bytes(keys.chunks(tenant, sid), to_jsonl(chunks))
    store.put_bytes(keys.qa_pairs(tenant, sid), to_jsonl(pairs))
    store.put_json(
        keys.qa_state(tenant, sid), {"done": list(docs), "failed": {}, "dropped": {d: {} for d in docs}}
    )
    store.put_bytes(keys.checkpoints(tenant, sid) + "state.pt", b"checkpoint")
    for r in range(rounds + 1):
        prefix = keys.adapter_prefix(tenant, keys.adapter_id_for(sid, r))
        store.put_json(prefix + "adapter_config.json", {"r": 4})
        store.put_bytes(prefix + "adapter_model.safetensors", b"weights")
    return {"chunks": chunks, "pairs": pairs}


async def make_session(
    rt,
    tenant: str,
    sid: str | None = None,
    *,
    state=S.SESSION_STATE_READY,
    docs=("d1", "d2"),
    rounds: int = 2,
) -> session_pb2.Session:
    """A trained session of `tenant` with its objects in the store and its record in the KV."""
    sid = sid or keys.new_id()
    rows = await rt.io(session_objects, rt.store, tenant, sid, docs, rounds)
    rec = session_pb2.Session(
        session_id=sid,
        tenant=tenant,
        name=f"bot {sid}",
        state=state,
        round=rounds,
        adapter_id=keys.adapter_id_for(sid, rounds),
        documents=[
            session_pb2.DocumentInfo(doc_id=d, name=f"{d}.pdf", status=D.DOCUMENT_STATUS_READY) for d in docs
        ],
        qa=session_pb2.QAStats(pairs=len(rows["pairs"]), chunks=len(rows["chunks"])),
    )
    rec.options.passwords["d1"] = "s3cret"
    return await rt.sessions.create(rec)


def objects_of(store, tenant: str, sid: str) -> list[str]:
    """Every object of session `sid`: its folder and the adapter of each of its rounds."""
    return [
        k
        for k in store.list(f"{tenant}/")
        if k.startswith(keys.session_prefix(tenant, sid))
        or keys.session_of_adapter(k.removeprefix(keys.adapters_prefix(tenant)).split("/")[0]) == sid
        and k.startswith(keys.adapters_prefix(tenant))
    ]


@contextlib.asynccontextmanager
async def deletion_notices(rt):
    """The `deleted.*` notices published while the block runs, as parsed JSON."""
    heard: list[dict] = []

    async def on(msg):
        heard.append(json.loads(msg.data))

    sub = await rt.bus.nc.subscribe(keys.deleted_subject("*"), cb=on)
    try:
        yield heard
    finally:
        await sub.unsubscribe()


async def test_deleting_a_session_removes_all_of_it_and_nothing_of_another(runtime):
    """Documents, chunks, pairs, QA state, checkpoints and the adapters of rounds 0-2 go, with the
    record and the events; a session whose id starts with the deleted one's keeps every object;
    replicas hear `deleted.{sid}` with the tenant."""
    rt = runtime
    as_caller(TENANT_A)
    rec = await make_session(rt, TENANT_A)
    sid = rec.session_id
    other = await make_session(rt, TENANT_A, sid + "b")  # its adapters match "{sid}*" as a plain prefix
    await events.publish(rt.bus, TENANT_A, sid, events_pb2.Event(state=events_pb2.StateChanged(state=rec.state)))
    mine, theirs = objects_of(rt.store, TENANT_A, sid), objects_of(rt.store, TENANT_A, other.session_id)
    assert len(mine) == 16 and len(theirs) == 16 and not set(mine) & set(theirs)

    async with deletion_notices(rt) as heard:
        removed = await delete_session(rt, sid)
        await asyncio.sleep(0.2)
    assert removed == 16
    assert sorted(rt.store.list(f"{TENANT_A}/")) == sorted(theirs)  # the other session untouched
    with pytest.raises(NotFound):
        await rt.bus.kv_get(sid)
    assert (await rt.sessions.get(other.session_id)).session_id == other.session_id
    info = await rt.bus.js.stream_info(EVENTS_STREAM, subjects_filter=f"events.{TENANT_A}.{sid}.>")
    assert not info.state.subjects
    assert heard == [{"tenant": TENANT_A, "session_id": sid}]


async def test_another_tenants_session_is_not_found_and_nothing_is_deleted(runtime):
    """Tenant b deleting tenant a's session id is told NOT_FOUND, as for an id that does not exist;
    the record and every object stay."""
    rt = runtime
    rec = await make_session(rt, TENANT_A)
    before = rt.store.list(f"{TENANT_A}/")
    as_caller(TENANT_B)
    async with deletion_notices(rt) as heard:
        with pytest.raises(NotFound, match="not found"):
            await delete_session(rt, rec.session_id)
        with pytest.raises(NotFound, match="not found"):
            await delete_session(rt, keys.new_id())
        with pytest.raises(NotFound):
            await delete_document(rt, rec.session_id, "d1")
    assert rt.store.list(f"{TENANT_A}/") == before
    await rt.bus.kv_get(rec.session_id)
    assert not heard


async def test_deleting_twice_is_not_found_the_second_time(runtime):
    """The second delete of the same session finds nothing to delete: NOT_FOUND."""
    rt = runtime
    as_caller(TENANT_A)
    rec = await make_session(rt, TENANT_A, rounds=0)
    assert await delete_session(rt, rec.session_id) == 12
    with pytest.raises(NotFound):
        await delete_session(rt, rec.session_id)
    assert rt.store.list(f"{TENANT_A}/") == []


async def test_a_queued_session_is_cancelled_and_its_queued_work_writes_nothing(runtime):
    """A session just created (QUEUED, its ingest queued) is deleted; the ingest worker then drops
    the work for the unknown session and stores nothing under it."""
    from services.common.stage import StageWorker
    from services.ingest import session_rules
    from services.ingest.worker import ingest_session

    rt = runtime
    rec = await session_rules.create_session(
        rt, "queued", [session_service_pb2.Source(text="The orchard was founded in 1987 by Ilse Marrow.")],
        session_pb2.SessionOptions(),
    )  # fmt: skip
    assert await rt.bus.pending_work("ingest") == 1
    assert await delete_session(rt, rec.session_id) == 1  # the stored original
    worker = StageWorker(rt, session_pb2.STAGE_INGEST, lambda item, r: ingest_session(rt, item, r))
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    for _ in range(100):
        if await rt.bus.pending_work("ingest") == 0:
            break
        await asyncio.sleep(0.1)
    stop.set()
    await asyncio.wait_for(task, 10)
    assert await rt.bus.pending_work("ingest") == 0
    assert rt.store.list(f"{rt.settings.tenant}/") == []


async def run_ingest_until(rt, sid: str, done) -> session_pb2.Session:
    """Run the ingest worker until `done(record)`; returns the record."""
    from services.common.stage import StageWorker
    from services.ingest.worker import ingest_session

    worker = StageWorker(rt, session_pb2.STAGE_INGEST, lambda item, r: ingest_session(rt, item, r))
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    try:
        for _ in range(600):
            rec = session_pb2.Session.FromString((await rt.bus.kv_get(sid))[0])
            if done(rec):
                return rec
            await asyncio.sleep(0.1)
        raise AssertionError(f"ingest did not finish: {rec}")
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


async def test_a_pdf_password_is_used_for_extraction_and_then_dropped_from_the_record(runtime):
    """An encrypted PDF uploaded with its password is extracted (its text is stored) and the raw
    record in the KV keeps no password once its ingest ended."""
    from services.ingest import session_rules
    from tests.test_extract import encrypt_pdf, make_pdf

    rt = runtime
    tenant = rt.settings.tenant
    locked = encrypt_pdf(
        make_pdf([["The night ferry leaves Lisk at nine in the evening every day."]]), "s3cret"
    )
    upload_id = keys.new_id("u")
    rt.store.put_bytes(keys.upload(tenant, upload_id), locked, metadata={"filename": "locked.pdf"})
    rec = await session_rules.create_session(
        rt,
        "locked",
        [session_service_pb2.Source(upload_id=upload_id, password="s3cret")],
        session_pb2.SessionOptions(),
    )
    sid, doc_id = rec.session_id, rec.documents[0].doc_id
    raw = session_pb2.Session.FromString((await rt.bus.kv_get(sid))[0])
    assert dict(raw.options.passwords) == {doc_id: "s3cret"}  # kept until it is used
    rec = await run_ingest_until(rt, sid, lambda r: r.documents[0].status != D.DOCUMENT_STATUS_PENDING)
    assert rec.documents[0].status == D.DOCUMENT_STATUS_READY, rec.documents[0].error
    assert not rec.options.passwords and b"s3cret" not in (await rt.bus.kv_get(sid))[0]
    assert "night ferry leaves Lisk" in rt.store.get_bytes(keys.doc_text(tenant, sid, doc_id)).decode()


@pytest.fixture
def train_rt(runtime, monkeypatch):
    """The runtime with the tiny Llama as the base model (as tests/test_trainer_worker.py)."""
    import services.common.model as model_module
    from services.trainer import worker
    from tests.test_model import real_tokenizer, tiny_llama

    tok = real_tokenizer()
    monkeypatch.setattr(
        model_module, "load_base_model", lambda settings, for_training=False: (tiny_llama(len(tok)), tok)
    )
    monkeypatch.setattr(worker, "CANCEL_POLL_S", 0.2)
    settings = runtime.settings.replace(
        train_precision="fp32", train_checkpoint_every_steps=1, train_eval_max_new_tokens=2
    )
    return dataclasses.replace(runtime, settings=settings)


async def test_a_training_run_stops_and_writes_nothing_after_its_session_is_deleted(train_rt):
    """A run with many steps is deleted after its first checkpoint reached the store: it stops
    within seconds, stores no adapter, and leaves no checkpoint (nothing of the session remains)."""
    from services.trainer import plan, worker

    rt = train_rt
    tenant = rt.settings.tenant
    sid = keys.new_id()
    pairs = [
        {"pair_id": f"p{i}", "chunk_id": f"c{i}", "doc_id": "d1", "question": f"Code of crate {i}?",
         "answer": f"Crate {i} has code {1000 + i}."}
        for i in range(6)
    ]  # fmt: skip
    rt.store.put_bytes(keys.qa_pairs(tenant, sid), to_jsonl(pairs))
    rec = await rt.sessions.create(
        session_pb2.Session(
            session_id=sid, tenant=tenant, state=S.SESSION_STATE_TRAINING,
            options=session_pb2.SessionOptions(max_steps=2000),
        )
    )  # fmt: skip
    item = events_pb2.WorkItem(session_id=sid, tenant=tenant, stage=session_pb2.STAGE_TRAIN)
    run = asyncio.create_task(worker.train_session(rt, item, rec))
    checkpoint = plan.checkpoint_key(tenant, sid, 0)
    for _ in range(600):
        if rt.store.exists(checkpoint) or run.done():
            break
        await asyncio.sleep(0.1)
    assert rt.store.exists(checkpoint) and not run.done()
    await delete_session(rt, sid)
    started = time.monotonic()
    await asyncio.wait_for(run, 60)
    assert time.monotonic() - started < 30
    await asyncio.sleep(0.5)  # anything still on its way would land now
    assert objects_of(rt.store, tenant, sid) == []
    assert rt.store.list(f"{tenant}/") == []


async def test_the_orphan_sweep_deletes_what_a_worker_wrote_after_the_delete(runtime):
    """Objects of a session whose record is gone (written after its delete) stay while they are
    fresh (a session being created stores them before its record) and go once older than the
    grace; a live session's objects never do."""
    rt = runtime
    live = await make_session(rt, TENANT_A, rounds=1)
    gone = keys.new_id()
    await rt.io(session_objects, rt.store, TENANT_A, gone, ("d1",), 1)
    mine = objects_of(rt.store, TENANT_A, gone)
    assert len(mine) == 11
    assert await sweep_orphans(rt, time.time(), grace_s=3600) == 0
    assert await sweep_orphans(rt, time.time() + 7200, grace_s=3600) == 11
    assert objects_of(rt.store, TENANT_A, gone) == []
    assert len(objects_of(rt.store, TENANT_A, live.session_id)) == 14


async def test_deleting_a_document_removes_its_files_chunks_pairs_and_password(runtime):
    """d1 leaves the record (and its password), its files, its chunk and pair rows and the QA state;
    d2 and the adapter stay; the record's pair and chunk counts follow."""
    rt = runtime
    as_caller(TENANT_A)
    rec = await make_session(rt, TENANT_A)
    sid = rec.session_id
    rec, removed = await delete_document(rt, sid, "d1")
    assert removed == 3
    assert [d.doc_id for d in rec.documents] == ["d2"] and "d1" not in rec.options.passwords
    assert (
        rec.qa.pairs == 2 and rec.qa.chunks == 2 and rec.qa.eval_pairs == 1 and rec.qa.chunks_with_pairs == 2
    )
    assert rec.adapter_id == keys.adapter_id_for(sid, 2) and rec.state == S.SESSION_STATE_READY
    stored = rt.store.list(keys.session_prefix(TENANT_A, sid))
    assert not [k for k in stored if "/docs/d1/" in k]
    assert [k for k in stored if "/docs/d2/" in k]
    for key in (keys.chunks(TENANT_A, sid), keys.qa_pairs(TENANT_A, sid)):
        assert {r["doc_id"] for r in from_jsonl(rt.store.get_bytes(key))} == {"d2"}
    state = rt.store.get_json(keys.qa_state(TENANT_A, sid))
    assert state["done"] == ["d2"] and "d1" not in state["dropped"]
    assert rt.store.exists(keys.adapter_prefix(TENANT_A, rec.adapter_id) + "adapter_model.safetensors")
    raw = session_pb2.Session.FromString((await rt.bus.kv_get(sid))[0])
    assert [d.doc_id for d in raw.documents] == ["d2"] and not raw.options.passwords


@pytest.mark.parametrize(
    ("state", "doc_id", "error", "message"),
    [
        (
            S.SESSION_STATE_TRAINING,
            "d1",
            FailedPrecondition,
            "once the session is ready, failed or cancelled",
        ),
        (S.SESSION_STATE_READY, "d-unknown", NotFound, "document 'd-unknown' not found"),
    ],
    ids=["while-training", "unknown-doc-id"],
)
async def test_a_document_is_not_deleted_while_the_session_runs_or_when_unknown(
    runtime, state, doc_id, error, message
):
    """Deleting a document while the session trains is FAILED_PRECONDITION, an unknown doc id
    NOT_FOUND; the record and the objects stay as they were."""
    rt = runtime
    as_caller(TENANT_A)
    rec = await make_session(rt, TENANT_A, state=state)
    before = rt.store.list(f"{TENANT_A}/")
    with pytest.raises(error, match=message):
        await delete_document(rt, rec.session_id, doc_id)
    assert rt.store.list(f"{TENANT_A}/") == before
    assert len((await rt.sessions.get(rec.session_id)).documents) == 2


async def test_the_last_document_is_not_deleted(runtime):
    """A session's only document cannot go (delete the session instead): FAILED_PRECONDITION."""
    rt = runtime
    as_caller(TENANT_A)
    rec = await make_session(rt, TENANT_A, docs=("d1",))
    with pytest.raises(FailedPrecondition, match="delete the session instead"):
        await delete_document(rt, rec.session_id, "d1")


async def test_inference_replicas_drop_a_deleted_sessions_adapters(runtime, tmp_path):
    """An inference replica's forget job, on `deleted.{sid}`, evicts the session's loaded adapter,
    drops its passage index and deletes its cached folders (of every round) while another
    session's stay; on start it prunes cached folders the store no longer has."""
    from peft import LoraConfig, get_peft_model

    from services.inference.adapter_store import adapter_fetcher, adapter_ref
    from services.inference.adapters import AdapterCache
    from services.inference.forget import forgetter
    from services.inference.retrieve import IndexCache, build_index
    from tests.test_model import tiny_llama

    rt = runtime
    as_caller(TENANT_A)
    folder = tmp_path / "peft"
    get_peft_model(tiny_llama(128), LoraConfig(r=4, target_modules=["q_proj", "v_proj"])).save_pretrained(
        folder
    )
    rec = await make_session(rt, TENANT_A, rounds=1)
    other = await make_session(rt, TENANT_A, rounds=0)
    for r in (rec, other):
        rt.store.upload_dir(keys.adapter_prefix(TENANT_A, r.adapter_id), folder)
    cache_dir = tmp_path / "cache"
    stale = cache_dir / TENANT_B / keys.new_id()  # a deletion this replica missed while down
    stale.mkdir(parents=True)
    (stale / "adapter_config.json").write_text("{}")
    adapters = AdapterCache(adapter_fetcher(rt, cache_dir))
    adapters.attach(tiny_llama(128))
    ref, other_ref = adapter_ref(TENANT_A, rec.adapter_id), adapter_ref(TENANT_A, other.adapter_id)
    for r in (ref, other_ref):
        adapters.unpin(await asyncio.to_thread(adapters.pin, r))
    old_round = cache_dir / TENANT_A / keys.adapter_id_for(rec.session_id, 0)
    old_round.mkdir()  # round 0's folder, cached before round 1 was trained
    assert adapters.loaded() == [ref, other_ref]

    indexes = IndexCache()
    for r in (rec, other):
        indexes.put((r.session_id, "etag-1"), build_index([], None))

    stop = asyncio.Event()
    job = asyncio.create_task(forgetter(rt, adapters, cache_dir, indexes)(stop))
    for _ in range(50):
        if not stale.exists():
            break
        await asyncio.sleep(0.1)
    assert not stale.exists()
    await delete_session(rt, rec.session_id)
    for _ in range(50):
        if ref not in adapters.loaded():
            break
        await asyncio.sleep(0.1)
    stop.set()
    await asyncio.wait_for(job, 10)
    assert adapters.loaded() == [other_ref]
    assert indexes.get((rec.session_id, "etag-1")) is None and indexes.get((other.session_id, "etag-1"))
    assert sorted(p.name for p in (cache_dir / TENANT_A).iterdir()) == [other.adapter_id]
    adapters.detach()


# ---------------------------------------------------------------- over gRPC, with API keys


async def add_key(bus, tenant: str, role=access_pb2.ROLE_MEMBER) -> str:
    """A new API key of `tenant` in the access bucket; returns its token."""
    token, key_id, digest = access.new_token(access.KEY_PREFIX)
    key = access_pb2.ApiKey(key_id=key_id, tenant=tenant, role=role, name="test", secret_sha256=digest)
    key.created_at.GetCurrentTime()
    await access.AccessStore(bus).add_key(key)
    return token


def session_stub(rt):
    """A real SessionService on a port behind the auth interceptor (API keys required)."""

    def register(server):
        session_service_pb2_grpc.add_SessionServiceServicer_to_server(SessionServicer(rt), server)
        return ["doclora.v1.SessionService"]

    return served(rt, register, session_service_pb2_grpc.SessionServiceStub)


def bearer(token: str):
    return (("authorization", f"Bearer {token}"),)


async def test_delete_session_and_document_over_grpc_with_api_keys(runtime):
    """Through SessionService: tenant b's key gets NOT_FOUND for tenant a's session and document;
    tenant a's key deletes a document (the record comes back without it and without passwords),
    then the session (objects_deleted), and a second delete is NOT_FOUND."""
    rt = runtime
    rec = await make_session(rt, TENANT_A)
    sid = rec.session_id
    key_a, key_b = await add_key(rt.bus, TENANT_A), await add_key(rt.bus, TENANT_B)
    async with session_stub(rt) as stub:
        for call in (
            stub.DeleteSession(
                session_service_pb2.DeleteSessionRequest(session_id=sid), metadata=bearer(key_b)
            ),
            stub.DeleteDocument(
                session_service_pb2.DeleteDocumentRequest(session_id=sid, doc_id="d1"), metadata=bearer(key_b)
            ),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call
            assert info.value.code() == grpc.StatusCode.NOT_FOUND
        assert len(objects_of(rt.store, TENANT_A, sid)) == 16

        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.DeleteSession(session_service_pb2.DeleteSessionRequest(session_id=sid), timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED

        doc = await stub.DeleteDocument(
            session_service_pb2.DeleteDocumentRequest(session_id=sid, doc_id="d1"),
            metadata=bearer(key_a),
            timeout=10,
        )
        assert doc.objects_deleted == 3 and [d.doc_id for d in doc.session.documents] == ["d2"]
        assert not doc.session.options.passwords
        out = await stub.DeleteSession(
            session_service_pb2.DeleteSessionRequest(session_id=sid), metadata=bearer(key_a), timeout=10
        )
        assert out.objects_deleted == 13
        assert objects_of(rt.store, TENANT_A, sid) == []
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.DeleteSession(
                session_service_pb2.DeleteSessionRequest(session_id=sid), metadata=bearer(key_a), timeout=10
            )
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
