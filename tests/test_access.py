"""Tenants, API keys, share links and deletion on the whole local stack (real processes, started by
`doclora up`): tenant B gets NOT_FOUND for every object of tenant A over HTTP and over gRPC, sees
none of them in lists, and cannot guess its way in; a share token chats with its one bot and every
other route refuses it; revoking a key or a link takes effect at once; per-key limits answer 429
with Retry-After; deleting a bot leaves nothing of it in the store."""

from __future__ import annotations

import asyncio
import json
import secrets

import grpc
import httpx
import pytest

from doclora.v1 import (
    access_pb2,
    access_pb2_grpc,
    inference_pb2,
    inference_pb2_grpc,
    ingest_pb2,
    ingest_pb2_grpc,
    qagen_pb2,
    qagen_pb2_grpc,
    session_service_pb2,
    session_service_pb2_grpc,
    trainer_pb2,
    trainer_pb2_grpc,
)
from services.common.store import ArtifactStore
from tests.test_e2e import (  # noqa: F401
    TEXT,
    TIMEOUT,
    _cli,
    docs_server,  # noqa: F401  (the stack fixture needs it)
    events_until_final,
    stack,
)

pytestmark = pytest.mark.e2e
SHORT = TEXT.split("## Harvest")[0]


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def make_key(base: str, tenant: str, **limits) -> str:
    """A member key of `tenant`, made by the loopback caller without credentials (the default admin)."""
    with httpx.Client(base_url=base, timeout=TIMEOUT) as c:
        resp = c.post("/api/v1/keys", json={"tenant": tenant, "name": f"{tenant} test", "limits": limits})
    assert resp.status_code == 201, resp.text
    body = resp.json()
    assert body["token"].startswith("dlk_") and "secret_sha256" not in body["key"]
    return body["token"]


@pytest.fixture(scope="module")
def world(stack):  # noqa: F811
    """Tenant A's READY bot (with an upload and a pair id) and keys of tenants A and B."""
    env, base = stack
    key_a, key_b = make_key(base, "tenant-a"), make_key(base, "tenant-b")
    with httpx.Client(base_url=base, timeout=TIMEOUT, headers=bearer(key_a)) as c:
        upload = c.post("/api/v1/uploads", files={"file": ("notes.txt", b"Brightmoss glows green at night." * 4)})
        assert upload.status_code == 201, upload.text
        resp = c.post("/api/v1/sessions", json={"text": SHORT, "name": "orchard-a", "max_steps": 4})
        assert resp.status_code == 201, resp.text
        sid = resp.json()["session_id"]
    events = events_until_final(base, sid, headers=bearer(key_a))
    final = events[-1][1]["session"]
    assert final["state"] == "SESSION_STATE_READY", final
    with httpx.Client(base_url=base, timeout=TIMEOUT, headers=bearer(key_a)) as c:
        pair_id = c.get(f"/api/v1/sessions/{sid}/qa").json()["pairs"][0]["pair_id"]
    return {
        "env": env,
        "base": base,
        "a": key_a,
        "b": key_b,
        "sid": sid,
        "doc_id": final["documents"][0]["doc_id"],
        "adapter_id": final["adapter_id"],
        "upload_id": upload.json()["upload_id"],
        "pair_id": pair_id,
    }


def http_routes(w: dict, sid: str) -> list[tuple[str, str, dict | None]]:
    """Every HTTP route that reaches an object of a session (method, path, JSON body)."""
    doc, pair = w["doc_id"], w["pair_id"]
    chat = {"messages": [{"role": "user", "content": "Who founded the orchard?"}], "stream": False}
    return [
        ("GET", f"/api/v1/sessions/{sid}", None),
        ("GET", f"/api/v1/sessions/{sid}/events", None),
        ("GET", f"/api/v1/sessions/{sid}/documents", None),
        ("GET", f"/api/v1/sessions/{sid}/documents/{doc}/text", None),
        ("GET", f"/api/v1/sessions/{sid}/qa", None),
        ("GET", f"/api/v1/sessions/{sid}/qa/export", None),
        ("POST", f"/api/v1/sessions/{sid}/qa", {"question": "Q?", "answer": "A."}),
        ("PATCH", f"/api/v1/sessions/{sid}/qa/{pair}", {"answer": "changed"}),
        ("DELETE", f"/api/v1/sessions/{sid}/qa/{pair}", None),
        ("POST", f"/api/v1/sessions/{sid}/qa/import", None),
        ("POST", f"/api/v1/sessions/{sid}/cancel", None),
        ("POST", f"/api/v1/sessions/{sid}/approve", None),
        ("POST", f"/api/v1/sessions/{sid}/retrain", {"max_steps": 2}),
        ("POST", f"/api/v1/sessions/{sid}/sources", {"text": "More text about brightmoss. " * 5}),
        ("GET", f"/api/v1/adapters/{w['adapter_id'] if sid == w['sid'] else sid}", None),
        ("GET", f"/api/v1/sessions/{sid}/adapter.zip", None),
        ("POST", f"/api/v1/bots/{sid}/chat", chat),
        ("POST", f"/api/v1/sessions/{sid}/shares", {"show_citations": True}),
        ("GET", f"/api/v1/sessions/{sid}/shares", None),
        ("DELETE", f"/api/v1/sessions/{sid}/documents/{doc}", None),
        ("DELETE", f"/api/v1/sessions/{sid}", None),
        ("POST", "/v1/chat/completions", {"model": sid, "messages": [{"role": "user", "content": "hi"}]}),
    ]


