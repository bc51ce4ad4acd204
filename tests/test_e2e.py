"""The whole local stack as real processes (nats-server, SeaweedFS, four services, the gateway),
started by `doclora up --detach`: pasted text -> READY -> a streamed chat answer from the adapter."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from services.common import keys
from services.common.store import ArtifactStore
from services.stack.ports import isolated_stack_env
from tests.fixtures.web import DocsServer

pytestmark = pytest.mark.e2e
# Requests that generate text wait on a 2-core CPU that may be training at the same time.
TIMEOUT = httpx.Timeout(30.0, read=300.0)

TEXT = """\
# The Lumen Orchard

The Lumen Orchard is a research garden on the island of Varrow that grows glowing pears.
It was founded in 1987 by the botanist Ilse Marrow.
The orchard covers 42 hectares and employs 17 gardeners.

## Harvest

The glowing pears are harvested every October by hand.
A glowing pear is a pear whose skin holds a harmless luminous fungus called brightmoss.
Each tree yields about 300 pears in a good year.
"""


def _env(state: Path) -> dict:
    return isolated_stack_env(
        state,
        DOCLORA_INFERENCE_MAX_NEW_TOKENS="24",
        DOCLORA_WORK_ACK_WAIT_S="30",
        DOCLORA_MAX_UPLOAD_BYTES=str(8 * 1024 * 1024),
        DOCLORA_FETCH_ALLOW="127.0.0.1",
    )


def _cli(env: dict, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "services.stack.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=Path(__file__).resolve().parents[1],
    )


def up_or_fail(env: dict, state: Path, timeout_s: int) -> None:
    """`doclora up --detach` with `env`; when it fails, the stack is stopped and the test fails with
    the tail of every part's log under `state`."""
    up = _cli(env, "up", "--detach", "--timeout", str(timeout_s))
    if up.returncode != 0:
        logs = "\n".join(
            f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted((state / "logs").glob("*.log"))
        )
        _cli(env, "down")
        pytest.fail(f"doclora up failed:\n{up.stdout}\n{up.stderr}\n{logs}")


@pytest.fixture(scope="module")
def docs_server():
    server = DocsServer()
    yield server
    server.httpd.shutdown()


@pytest.fixture(scope="module")
def stack(tmp_path_factory, docs_server):
    state = tmp_path_factory.mktemp("stack")
    env = _env(state)
    up_or_fail(env, state, 420)
    yield env, f"http://127.0.0.1:{env['DOCLORA_GATEWAY_PORT']}"
    down = _cli(env, "down")
    assert down.returncode == 0, down.stderr


def events_until_final(
    base: str, sid: str, timeout: float = 600, headers: dict | None = None
) -> list[tuple[str, dict]]:
    out = []
    with httpx.Client(base_url=base, timeout=httpx.Timeout(10, read=timeout), headers=headers) as c:
        with c.stream("GET", f"/api/v1/sessions/{sid}/events") as resp:
            assert resp.status_code == 200
            kind, data = None, None
            for line in resp.iter_lines():
                if line.startswith("event:"):
                    kind = line[6:].strip()
                elif line.startswith("data:"):
                    data = json.loads(line[5:])
                elif not line and data is not None:
                    out.append((kind, data))
                    state = data["session"]["state"]
                    if state in ("SESSION_STATE_READY", "SESSION_STATE_FAILED", "SESSION_STATE_CANCELLED"):
                        return out
                    kind, data = None, None
    return out


def test_status_reports_every_part_up(stack):
    """`doclora status` sees nats, s3, the four services and the gateway healthy."""
    env, _ = stack
    res = _cli(env, "status")
    assert res.returncode == 0, res.stdout
    for part in ("nats", "s3", "ingest", "qagen", "trainer", "inference", "gateway"):
        assert f"{part:<10} up" in res.stdout


