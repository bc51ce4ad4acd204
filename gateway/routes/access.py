"""Who the caller is, API keys (admins) and share links (a bot's owner), and copying a shared bot
(the `access` tag). Tokens are in the creating response only."""

from __future__ import annotations

from fastapi import APIRouter, Request

from doclora.v1 import access_pb2, session_service_pb2
from gateway.common import ClientsDep, to_json
from gateway.schemas import CloneBody, KeyCreate, ShareCreate
from services.common.access import ROLE, keys_required, role_name

router = APIRouter(tags=["access"])
ROLES = {"member": ROLE.ROLE_MEMBER, "admin": ROLE.ROLE_ADMIN}


def key_json(key: access_pb2.ApiKey) -> dict:
    out = to_json(key)
    out["role"] = role_name(key.role)
    out.pop("secret_sha256", None)
    if not key.HasField("revoked_at"):
        out["revoked_at"] = None
    return out


def share_json(share: access_pb2.ShareLink) -> dict:
    out = to_json(share)
    out.pop("secret_sha256", None)
    out.pop("tenant", None)
    return out


@router.get("/api/v1/me")
async def me(request: Request, c: ClientsDep):
    """The caller (tenant, role; a share link's bot) and whether this server requires keys."""
    resp = await c.access.WhoAmI(access_pb2.WhoAmIRequest(), timeout=c.timeout)
    settings = request.app.state.settings
    role = "share" if resp.share_session_id else role_name(resp.role) if resp.tenant else ""
    return {
        "authenticated": resp.authenticated,
        "tenant": resp.tenant,
        "role": role,
        "key_id": resp.key_id,
        "keys_required": resp.keys_required or keys_required(settings, settings.gateway_host),
        "keys_exist": resp.keys_exist,
        "share_session_id": resp.share_session_id,
        "share_show_citations": resp.share_show_citations,
        "share_bot_name": resp.share_bot_name,
        "limits": to_json(resp.limits),
    }


@router.post("/api/v1/keys", status_code=201)
async def create_key(body: KeyCreate, c: ClientsDep):
    """Create an API key (admins); its `token` is shown here once."""
    req = access_pb2.CreateKeyRequest(
        tenant=body.tenant, role=ROLES[body.role], name=body.name, limits=access_pb2.KeyLimits(**body.limits.model_dump())
    )
    resp = await c.access.CreateKey(req, timeout=c.timeout)
    return {"key": key_json(resp.key), "token": resp.token}


@router.get("/api/v1/keys")
async def list_keys(c: ClientsDep, tenant: str = "", include_revoked: bool = False):
    resp = await c.access.ListKeys(
        access_pb2.ListKeysRequest(tenant=tenant, include_revoked=include_revoked), timeout=c.timeout
    )
    return {"keys": [key_json(k) for k in resp.keys]}


@router.delete("/api/v1/keys/{key_id}")
async def revoke_key(key_id: str, c: ClientsDep):
    resp = await c.access.RevokeKey(access_pb2.RevokeKeyRequest(key_id=key_id), timeout=c.timeout)
    return {"key": key_json(resp.key)}


@router.post("/api/v1/sessions/{session_id}/shares", status_code=201)
async def create_share(session_id: str, c: ClientsDep, body: ShareCreate | None = None):
    """A share link for a bot: `/s/{token}` opens a chat-only page with it; `token` is shown once."""
    body = body or ShareCreate()
    resp = await c.access.CreateShare(
        access_pb2.CreateShareRequest(session_id=session_id, show_citations=body.show_citations, name=body.name),
        timeout=c.timeout,
    )
    return {"share": share_json(resp.share), "token": resp.token, "url": f"/s/{resp.token}"}


@router.get("/api/v1/sessions/{session_id}/shares")
async def list_shares(session_id: str, c: ClientsDep):
    resp = await c.access.ListShares(access_pb2.ListSharesRequest(session_id=session_id), timeout=c.timeout)
    return {"shares": [share_json(s) for s in resp.shares]}


@router.delete("/api/v1/shares/{share_id}")
async def revoke_share(share_id: str, c: ClientsDep):
    resp = await c.access.RevokeShare(access_pb2.RevokeShareRequest(share_id=share_id), timeout=c.timeout)
    return {"share": share_json(resp.share)}


@router.post("/api/v1/shared/clone", status_code=201)
async def clone_shared(body: CloneBody, c: ClientsDep):
    """Copy a shared bot into the caller's tenant as a new session (adapter and pairs, or pairs
    only and train)."""
    resp = await c.sessions.CloneSharedBot(
        session_service_pb2.CloneSharedBotRequest(
            share_token=body.share_token, pairs_only=body.pairs_only, name=body.name
        ),
        timeout=c.timeout,
    )
    return to_json(resp.session)