def send(c: httpx.Client, method: str, path: str, body: dict | None) -> httpx.Response:
    if path.endswith("/qa/import"):
        return c.post(path, files={"file": ("pairs.jsonl", b'{"question": "Q?", "answer": "A."}\n')})
    return c.request(method, path, json=body)


def test_tenant_b_gets_not_found_for_every_object_of_tenant_a_over_http(world):
    """Every route on A's session answers B exactly as for an id that does not exist, and A's
    session is unchanged afterwards (nothing was deleted, cancelled or edited)."""
    w = world
    ghost = secrets.token_hex(8)
    with httpx.Client(base_url=w["base"], timeout=TIMEOUT, headers=bearer(w["b"])) as c:
        for (method, path, body), (_, ghost_path, ghost_body) in zip(
            http_routes(w, w["sid"]), http_routes(w, ghost), strict=True
        ):
            resp, unknown = send(c, method, path, body), send(c, method, ghost_path, ghost_body)
            assert resp.status_code == 404, (method, path, resp.status_code, resp.text)
            assert unknown.status_code == 404, (method, ghost_path, unknown.status_code)
            # the same answer as for a made-up id, the id aside: nothing to tell them apart
            assert resp.text.replace(w["sid"], "X").replace(w["adapter_id"], "X") == unknown.text.replace(
                ghost, "X"
            ), (path, resp.text, unknown.text)
        # lists: none of A's
        assert all(s["session_id"] != w["sid"] for s in c.get("/api/v1/sessions").json()["sessions"])
        assert w["sid"] not in {m["id"] for m in c.get("/v1/models").json()["data"]}
        # an upload of A's cannot be taken into B's session
        resp = c.post("/api/v1/sessions", json={"upload_ids": [w["upload_id"]]})
        assert resp.status_code == 404, resp.text
    with httpx.Client(base_url=w["base"], timeout=TIMEOUT, headers=bearer(w["a"])) as c:
        mine = c.get(f"/api/v1/sessions/{w['sid']}").json()
        assert mine["state"] == "SESSION_STATE_READY" and len(mine["documents"]) == 1
        assert any(p["pair_id"] == w["pair_id"] for p in c.get(f"/api/v1/sessions/{w['sid']}/qa").json()["pairs"])
        assert w["sid"] in {m["id"] for m in c.get("/v1/models").json()["data"]}
        # A's own upload still works for A
        assert c.get("/api/v1/sessions").json()["sessions"][0]["session_id"] == w["sid"]


