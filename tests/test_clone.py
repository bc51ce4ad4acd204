"""Cloning a shared bot (services/ingest/clone.py) on a real nats-server and SeaweedFS: a key of
another tenant copies the bot behind a share token into a new session of its own tenant, READY at
once with a copy of the adapter under the new id, or (pairs only) queued for training; originals,
checkpoints and passwords are not copied and the shared bot is untouched; unknown and revoked
tokens are NOT_FOUND, a key token is not a share token, a share link cannot clone; the same through
a real SessionService with API keys."""

from __future__ import annotations

import grpc
import pytest

from doclora.v1 import access_pb2, session_pb2, session_service_pb2
from services.common import access, keys
from services.common.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied
from services.ingest.clone import clone_shared_bot
from tests.test_deletion import (
    TENANT_A,
    TENANT_B,
    add_key,
    as_caller,
    bearer,
    make_session,
    objects_of,
    session_stub,
)

S = session_pb2.SessionState


async def share(rt, rec: session_pb2.Session, show_citations: bool = True) -> str:
    """A share link of `rec` in the access bucket; returns its token."""
    token, share_id, digest = access.new_token(access.SHARE_PREFIX)
    link = access_pb2.ShareLink(
        share_id=share_id, tenant=rec.tenant, session_id=rec.session_id, secret_sha256=digest,
        show_citations=show_citations,
    )  # fmt: skip
    link.created_at.GetCurrentTime()
    await access.AccessStore(rt.bus).add_share(link)
    return token


async def shared_bot(rt) -> tuple[session_pb2.Session, str]:
    """Tenant a's trained bot (two documents, round 1) with a share link; (record, token)."""
    rec = await make_session(rt, TENANT_A, rounds=1)
    meta = {"adapter_id": rec.adapter_id, "session_id": rec.session_id, "base_model": "smollm2", "round": 1}
    rt.store.put_json(keys.adapter_prefix(TENANT_A, rec.adapter_id) + "doclora.json", meta)
    return rec, await share(rt, rec)


async def test_a_clone_with_its_adapter_is_ready_at_once_in_the_callers_tenant(runtime):
    """Tenant b's key clones tenant a's shared bot: a new READY session of tenant b owned by that
    key, with the documents' text and pages, chunks, pairs and QA state, and the adapter under the
    new session id (its doclora.json says so); no original, checkpoint or password comes along and
    tenant a's objects are as they were."""
    rt = runtime
    src, token = await shared_bot(rt)
    before = sorted(rt.store.list(f"{TENANT_A}/"))
    as_caller(TENANT_B, key_id="kb")
    rec = await clone_shared_bot(rt, token, False, "")
    new = rec.session_id
    assert rec.tenant == TENANT_B and rec.state == S.SESSION_STATE_READY and rec.owner_key_id == "kb"
    assert rec.adapter_id == new and rec.name == src.name and rec.qa.pairs == src.qa.pairs
    assert [d.doc_id for d in rec.documents] == ["d1", "d2"] and not rec.options.passwords
    assert (await rt.sessions.get(new)).state == S.SESSION_STATE_READY
    session_files = {
        k.removeprefix(keys.session_prefix(TENANT_B, new)) for k in rt.store.list(f"{TENANT_B}/sessions/")
    }
    assert session_files == {
        "docs/d1/text.md", "docs/d1/pages.json", "docs/d2/text.md", "docs/d2/pages.json",
        "chunks.jsonl", "qa/pairs.jsonl", "qa/state.json",
    }  # fmt: skip
    adapter = keys.adapter_prefix(TENANT_B, new)
    assert sorted(rt.store.list(f"{TENANT_B}/adapters/")) == [
        adapter + n for n in ("adapter_config.json", "adapter_model.safetensors", "doclora.json")
    ]
    meta = rt.store.get_json(adapter + "doclora.json")
    assert meta["adapter_id"] == new and meta["session_id"] == new and meta["cloned_from"] == src.adapter_id
    assert rt.store.get_bytes(adapter + "adapter_model.safetensors") == b"weights"
    assert sorted(rt.store.list(f"{TENANT_A}/")) == before
    assert len(objects_of(rt.store, TENANT_B, new)) == 10


