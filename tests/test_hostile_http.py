"""Hostile input over real HTTP: the probes of issue 15 against the gateway under uvicorn over real
SessionService and AccessService (the session's nats-server and SeaweedFS, no workers). Numbers a
gRPC field cannot carry and text that is not UTF-8 (a lone surrogate, which JSON can spell as
`"\\ud800"`) are refused with 400 INVALID_ARGUMENT naming the field, never a 500, and a negative
limit is refused instead of silently dropping a session from the list."""

from __future__ import annotations

import httpx
import pytest

from tests.test_openai_clients import running_gateway

TEXT = "The Lumen Orchard was founded in 1987 by the botanist Ilse Marrow on the river bank."
# JSON bodies spelled by hand: a lone surrogate is valid JSON text (`\ud800`) but not UTF-8
SURROGATE = "\\ud800"


@pytest.fixture(scope="module")
def gateway(nats_server, seaweedfs):
    with running_gateway(nats_server, seaweedfs, ("sessions",)) as (url, _, _):
        with httpx.Client(base_url=url, timeout=30) as client:
            yield client


def refused(resp: httpx.Response, field: str) -> None:
    """A 400 in doclora's envelope (OpenAI's under /v1) whose message names `field`."""
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    assert err["code"] in ("INVALID_ARGUMENT", "invalid_argument"), err
    assert field in err["message"], err


@pytest.mark.parametrize("value", ["1099511627776", "2147483648", "-1", "0"])
def test_a_session_list_limit_out_of_range_is_refused_naming_limit(gateway, value):
    refused(gateway.get("/api/v1/sessions", params={"limit": value}), "limit")


def test_a_negative_limit_does_not_silently_drop_a_session(gateway):
    """`limit=-1` once listed every session but the last; now it is refused, and a limit in range
    lists them all."""
    made = [gateway.post("/api/v1/sessions", json={"text": TEXT}) for _ in range(2)]
    assert [r.status_code for r in made] == [201, 201], [r.text for r in made]
    refused(gateway.get("/api/v1/sessions", params={"limit": -1}), "limit")
    listed = {
        s["session_id"] for s in gateway.get("/api/v1/sessions", params={"limit": 1000}).json()["sessions"]
    }
    assert {r.json()["session_id"] for r in made} <= listed


@pytest.mark.parametrize("value", ["1099511627776", "1001", "-5", "0"])
def test_a_pair_page_size_out_of_range_is_refused_naming_page_size(gateway, value):
    refused(gateway.get("/api/v1/sessions/s1/qa", params={"page_size": value}), "page_size")


@pytest.mark.parametrize("path", ["/api/v1/bots/base/chat", "/v1/chat/completions"])
@pytest.mark.parametrize("seed", ["1180591620717411303424", "9223372036854775808", "-1"])
def test_a_chat_seed_an_int64_cannot_carry_is_refused_naming_seed(gateway, path, seed):
    body = f'{{"model": "base", "stream": false, "seed": {seed}, "messages": [{{"content": "hi"}}]}}'
    refused(gateway.post(path, content=body, headers={"Content-Type": "application/json"}), "seed")


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/api/v1/sessions", f'{{"text": "a{SURROGATE}b"}}', "text"),
        ("/api/v1/sessions", f'{{"text": "{TEXT}", "name": "{SURROGATE}"}}', "name"),
        ("/api/v1/sessions", f'{{"text": "{TEXT}", "system_prompt": "x{SURROGATE}"}}', "system_prompt"),
        (
            "/api/v1/bots/base/chat",
            f'{{"stream": false, "messages": [{{"content": "{SURROGATE}"}}]}}',
            "content",
        ),
        (
            "/v1/chat/completions",
            f'{{"model": "base", "messages": [{{"role": "user", "content": "hi {SURROGATE}"}}]}}',
            "content",
        ),
        ("/api/v1/sessions/s1/qa", f'{{"question": "{SURROGATE}?", "answer": "a"}}', "question"),
        ("/api/v1/sessions/s1/sources", f'{{"text": "{SURROGATE}"}}', "text"),
        ("/api/v1/keys", f'{{"name": "{SURROGATE}"}}', "name"),
    ],
)
def test_text_with_a_lone_surrogate_is_refused_naming_the_field(gateway, path, body, field):
    resp = gateway.post(path, content=body, headers={"Content-Type": "application/json"})
    refused(resp, field)
    assert "UTF-8" in resp.json()["error"]["message"]


def test_a_session_created_with_a_surrogate_leaves_nothing_behind(gateway):
    """The refused session is not in the list: bad text loses nothing and stores nothing."""
    before = gateway.get("/api/v1/sessions", params={"limit": 1000}).json()["sessions"]
    body = f'{{"text": "{SURROGATE}", "name": "surrogate-probe"}}'
    refused(
        gateway.post("/api/v1/sessions", content=body, headers={"Content-Type": "application/json"}), "text"
    )
    after = gateway.get("/api/v1/sessions", params={"limit": 1000}).json()["sessions"]
    assert len(after) == len(before) and "surrogate-probe" not in {s["name"] for s in after}