async def grpc_refusals(w: dict, token: str) -> dict[str, grpc.StatusCode]:
    """Each gRPC method on A's objects, called straight on the services with `token`: its status."""
    env, sid, doc = w["env"], w["sid"], w["doc_id"]
    md = (("authorization", f"Bearer {token}"),)
    out: dict[str, grpc.StatusCode] = {}
    channels = {name: grpc.aio.insecure_channel(env[f"DOCLORA_{name.upper()}_ADDR"]) for name in ("ingest", "qagen", "trainer", "inference")}
    sessions = session_service_pb2_grpc.SessionServiceStub(channels["ingest"])
    ingest = ingest_pb2_grpc.IngestServiceStub(channels["ingest"])
    qagen = qagen_pb2_grpc.QAGenServiceStub(channels["qagen"])
    trainer = trainer_pb2_grpc.TrainerServiceStub(channels["trainer"])
    inference = inference_pb2_grpc.InferenceServiceStub(channels["inference"])
    access = access_pb2_grpc.AccessServiceStub(channels["ingest"])
    S = session_service_pb2
    unary = {
        "GetSession": (sessions.GetSession, S.GetSessionRequest(session_id=sid)),
        "CancelSession": (sessions.CancelSession, S.CancelSessionRequest(session_id=sid)),
        "ApproveSession": (sessions.ApproveSession, S.ApproveSessionRequest(session_id=sid)),
        "RetrainSession": (sessions.RetrainSession, S.RetrainSessionRequest(session_id=sid)),
        "DeleteSession": (sessions.DeleteSession, S.DeleteSessionRequest(session_id=sid)),
        "DeleteDocument": (sessions.DeleteDocument, S.DeleteDocumentRequest(session_id=sid, doc_id=doc)),
        "AddSource": (ingest.AddSource, ingest_pb2.AddSourceRequest(session_id=sid, source=S.Source(text="x " * 30))),
        "ListDocuments": (ingest.ListDocuments, ingest_pb2.ListDocumentsRequest(session_id=sid)),
        "GetDocumentText": (ingest.GetDocumentText, ingest_pb2.GetDocumentTextRequest(session_id=sid, doc_id=doc)),
        "ListPairs": (qagen.ListPairs, qagen_pb2.ListPairsRequest(session_id=sid)),
        "AddPair": (qagen.AddPair, qagen_pb2.AddPairRequest(session_id=sid, question="Q?", answer="A.")),
        "UpdatePair": (qagen.UpdatePair, qagen_pb2.UpdatePairRequest(session_id=sid, pair_id=w["pair_id"], answer="x")),
        "DeletePair": (qagen.DeletePair, qagen_pb2.DeletePairRequest(session_id=sid, pair_id=w["pair_id"])),
        "GetAdapter": (trainer.GetAdapter, trainer_pb2.GetAdapterRequest(adapter_id=w["adapter_id"])),
        "CreateShare": (access.CreateShare, access_pb2.CreateShareRequest(session_id=sid)),
        # an upload of A's taken into a new session of B's
        "CreateSession(upload)": (
            sessions.CreateSession,
            S.CreateSessionRequest(sources=[S.Source(upload_id=w["upload_id"])]),
        ),
        "ListShares": (access.ListShares, access_pb2.ListSharesRequest(session_id=sid)),
    }
    streams = {
        "WatchSession": (sessions.WatchSession, S.WatchSessionRequest(session_id=sid)),
        "ExportPairs": (qagen.ExportPairs, qagen_pb2.ExportPairsRequest(session_id=sid)),
        "ExportAdapter": (trainer.ExportAdapter, trainer_pb2.ExportAdapterRequest(session_id=sid)),
        "Chat": (
            inference.Chat,
            inference_pb2.ChatRequest(bot_id=sid, messages=[inference_pb2.ChatMessage(role="user", content="hi")]),
        ),
    }
    try:
        for name, (fn, req) in unary.items():
            try:
                await fn(req, metadata=md, timeout=60)
                out[name] = grpc.StatusCode.OK
            except grpc.aio.AioRpcError as exc:
                out[name] = exc.code()
        for name, (fn, req) in streams.items():
            try:
                await fn(req, metadata=md, timeout=60).read()
                out[name] = grpc.StatusCode.OK
            except grpc.aio.AioRpcError as exc:
                out[name] = exc.code()
        listed = await sessions.ListSessions(S.ListSessionsRequest(), metadata=md, timeout=30)
        out["ListSessions has A's"] = any(s.session_id == sid for s in listed.sessions)
        bots = await inference.ListBots(inference_pb2.ListBotsRequest(), metadata=md, timeout=30)
        out["ListBots has A's"] = any(b.bot_id == sid for b in bots.bots)
    finally:
        for ch in channels.values():
            await ch.close()
    return out


def test_tenant_b_gets_not_found_for_every_object_of_tenant_a_over_grpc(world):
    """Straight on the services, without the gateway: every method on A's objects is NOT_FOUND for
    B, and B's lists hold none of them."""
    got = asyncio.run(grpc_refusals(world, world["b"]))
    assert got.pop("ListSessions has A's") is False and got.pop("ListBots has A's") is False
    assert got == dict.fromkeys(got, grpc.StatusCode.NOT_FOUND), got