async def test_a_pairs_only_clone_is_queued_for_training_without_an_adapter(runtime):
    """With pairs_only the clone carries no adapter, waits for training (TRAINING, queued) and
    takes the name it was given."""
    rt = runtime
    _, token = await shared_bot(rt)
    as_caller(TENANT_B, key_id="kb")
    rec = await clone_shared_bot(rt, token, True, "  My copy ")
    assert rec.state == S.SESSION_STATE_TRAINING and not rec.adapter_id and rec.name == "My copy"
    assert rec.HasField("train_queued_at")
    assert rt.store.list(f"{TENANT_B}/adapters/") == []
    assert rt.store.exists(keys.qa_pairs(TENANT_B, rec.session_id))
    assert await rt.bus.pending_work("train") == 1


async def test_bad_tokens_and_callers_are_refused_and_nothing_is_copied(runtime):
    """An unknown token and a revoked one are NOT_FOUND; an API key's token is not a share token
    (INVALID_ARGUMENT); a share link cannot clone (PERMISSION_DENIED), nor can anyone through a link
    that hides the documents (no citations: a copy would hold their text); a bot without an adapter
    clones only with pairs_only (FAILED_PRECONDITION)."""
    rt = runtime
    src, token = await shared_bot(rt)
    unknown, _, _ = access.new_token(access.SHARE_PREFIX)
    revoked = await share(rt, src)
    await access.AccessStore(rt.bus).delete_share(revoked.split("_")[1])
    untrained = await make_session(rt, TENANT_A, rounds=0)
    await rt.sessions.update(untrained.session_id, lambda r: r.ClearField("adapter_id"))
    as_caller(TENANT_B)
    cases = [
        (unknown, False, NotFound, "revoked or never existed"),
        (revoked, False, NotFound, "revoked or never existed"),
        (await add_key(rt.bus, TENANT_A), False, InvalidArgument, "share link's token"),
        (await share(rt, untrained), False, FailedPrecondition, "clone its pairs only"),
        (await share(rt, src, show_citations=False), True, PermissionDenied, "without its documents"),
    ]
    for tok, pairs_only, error, message in cases:
        with pytest.raises(error, match=message):
            await clone_shared_bot(rt, tok, pairs_only, "")
    pairless = await make_session(rt, TENANT_A, rounds=0)
    rt.store.delete(keys.qa_pairs(TENANT_A, pairless.session_id))  # its documents' text is still there
    with pytest.raises(FailedPrecondition, match="no question-answer pairs"):
        await clone_shared_bot(rt, await share(rt, pairless), True, "")
    access.bind(await access.AccessStore(rt.bus).resolve(token))
    with pytest.raises(PermissionDenied):
        await clone_shared_bot(rt, token, False, "")
    assert rt.store.list(f"{TENANT_B}/") == []
    assert len(await rt.bus.kv_keys()) == 3  # the three of tenant a, no clone


async def test_clone_over_grpc_with_api_keys(runtime):
    """Through SessionService: tenant b's key clones the shared bot (201-like: the new session);
    the share token itself as the credentials is PERMISSION_DENIED."""
    rt = runtime
    _, token = await shared_bot(rt)
    key_b = await add_key(rt.bus, TENANT_B)
    req = session_service_pb2.CloneSharedBotRequest(share_token=token, name="copy")
    async with session_stub(rt) as stub:
        out = await stub.CloneSharedBot(req, metadata=bearer(key_b), timeout=20)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.CloneSharedBot(req, metadata=bearer(token), timeout=20)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert out.session.tenant == TENANT_B and out.session.state == S.SESSION_STATE_READY
    assert out.session.owner_key_id == key_b.split("_")[1] and out.session.name == "copy"