def test_pasted_text_becomes_a_bot_that_streams_answers(stack):
    """A session made from a paragraph goes QUEUED -> INGESTING -> GENERATING -> TRAINING -> READY,
    leaves every artifact in the store, and its bot streams a chat answer."""
    env, base = stack
    with httpx.Client(base_url=base, timeout=TIMEOUT) as c:
        resp = c.post("/api/v1/sessions", json={"text": TEXT, "name": "orchard", "max_steps": 12})
        assert resp.status_code == 201, resp.text
        sess = resp.json()
        sid = sess["session_id"]
        assert sess["state"] == "SESSION_STATE_QUEUED"

    evs = events_until_final(base, sid)
    final = evs[-1][1]["session"]
    assert final["state"] == "SESSION_STATE_READY", final.get("error")
    # the states the session went through, from every event's snapshot: the stream may end on the
    # `finished` event before the READY `state` event is read (seen on a loaded machine)
    seen = [d["session"]["state"] for _, d in evs]
    states = [s for i, s in enumerate(seen) if i == 0 or s != seen[i - 1]]
    order = [
        "SESSION_STATE_INGESTING",
        "SESSION_STATE_GENERATING",
        "SESSION_STATE_TRAINING",
        "SESSION_STATE_READY",
    ]
    assert [s for s in states if s in order] == order
    train_progress = [
        d["event"]["progress"]
        for k, d in evs
        if k == "progress" and d["event"]["progress"].get("stage") == "STAGE_TRAIN"
    ]
    assert train_progress and int(train_progress[-1]["done"]) == 12
    assert final["train"]["steps"] == 12
    assert final["qa"]["pairs"] >= 3
    # the bot's exam: the rewordings qagen kept out of training, asked after READY (pending at
    # READY), on the session when it ends; `doclora exam` waits for it
    at_ready = final["train"]["exam"]
    assert at_ready["pending"] is True and at_ready["reworded"] == final["qa"]["exam_pairs"]
    assert "adapter_f1" not in at_ready
    shown = _cli(env, "exam", sid, timeout=600)
    with httpx.Client(base_url=base, timeout=TIMEOUT) as c:
        exam = c.get(f"/api/v1/sessions/{sid}").json()["train"]["exam"]
    assert not exam.get("pending") and exam["seconds"] > 0
    assert exam["reworded"] == final["qa"]["exam_pairs"] > 0
    assert exam["mode"] == "retrieval" and exam["absent"] > 0
    assert {"base_f1", "adapter_f1", "retrieval_f1", "both_f1"} <= exam.keys()
    assert exam.get("missed", 0) >= len(exam.get("misses", []))
    assert shown.returncode == 0, shown.stderr
    assert f"exam: {exam['reworded']} reworded questions" in shown.stdout
    assert f"missed in retrieval mode: {exam.get('missed', 0)} of {exam['reworded']}" in shown.stdout

    with httpx.Client(base_url=base, timeout=TIMEOUT) as c:
        qa = c.get(f"/api/v1/sessions/{sid}/qa").json()
        assert qa["total"] == final["qa"]["pairs"]
        # grounded: every sentence of every answer is quoted from the text (summaries join several)
        flat = " ".join(TEXT.split())
        for p in qa["pairs"]:
            for sentence in re.split(r"(?<=[.!?])\s+", p["answer"]):
                assert " ".join(sentence.split()) in flat, (p["strategy"], sentence)

        store = ArtifactStore(
            endpoint=env["DOCLORA_S3_ENDPOINT"],
            access_key="doclora",
            secret_key="doclora-secret",
            secure=False,
            region="us-east-1",
            bucket="doclora",
        )
        doc_id = final["documents"][0]["doc_id"]
        t = final["tenant"]
        assert store.get_bytes(keys.doc_original(t, sid, doc_id)) == TEXT.encode()
        assert "glowing pears" in store.get_bytes(keys.doc_text(t, sid, doc_id)).decode()
        assert store.get_json(keys.doc_pages(t, sid, doc_id))[0]["start"] == 0
        assert store.exists(keys.chunks(t, sid)) and store.exists(keys.qa_pairs(t, sid))
        adapter = keys.adapter_prefix(t, final["adapter_id"])
        for name in ("adapter_config.json", "adapter_model.safetensors", "metrics.json"):
            assert store.exists(adapter + name), name

        question = "When was the Lumen Orchard founded?"
        deltas, done, cites = [], None, []
        with c.stream(
            "POST", f"/api/v1/bots/{sid}/chat", json={"messages": [{"role": "user", "content": question}]}
        ) as resp:
            assert resp.status_code == 200
            kind = None
            for line in resp.iter_lines():
                if line.startswith("event:"):
                    kind = line[6:].strip()
                elif line.startswith("data:"):
                    payload = json.loads(line[5:])
                    if kind == "citations":
                        cites += payload["citations"]
                    if kind == "delta":
                        deltas.append(payload["delta"])
                    elif kind == "done":
                        done = payload
        assert len(deltas) >= 2 and "".join(deltas).strip()
        assert done and done["finish_reason"] in ("stop", "length")

        # The adapter changes what the model says: greedy answers of bot and base differ.
        body = {"messages": [{"role": "user", "content": question}], "stream": False}
        bot = c.post(f"/api/v1/bots/{sid}/chat", json=body).json()
        base_answer = c.post("/api/v1/bots/base/chat", json=body).json()
        assert bot["content"] == "".join(deltas)
        assert bot["content"] != base_answer["content"]

        # Grounded by default: the answer cites the passage it read, with its document and page.
        assert cites and cites == bot["citations"]
        assert cites[0]["doc_id"] == doc_id and cites[0]["page"] == 1
        assert "founded in 1987" in " ".join(c["text"] for c in cites)
        assert base_answer["citations"] == []
        alone = c.post(f"/api/v1/bots/{sid}/chat", json={**body, "mode": "adapter"}).json()
        assert alone["citations"] == []
        bad_mode = c.post(f"/api/v1/bots/{sid}/chat", json={**body, "mode": "psychic"})
        assert bad_mode.status_code == 400


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"text": ""}, 400, "INVALID_ARGUMENT"),
        ({"text": "   \n\t  "}, 400, "INVALID_ARGUMENT"),
        ({"text": "x" * (2 * 1024 * 1024 + 1)}, 413, "RESOURCE_EXHAUSTED"),
        ({"name": "no text"}, 400, "INVALID_ARGUMENT"),
    ],
    ids=["empty-text", "blank-text", "text-over-size-limit", "missing-text"],
)
def test_bad_session_input_is_refused_with_a_clear_error(stack, body, status, code):
    """Empty, blank, oversized and missing text each get their status and a JSON error body."""
    _, base = stack
    resp = httpx.post(f"{base}/api/v1/sessions", json=body, timeout=TIMEOUT)
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert err["code"] == code and err["message"]