def test_guessing_is_refused_wrong_secrets_and_revoked_keys_are_unauthenticated(world):
    w = world
    prefix, key_id, _ = w["a"].split("_", 2)
    forged = f"{prefix}_{key_id}_{secrets.token_urlsafe(32)}"  # A's key id, a guessed secret
    with httpx.Client(base_url=w["base"], timeout=TIMEOUT) as c:
        for token in (forged, "dlk_0000000000000000_" + "x" * 43, "dls_" + "0" * 16 + "_" + "y" * 43, w["a"] + "x"):
            resp = c.get(f"/api/v1/sessions/{w['sid']}", headers=bearer(token))
            assert resp.status_code == 401, (token, resp.text)
            assert resp.json()["error"]["code"] == "UNAUTHENTICATED"
        resp = c.get("/v1/models", headers=bearer(forged))
        assert resp.status_code == 401 and resp.json()["error"]["type"] == "authentication_error"
        # a key revoked is refused on the next call
        doomed = make_key(w["base"], "tenant-c")
        assert c.get("/api/v1/sessions", headers=bearer(doomed)).status_code == 200
        key_id = doomed.split("_")[1]
        assert c.delete(f"/api/v1/keys/{key_id}").json()["key"]["revoked_at"]
        assert c.get("/api/v1/sessions", headers=bearer(doomed)).status_code == 401
        listed = c.get("/api/v1/keys", params={"include_revoked": True}).json()["keys"]
        assert any(k["key_id"] == key_id and k["revoked_at"] for k in listed)
        assert all(k["key_id"] != key_id for k in c.get("/api/v1/keys").json()["keys"])
        # members do not manage keys
        assert c.post("/api/v1/keys", json={"tenant": "x"}, headers=bearer(w["b"])).status_code == 403
        assert c.get("/api/v1/keys", headers=bearer(w["b"])).status_code == 403
        # on loopback, a bearer that is not a doclora token (the OpenAI SDKs always send one) is
        # no credentials: the default tenant
        assert c.get(f"/api/v1/sessions/{w['sid']}", headers=bearer("sk-unused")).status_code == 404
        assert c.get("/api/v1/me", headers=bearer("unused")).json()["tenant"] == "default"
        # the anonymous loopback caller is the default tenant's: it sees none of A's
        assert all(s["tenant"] == "default" for s in c.get("/api/v1/sessions").json()["sessions"])
        assert c.get(f"/api/v1/sessions/{w['sid']}").status_code == 404


def test_a_share_link_chats_with_its_bot_only_and_dies_when_revoked(world):
    """The share token chats with its bot; every other route of the API (all of openapi.json, with
    A's ids in the path) refuses it; citations only when allowed; revoked, it is refused at once."""
    w = world
    with httpx.Client(base_url=w["base"], timeout=TIMEOUT, headers=bearer(w["a"])) as c:
        made = c.post(f"/api/v1/sessions/{w['sid']}/shares", json={"show_citations": False, "name": "friends"})
        assert made.status_code == 201, made.text
        token, share_id = made.json()["token"], made.json()["share"]["share_id"]
        assert made.json()["url"] == f"/s/{token}" and token.startswith("dls_")
        listed = c.get(f"/api/v1/sessions/{w['sid']}/shares").json()["shares"]
        assert [s["share_id"] for s in listed] == [share_id] and "secret_sha256" not in listed[0]
        with_cites = c.post(f"/api/v1/sessions/{w['sid']}/shares", json={"show_citations": True}).json()["token"]
        spec = c.get("/openapi.json").json()
    chat = {"messages": [{"role": "user", "content": "Who founded the Lumen Orchard?"}], "stream": False, "mode": "both"}
    with httpx.Client(base_url=w["base"], timeout=TIMEOUT, headers=bearer(token)) as s:
        me = s.get("/api/v1/me").json()
        assert me["role"] == "share" and me["share_session_id"] == w["sid"] and me["share_bot_name"] == "orchard-a"
        answer = s.post(f"/api/v1/bots/{w['sid']}/chat", json=chat)
        assert answer.status_code == 200, answer.text
        assert answer.json()["content"] and answer.json()["citations"] == []  # the owner did not allow them
        # the quoted evidence still opens the reply, without [n] markers pointing at hidden citations
        quote = answer.json()["content"].split("\n\n")[0]
        assert quote.startswith('The document says: "') and "[1]" not in quote
        # every other route, with A's ids filled in, refuses the share token
        ids = {"session_id": w["sid"], "doc_id": w["doc_id"], "pair_id": w["pair_id"], "adapter_id": w["adapter_id"],
               "bot_id": w["sid"], "key_id": w["a"].split("_")[1], "share_id": share_id, "name": "x"}
        tried = 0
        for path, methods in spec["paths"].items():
            for method in methods:
                url = path.format(**ids)
                if (method, path) in (("post", "/api/v1/bots/{bot_id}/chat"), ("get", "/api/v1/me"), ("get", "/healthz")):
                    continue
                resp = s.request(method.upper(), url, json={})
                tried += 1
                assert resp.status_code in (400, 401, 403, 404), (method, url, resp.status_code, resp.text)
        assert tried >= 30
        # chat with another bot (the base model) through the link: refused
        other = s.post("/api/v1/bots/base/chat", json=chat)
        assert other.status_code == 404
    with httpx.Client(base_url=w["base"], timeout=TIMEOUT, headers=bearer(with_cites)) as s:
        cited = s.post(f"/api/v1/bots/{w['sid']}/chat", json=chat).json()
        assert cited["citations"] and '" [1]' in cited["content"].split("\n\n")[0]
    with httpx.Client(base_url=w["base"], timeout=TIMEOUT) as c:
        page = c.get(f"/s/{token}")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        # B cannot revoke A's link; A can, and it is dead on the next call
        assert c.delete(f"/api/v1/shares/{share_id}", headers=bearer(w["b"])).status_code == 404
        assert c.delete(f"/api/v1/shares/{share_id}", headers=bearer(w["a"])).status_code == 200
        dead = c.post(f"/api/v1/bots/{w['sid']}/chat", json=chat, headers=bearer(token))
        assert dead.status_code == 401, dead.text
        assert c.get("/api/v1/me", headers=bearer(token)).status_code == 401


