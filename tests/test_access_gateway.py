"""API keys and tenants through the gateway over real SessionService and AccessService (on the
session's nats-server and SeaweedFS, no workers): the loopback caller without credentials is the
default tenant's admin and makes keys; each tenant sees and watches only its own sessions."""

from __future__ import annotations

import httpx
import pytest

from tests.test_e2e import events_until_final  # noqa: F401
from tests.test_openai_clients import running_gateway

TEXT = "The Lumen Orchard was founded in 1987 by the botanist Ilse Marrow on the river bank."


@pytest.fixture(scope="module")
def gateway(nats_server, seaweedfs):
    with running_gateway(nats_server, seaweedfs, ("sessions",)) as (url, _, _):
        yield url


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def key(base: str, tenant: str) -> str:
    resp = httpx.post(f"{base}/api/v1/keys", json={"tenant": tenant})
    assert resp.status_code == 201, resp.text
    return resp.json()["token"]


def test_each_tenant_sees_and_watches_only_its_own_sessions(gateway):
    a, b = key(gateway, "ta"), key(gateway, "tb")
    with httpx.Client(base_url=gateway, headers=bearer(a), timeout=30) as c:
        made = c.post("/api/v1/sessions", json={"text": TEXT})
        assert made.status_code == 201, made.text
        sid = made.json()["session_id"]
        assert made.json()["tenant"] == "ta"
        with c.stream("GET", f"/api/v1/sessions/{sid}/events") as resp:
            assert resp.status_code == 200, resp.read()
    with httpx.Client(base_url=gateway, headers=bearer(b), timeout=30) as c:
        assert c.get(f"/api/v1/sessions/{sid}").status_code == 404
        with c.stream("GET", f"/api/v1/sessions/{sid}/events") as resp:
            assert resp.status_code == 404
        assert sid not in [s["session_id"] for s in c.get("/api/v1/sessions").json()["sessions"]]
    me = httpx.get(f"{gateway}/api/v1/me", headers=bearer(a)).json()
    assert (me["tenant"], me["role"], me["authenticated"]) == ("ta", "member", True)
    anon = httpx.get(f"{gateway}/api/v1/me").json()
    assert (anon["tenant"], anon["role"], anon["authenticated"]) == ("default", "admin", False)


def test_with_auth_keys_every_call_needs_a_key_and_the_first_comes_from_nats(nats_server, seaweedfs):
    """DOCLORA_AUTH=keys: without credentials the gateway and the services refuse (401 /
    UNAUTHENTICATED) except `/api/v1/me`; `doclora keys create --nats` makes the first admin key
    straight in NATS, which then works, and the gateway beyond loopback may start only once a key
    exists (`refusal_to_start` names the command)."""
    import asyncio

    from gateway.auth import refusal_to_start
    from services.stack.client import _create_key_direct

    with running_gateway(nats_server, seaweedfs, ("sessions",), auth="keys") as (url, rt, loop):
        settings = rt.settings
        wide = settings.replace(gateway_host="0.0.0.0")
        async def forget_keys():  # the nats-server is the pytest session's: keys of earlier tests
            for k in await rt.bus.kv_keys(bucket="access"):
                await rt.bus.kv_delete(k, bucket="access")

        asyncio.run_coroutine_threadsafe(forget_keys(), loop).result(10)
        why = asyncio.run(refusal_to_start(wide, wait_s=10))
        assert why and "doclora keys create --role admin" in why and settings.nats_url in why
        assert asyncio.run(refusal_to_start(settings, wait_s=10)) is None  # loopback: no question
        refused = httpx.get(f"{url}/api/v1/sessions")
        assert refused.status_code == 401 and refused.headers["WWW-Authenticate"] == "Bearer"
        # where keys are required, a bearer that is not a doclora token is refused, not ignored
        assert httpx.get(f"{url}/api/v1/sessions", headers=bearer("sk-unused")).status_code == 401
        assert httpx.get(f"{url}/v1/models").json()["error"]["type"] == "authentication_error"
        me = httpx.get(f"{url}/api/v1/me").json()
        assert me["keys_required"] is True and me["authenticated"] is False and me["keys_exist"] is False
        made = asyncio.run(_create_key_direct(settings, settings.nats_url, "ops", "admin", "first"))
        admin = made["token"]
        assert httpx.get(f"{url}/api/v1/sessions", headers=bearer(admin)).status_code == 200
        member = httpx.post(f"{url}/api/v1/keys", json={"tenant": "team"}, headers=bearer(admin))
        assert member.status_code == 201 and member.json()["key"]["role"] == "member"
        assert asyncio.run(refusal_to_start(wide, wait_s=10)) is None
        stored = asyncio.run_coroutine_threadsafe(rt.bus.kv_get(f"key.{made['key']['key_id']}", bucket="access"), loop)
        assert admin.split("_", 2)[2].encode() not in stored.result(10)[0]  # only its hash is kept