def test_malformed_json_is_a_400(stack):
    """A body that is not JSON is INVALID_ARGUMENT, not a server error."""
    _, base = stack
    resp = httpx.post(
        f"{base}/api/v1/sessions",
        content=b"{not json",
        timeout=TIMEOUT,
        headers={"Content-Type": "application/json"},
    )
    assert resp.status_code == 400
    assert resp.json()["error"]["code"] == "INVALID_ARGUMENT"


def test_unknown_session_is_a_404(stack):
    """Reading, watching, listing pairs of, or chatting with an unknown session is NOT_FOUND."""
    _, base = stack
    with httpx.Client(base_url=base, timeout=TIMEOUT) as c:
        for resp in (
            c.get("/api/v1/sessions/0123456789abcdef"),
            c.get("/api/v1/sessions/0123456789abcdef/events"),
            c.get("/api/v1/sessions/0123456789abcdef/qa"),
            c.get("/api/v1/sessions/..%2F..%2Fetc"),
            c.post("/api/v1/bots/0123456789abcdef/chat", json={"messages": [{"content": "hi"}]}),
        ):
            assert resp.status_code == 404, resp.text
            assert resp.json()["error"]["code"] == "NOT_FOUND"


def test_chat_before_ready_is_refused_and_cancel_stops_the_session(stack):
    """Chatting with a bot that is still learning is FAILED_PRECONDITION (409); cancelling ends it."""
    _, base = stack
    with httpx.Client(base_url=base, timeout=TIMEOUT) as c:
        sid = c.post("/api/v1/sessions", json={"text": TEXT, "max_steps": 500}).json()["session_id"]
        resp = c.post(f"/api/v1/bots/{sid}/chat", json={"messages": [{"content": "hi"}], "stream": False})
        assert resp.status_code == 409, resp.text
        assert resp.json()["error"]["code"] == "FAILED_PRECONDITION"
        assert "not ready" in resp.json()["error"]["message"]
        cancelled = c.post(f"/api/v1/sessions/{sid}/cancel")
        assert cancelled.status_code == 200
        assert cancelled.json()["state"] == "SESSION_STATE_CANCELLED"
        again = c.post(f"/api/v1/sessions/{sid}/cancel")
        assert again.status_code == 409
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if c.get(f"/api/v1/sessions/{sid}").json()["state"] == "SESSION_STATE_CANCELLED":
                break
            time.sleep(0.5)
        assert c.get(f"/api/v1/sessions/{sid}").json()["state"] == "SESSION_STATE_CANCELLED"