def test_per_key_limits_answer_429_with_retry_after(world):
    w = world
    tight = make_key(w["base"], "tenant-a", chat_per_minute=2, max_sessions_in_flight=1, max_steps=50)
    chat = {"messages": [{"role": "user", "content": "hi"}], "stream": False, "max_tokens": 2}
    with httpx.Client(base_url=w["base"], timeout=TIMEOUT, headers=bearer(tight)) as c:
        codes = [c.post(f"/api/v1/bots/{w['sid']}/chat", json=chat) for _ in range(3)]
        assert [r.status_code for r in codes[:2]] == [200, 200], codes[0].text
        assert codes[2].status_code == 429 and int(codes[2].headers["Retry-After"]) >= 1
        assert codes[2].json()["error"]["code"] == "RESOURCE_EXHAUSTED"
        oai = c.post("/v1/chat/completions", json={"model": w["sid"], "messages": chat["messages"]})
        assert oai.status_code == 429 and oai.headers["Retry-After"]
        assert oai.json()["error"]["type"] == "rate_limit_error"
        # training steps over the key's limit
        over = c.post("/api/v1/sessions", json={"text": SHORT, "max_steps": 51})
        assert over.status_code == 429 and over.headers["Retry-After"], over.text
        # one session in flight at a time
        first = c.post("/api/v1/sessions", json={"text": SHORT, "max_steps": 50})
        assert first.status_code == 201, first.text
        second = c.post("/api/v1/sessions", json={"text": SHORT + " More.", "max_steps": 50})
        assert second.status_code == 429 and second.headers["Retry-After"], second.text
        # members may not jump the training queue
        assert c.post(f"/api/v1/sessions/{first.json()['session_id']}/cancel").status_code == 200
        assert c.post("/api/v1/sessions", json={"text": SHORT, "priority": 5}).status_code == 403


def test_deleting_a_bot_leaves_nothing_of_it_in_the_store(world):
    """A second bot of tenant A is deleted: record, documents, pairs, adapters are gone from the
    store, chat and reads answer 404, and A's first bot is untouched."""
    w = world
    env = w["env"]
    with httpx.Client(base_url=w["base"], timeout=TIMEOUT, headers=bearer(w["a"])) as c:
        sid = c.post("/api/v1/sessions", json={"text": SHORT, "name": "doomed", "max_steps": 2}).json()["session_id"]
    final = events_until_final(w["base"], sid, headers=bearer(w["a"]))[-1][1]["session"]
    assert final["state"] == "SESSION_STATE_READY"
    store = ArtifactStore(
        endpoint=env["DOCLORA_S3_ENDPOINT"], access_key="doclora", secret_key="doclora-secret",
        secure=False, region="us-east-1", bucket="doclora",
    )

    def objects_of(session_id: str) -> list[str]:
        return [k for k in store.list("tenant-a/") if session_id in k]

    assert objects_of(sid) and objects_of(w["sid"])
    before_first = sorted(objects_of(w["sid"]))
    with httpx.Client(base_url=w["base"], timeout=TIMEOUT, headers=bearer(w["a"])) as c:
        chat = {"messages": [{"role": "user", "content": "hi"}], "stream": False, "max_tokens": 2}
        assert c.post(f"/api/v1/bots/{sid}/chat", json=chat).status_code == 200  # the adapter is loaded
        gone = c.delete(f"/api/v1/sessions/{sid}")
        assert gone.status_code == 200 and gone.json()["objects_deleted"] > 0, gone.text
        assert objects_of(sid) == []
        assert sorted(objects_of(w["sid"])) == before_first
        assert c.get(f"/api/v1/sessions/{sid}").status_code == 404
        assert c.post(f"/api/v1/bots/{sid}/chat", json=chat).status_code == 404
        assert c.delete(f"/api/v1/sessions/{sid}").status_code == 404
        assert sid not in {m["id"] for m in c.get("/v1/models").json()["data"]}


def test_the_adapter_downloads_as_a_peft_zip_with_a_model_card(world, tmp_path):
    import io
    import zipfile

    w = world
    with httpx.Client(base_url=w["base"], timeout=TIMEOUT, headers=bearer(w["a"])) as c:
        resp = c.get(f"/api/v1/sessions/{w['sid']}/adapter.zip")
    assert resp.status_code == 200 and resp.headers["content-type"] == "application/zip"
    assert ".zip" in resp.headers["content-disposition"]
    names = zipfile.ZipFile(io.BytesIO(resp.content)).namelist()
    assert any(n.endswith("adapter_config.json") for n in names)
    assert any(n.endswith("adapter_model.safetensors") for n in names)
    card = next(n for n in names if n.endswith("README.md"))
    text = zipfile.ZipFile(io.BytesIO(resp.content)).read(card).decode()
    assert "SmolLM2" in text and "PeftModel.from_pretrained" in text
    config = json.loads(zipfile.ZipFile(io.BytesIO(resp.content)).read(next(n for n in names if n.endswith("adapter_config.json"))))
    assert config["r"] >= 1


def test_the_cli_makes_keys_shares_and_downloads_with_its_key(world, tmp_path):
    """`doclora keys create/list/revoke`, then as that key (DOCLORA_API_KEY): `sessions` shows only
    its tenant's, `share --citations` prints a link that chats, `download adapter/dataset` save
    files, `delete` of another tenant's bot is refused; a revoked key's CLI exits with the 401."""
    import zipfile

    w = world
    made = _cli(w["env"], "keys", "create", "--tenant", "tenant-a", "--name", "cli", "--json")
    assert made.returncode == 0, made.stderr
    token = json.loads(made.stdout)["token"]
    listed = _cli(w["env"], "keys", "list", "--tenant", "tenant-a")
    assert json.loads(made.stdout)["key"]["key_id"] in listed.stdout
    env = {**w["env"], "DOCLORA_API_KEY": token}
    mine = _cli(env, "sessions", "--json")
    sessions = json.loads(mine.stdout)["sessions"]
    assert w["sid"] in [s["session_id"] for s in sessions] and {s["tenant"] for s in sessions} == {"tenant-a"}
    shared = _cli(env, "share", w["sid"], "--citations", "--json")
    assert shared.returncode == 0, shared.stderr
    link = json.loads(shared.stdout)["url"]
    assert link.startswith(w["base"] + "/s/dls_")
    share_id = json.loads(shared.stdout)["share"]["share_id"]
    assert f"{share_id}  citations=yes" in _cli(env, "share", w["sid"], "--list").stdout
    out = tmp_path / "bot.zip"
    got = _cli(env, "download", w["sid"], "adapter", "-o", str(out))
    assert got.returncode == 0 and zipfile.ZipFile(out).namelist(), got.stderr
    data = tmp_path / "pairs.jsonl"
    assert _cli(env, "download", w["sid"], "dataset", "-o", str(data)).returncode == 0
    assert all("messages" in json.loads(line) for line in data.read_text().splitlines())
    other = _cli({**w["env"], "DOCLORA_API_KEY": w["b"]}, "delete", w["sid"])
    assert other.returncode != 0 and "404" in other.stderr
    revoked = _cli(w["env"], "keys", "revoke", token.split("_")[1])
    assert revoked.returncode == 0, revoked.stderr
    refused = _cli(env, "sessions")
    assert refused.returncode != 0 and "401" in refused.stderr