def test_the_official_openai_client_lists_bots_and_chats(stack):
    """The `openai` SDK sees the base model and READY bots at /v1/models and gets answers, streamed
    and not, from /v1/chat/completions; an unknown bot is its NotFoundError."""
    import openai

    _, base = stack
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=300)
    ids = [m.id for m in client.models.list().data]
    assert "base" in ids
    ask = [{"role": "user", "content": "Name one fruit."}]
    done = client.chat.completions.create(model="base", messages=ask, max_tokens=8)
    assert done.choices[0].message.content.strip()
    assert done.usage.prompt_tokens > 0 and 0 < done.usage.completion_tokens <= 8
    assert done.choices[0].finish_reason in ("stop", "length")
    stream = client.chat.completions.create(model="base", messages=ask, max_tokens=8, stream=True)
    streamed = "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)
    assert streamed == done.choices[0].message.content
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="0123456789abcdef", messages=ask)


def wait_state(c: httpx.Client, sid: str, states: set[str], timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        sess = c.get(f"/api/v1/sessions/{sid}").json()
        if sess["state"].removeprefix("SESSION_STATE_") in states or time.monotonic() > deadline:
            return sess
        time.sleep(0.3)


def test_uploads_links_and_text_are_ingested_together_and_a_bad_link_fails_alone(stack, docs_server):
    """A session from an uploaded Markdown file, pasted text, a link to an HTML page on a web server
    and a link to a private address: the first three become documents, the private link fails with
    its reason, and the session goes on to generation."""
    _, base = stack
    docs_server.pages["/guide.html"] = (
        "text/html; charset=utf-8",
        b"<html><head><title>Brightmoss guide</title><script>var x = 'tracking';</script></head>"
        b"<body><nav>Home | About</nav><main><h1>Brightmoss</h1><p>Brightmoss is a luminous fungus "
        b"that grows on the skin of glowing pears in the Lumen Orchard.</p></main></body></html>",
    )
    md = TEXT.replace("Lumen Orchard", "Umbra Grove").encode()
    with httpx.Client(base_url=base, timeout=TIMEOUT) as c:
        up = c.post("/api/v1/uploads", files={"file": ("grove.md", md, "text/markdown")})
        assert up.status_code == 201, up.text
        upload = up.json()
        assert int(upload["size_bytes"]) == len(md)
        body = {
            "text": TEXT,
            "upload_ids": [upload["upload_id"]],
            "urls": [docs_server.url("/guide.html"), "http://10.255.255.1/secret.pdf"],
            "max_steps": 500,
        }
        resp = c.post("/api/v1/sessions", json=body)
        assert resp.status_code == 201, resp.text
        sid = resp.json()["session_id"]
        sess = wait_state(c, sid, {"GENERATING", "TRAINING", "READY", "FAILED"})
        c.post(f"/api/v1/sessions/{sid}/cancel")
    assert sess["state"] != "SESSION_STATE_FAILED", sess.get("error")
    docs = {d["kind"] + ":" + d["name"]: d for d in sess["documents"]}
    by_kind = {}
    for d in sess["documents"]:
        by_kind.setdefault(d["kind"], []).append(d)
    assert by_kind["upload"][0]["status"] == "DOCUMENT_STATUS_READY"
    assert by_kind["upload"][0]["format"] == "markdown"
    assert by_kind["text"][0]["status"] == "DOCUMENT_STATUS_READY"
    urls = {d["final_url"]: d for d in by_kind["url"]}
    good = urls[docs_server.url("/guide.html")]
    assert good["status"] == "DOCUMENT_STATUS_READY" and good["format"] == "html", docs
    bad = urls["http://10.255.255.1/secret.pdf"]
    assert bad["status"] == "DOCUMENT_STATUS_FAILED"
    assert "private" in bad["error"].lower() or "not allowed" in bad["error"].lower()
    with httpx.Client(base_url=base, timeout=TIMEOUT) as c:
        text = c.get(f"/api/v1/sessions/{sid}/documents").json()
        assert len(text["documents"]) == 4


def test_a_qa_file_skips_generation_and_its_pairs_are_the_training_set(stack):
    """Uploaded question-answer pairs (JSONL) go to training as they are."""
    _, base = stack
    rows = [
        {"question": f"What is code {i}?", "answer": f"Code {i} opens the east gate of the orchard."}
        for i in range(5)
    ]
    data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    with httpx.Client(base_url=base, timeout=TIMEOUT) as c:
        resp = c.post(
            "/api/v1/sessions/upload",
            files=[("files", ("codes.jsonl", data, "application/jsonl"))],
            data={"name": "codes"},
        )
        assert resp.status_code == 201, resp.text
        sid = resp.json()["session_id"]
        sess = wait_state(c, sid, {"TRAINING", "READY", "FAILED"})
        assert sess["state"] in ("SESSION_STATE_TRAINING", "SESSION_STATE_READY"), sess.get("error")
        pairs = c.get(f"/api/v1/sessions/{sid}/qa").json()["pairs"]
        c.post(f"/api/v1/sessions/{sid}/cancel")
    assert sorted((p["question"], p["answer"]) for p in pairs) == sorted(
        (r["question"], r["answer"]) for r in rows
    )
    assert {p["strategy"] for p in pairs} == {"provided"}


@pytest.mark.parametrize(
    ("content", "status", "code"),
    [(b"", 400, "INVALID_ARGUMENT"), (b"x" * (8 * 1024 * 1024 + 1), 413, "RESOURCE_EXHAUSTED")],
    ids=["empty-upload", "upload-over-size-limit"],
)
def test_bad_uploads_are_refused(stack, content, status, code):
    """An empty file and one over the upload limit are refused with their status codes."""
    _, base = stack
    resp = httpx.post(
        f"{base}/api/v1/uploads", files={"file": ("a.txt", content, "text/plain")}, timeout=TIMEOUT
    )
    assert resp.status_code == status, resp.text
    assert resp.json()["error"]["code"] == code


def test_an_unknown_upload_id_is_not_found(stack):
    """Naming an upload that does not exist is NOT_FOUND and makes no session."""
    _, base = stack
    resp = httpx.post(f"{base}/api/v1/sessions", json={"upload_ids": ["u0123456789abcdef"]}, timeout=TIMEOUT)
    assert resp.status_code == 404, resp.text


def test_a_document_with_almost_no_text_fails_with_not_enough_text(stack):
    """One short line is accepted as input but the session ends FAILED at generation with
    'not enough text to learn from' — no pairs are invented from nothing."""
    _, base = stack
    with httpx.Client(base_url=base, timeout=TIMEOUT) as c:
        sid = c.post(
            "/api/v1/sessions", json={"text": "Welcome to our website, please enable JavaScript."}
        ).json()["session_id"]
        sess = wait_state(c, sid, {"FAILED", "TRAINING", "READY"})
        assert sess["state"] == "SESSION_STATE_FAILED", sess
        assert sess["error"]["stage"] == "STAGE_QAGEN"
        assert "not enough text to learn from" in sess["error"]["message"]
        pairs = c.get(f"/api/v1/sessions/{sid}/qa")
        assert pairs.status_code == 200 and pairs.json()["total"] == 0


MORE_TEXT = """\
# The Varrow Ferry

The Varrow ferry crosses from the harbour of Lisk to the island of Varrow twice a day.
It was built in 1962 at the Tallin yard and carries 120 passengers and 14 cars.
The crossing takes 55 minutes in calm weather.
"""


def test_a_person_reviews_edits_exports_and_imports_pairs_then_approves(stack):
    """review=true: the session waits in AWAITING_REVIEW; pairs are edited, added, deleted, exported
    and imported through the gateway; a source added in review is generated without losing the
    edits; approving starts training, after which pairs and sources are locked."""
    _, base = stack
    with httpx.Client(base_url=base, timeout=TIMEOUT) as c:
        resp = c.post(
            "/api/v1/sessions", json={"text": TEXT, "name": "reviewed", "review": True, "max_steps": 500}
        )
        assert resp.status_code == 201, resp.text
        sid = resp.json()["session_id"]
        sess = wait_state(c, sid, {"AWAITING_REVIEW", "FAILED"})
        assert sess["state"] == "SESSION_STATE_AWAITING_REVIEW", sess.get("error")
        pairs = c.get(f"/api/v1/sessions/{sid}/qa", params={"page_size": 1000}).json()["pairs"]
        assert pairs and all(p["split"] in ("train", "eval", "exam") for p in pairs)

        edited = c.patch(
            f"/api/v1/sessions/{sid}/qa/{pairs[0]['pair_id']}", json={"answer": "In 1987, by Ilse Marrow."}
        )
        assert edited.status_code == 200 and edited.json()["edited"] is True
        added = c.post(
            f"/api/v1/sessions/{sid}/qa", json={"question": "Who picks the pears?", "answer": "Gardeners."}
        )
        assert added.status_code == 201, added.text
        bad = c.post(f"/api/v1/sessions/{sid}/qa", json={"question": "", "answer": "x"})
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "INVALID_ARGUMENT"
        assert c.delete(f"/api/v1/sessions/{sid}/qa/{pairs[1]['pair_id']}").status_code == 200
        assert c.delete(f"/api/v1/sessions/{sid}/qa/{pairs[1]['pair_id']}").status_code == 404

        export = c.get(f"/api/v1/sessions/{sid}/qa/export", params={"format": "sharegpt"})
        assert export.status_code == 200 and "attachment" in export.headers["content-disposition"]
        lines = [json.loads(x) for x in export.text.splitlines()]
        assert len(lines) == len(pairs) and all("conversations" in x for x in lines)
        alpaca = (
            json.dumps({"instruction": "How many gardeners work there?", "input": "", "output": "17."}) + "\n"
        )
        imported = c.post(
            f"/api/v1/sessions/{sid}/qa/import", files={"file": ("more.jsonl", alpaca.encode())}
        )
        assert imported.status_code == 200 and imported.json()["imported"] == 1, imported.text
        broken = c.post(f"/api/v1/sessions/{sid}/qa/import", files={"file": ("bad.jsonl", b"{nope\n")})
        assert broken.status_code == 400 and "line 1" in broken.json()["error"]["message"]

        more = c.post(f"/api/v1/sessions/{sid}/sources", json={"text": MORE_TEXT, "name": "ferry.md"})
        assert more.status_code == 201, more.text
        sess = wait_state(c, sid, {"AWAITING_REVIEW", "FAILED"})
        assert sess["state"] == "SESSION_STATE_AWAITING_REVIEW" and sess["round"] == 1, sess.get("error")
        after = c.get(f"/api/v1/sessions/{sid}/qa", params={"page_size": 1000}).json()["pairs"]
        by_id = {p["pair_id"]: p for p in after}
        assert by_id[pairs[0]["pair_id"]]["answer"] == "In 1987, by Ilse Marrow."
        assert added.json()["pair_id"] in by_id and pairs[1]["pair_id"] not in by_id
        assert {p["doc_id"] for p in after if p["strategy"] not in ("person", "imported")} == {
            d["doc_id"] for d in sess["documents"]
        }

        approved = c.post(f"/api/v1/sessions/{sid}/approve")
        assert approved.status_code == 200 and approved.json()["state"] == "SESSION_STATE_TRAINING"
        assert c.post(f"/api/v1/sessions/{sid}/approve").status_code == 409
        locked = c.post(
            f"/api/v1/sessions/{sid}/qa", json={"question": "Who built it?", "answer": "Tallin yard."}
        )
        assert locked.status_code == 409
        assert (
            c.post(f"/api/v1/sessions/{sid}/sources", json={"text": MORE_TEXT + "More."}).status_code == 409
        )
        c.post(f"/api/v1/sessions/{sid}/cancel")


def test_every_source_type_is_ingested_through_the_gateway_and_bad_files_fail_alone(stack, docs_server):
    """Uploads of PDF (one encrypted, opened with its password), DOCX, HTML, a Latin-1 text file;
    links to a PDF, a DOCX and a Markdown page; and a corrupt and a scanned PDF, which fail alone
    with their reasons while the session goes on."""
    from tests.test_extract import encrypt_pdf, make_docx, make_pdf

    _, base = stack
    # each document needs 30 words of prose before pairs are made from it
    more = "The orchard is open to visitors from April to October, and guided walks start at the old gate."
    pdf = make_pdf(
        [
            ["The Lumen Orchard was founded in 1987 by Ilse Marrow.", "It grows glowing pears."],
            ["The orchard covers 42 hectares and employs 17 gardeners.", more],
        ],
        title="Orchard report",
    )
    locked = encrypt_pdf(
        make_pdf([["The night ferry leaves Lisk at nine in the evening every day.", more, more]]), "s3cret"
    )
    html = (
        b"<html><head><title>Bees</title><script>var x=1;</script></head><body><nav>Home | About</nav>"
        b"<main><h1>Bees</h1><p>The orchard keeps forty hives of black bees near the river.</p><p>%s</p></main></body></html>"
        % more.encode()
    )
    latin1 = f"Café Marrow serves crème brûlée made from the orchard's pears every Sunday. {more}".encode(
        "latin-1"
    )
    docs_server.pages["/linked.pdf"] = (
        "application/pdf",
        make_pdf([["The pear press was built in 1990 by Ola Brand.", more, more]]),
    )
    docs_server.pages["/guide.docx"] = (
        "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
        make_docx(),
    )
    docs_server.pages["/notes.md"] = (
        "text/markdown",
        f"# Notes\n\nThe orchard gate opens at seven in the morning. {more} {more}\n".encode(),
    )
    files = [
        ("files", ("report.pdf", pdf, "application/pdf")),
        ("files", ("locked.pdf", locked, "application/pdf")),
        ("files", ("birds.docx", make_docx(), "application/octet-stream")),
        ("files", ("bees.html", html, "text/html")),
        ("files", ("cafe.txt", latin1, "text/plain")),
        ("files", ("broken.pdf", pdf[: len(pdf) // 3], "application/pdf")),
        ("files", ("scan.pdf", make_pdf([[], []]), "application/pdf")),
    ]
    urls = [docs_server.url(p) for p in ("/linked.pdf", "/guide.docx", "/notes.md")]
    with httpx.Client(base_url=base, timeout=TIMEOUT) as c:
        resp = c.post(
            "/api/v1/sessions/upload",
            files=files,
            data={"urls": urls, "password": "s3cret", "review": "true", "name": "all sources"},
        )
        assert resp.status_code == 201, resp.text
        sid = resp.json()["session_id"]
        sess = wait_state(c, sid, {"AWAITING_REVIEW", "FAILED"})
        assert sess["state"] == "SESSION_STATE_AWAITING_REVIEW", sess.get("error")
        docs = {d["name"]: d for d in sess["documents"]}

        def text(name: str) -> str:
            got = c.get(f"/api/v1/sessions/{sid}/documents/{docs[name]['doc_id']}/text")
            assert got.status_code == 200, got.text
            return got.json()["text"]

        ready = {n for n, d in docs.items() if d["status"] == "DOCUMENT_STATUS_READY"}
        assert ready == {
            "report.pdf",
            "locked.pdf",
            "birds.docx",
            "bees.html",
            "cafe.txt",
            "linked.pdf",
            "guide.docx",
            "notes.md",
        }, {n: d["error"] for n, d in docs.items()}
        assert docs["report.pdf"]["format"] == "pdf" and docs["report.pdf"]["pages"] == 2
        assert "founded in 1987" in text("report.pdf") and "night ferry" in text("locked.pdf")
        assert "| Grey heron | 95 |" in text("birds.docx") and "# Herons\n" in text("guide.docx")
        assert "forty hives" in text("bees.html") and "var x" not in text("bees.html")
        assert "crème brûlée" in text("cafe.txt") and "Ola Brand" in text("linked.pdf")
        assert "gate opens at seven" in text("notes.md")
        assert "truncated" in docs["broken.pdf"]["error"] or "damaged" in docs["broken.pdf"]["error"]
        assert "OCR is not supported" in docs["scan.pdf"]["error"]
        failed_text = c.get(f"/api/v1/sessions/{sid}/documents/{docs['scan.pdf']['doc_id']}/text")
        assert failed_text.status_code == 409
        qa = c.get(f"/api/v1/sessions/{sid}/qa", params={"page_size": 1000}).json()["pairs"]
        assert {p["doc_id"] for p in qa} >= {
            docs[n]["doc_id"] for n in ("report.pdf", "cafe.txt", "notes.md", "linked.pdf")
        }
        c.post(f"/api/v1/sessions/{sid}/cancel")


def test_a_csv_of_question_answer_pairs_goes_straight_to_training(stack):
    _, base = stack
    csv_data = (
        'question,answer\n"What opens the gate?","The blue key opens the gate."\n'
        '"Who keeps the bees?","Ada keeps the bees, near the river."\n'
        '"When is the harvest?","The harvest is in October."\n'
    )
    with httpx.Client(base_url=base, timeout=TIMEOUT) as c:
        resp = c.post(
            "/api/v1/sessions/upload",
            files=[("files", ("pairs.csv", csv_data.encode(), "text/csv"))],
            data={"review": "true"},
        )
        assert resp.status_code == 201, resp.text
        sid = resp.json()["session_id"]
        sess = wait_state(c, sid, {"AWAITING_REVIEW", "FAILED"})
        assert sess["state"] == "SESSION_STATE_AWAITING_REVIEW", sess.get("error")
        assert sess["documents"][0]["format"] == "qa_csv"
        pairs = c.get(f"/api/v1/sessions/{sid}/qa").json()["pairs"]
        assert sorted(p["answer"] for p in pairs) == [
            "Ada keeps the bees, near the river.",
            "The blue key opens the gate.",
            "The harvest is in October.",
        ]
        c.post(f"/api/v1/sessions/{sid}/cancel")


def test_the_cli_stops_for_review_and_exports_the_pairs(stack, tmp_path):
    """`doclora learn --review FILE` follows the session to AWAITING_REVIEW and says what to do next;
    `doclora qa SID --export alpaca` writes every pair as Alpaca JSON lines."""
    env, base = stack
    doc = tmp_path / "orchard.md"
    doc.write_text(TEXT)
    learn = _cli(env, "learn", "--review", str(doc), timeout=300)
    assert learn.returncode == 0, learn.stderr
    sid = re.search(r"session ([0-9a-f]+)", learn.stdout).group(1)
    assert f"doclora approve {sid}" in learn.stdout
    export = _cli(env, "qa", sid, "--export", "alpaca", timeout=60)
    assert export.returncode == 0, export.stderr
    rows = [json.loads(line) for line in export.stdout.splitlines()]
    with httpx.Client(base_url=base, timeout=TIMEOUT) as c:
        total = c.get(f"/api/v1/sessions/{sid}/qa").json()["total"]
        c.post(f"/api/v1/sessions/{sid}/cancel")
    assert len(rows) == total > 0 and all({"instruction", "output"} <= set(r) for r in rows)
