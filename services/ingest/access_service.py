"""AccessService: API keys (admins create, list and revoke them) and share links (a bot's owner
makes, lists and revokes them), and WhoAmI. Tokens are returned once, at creation; the store keeps
only the SHA-256 of their secret (`services.common.access`)."""

from __future__ import annotations

from doclora.v1 import access_pb2, access_pb2_grpc
from services.common import access
from services.common.access import AccessStore
from services.common.errors import InvalidArgument, NotFound
from services.common.runtime import Runtime
from services.common.sessions import now_ts


def public(message):
    """A key or link as it leaves the service: without the hash of its secret."""
    out = type(message).FromString(message.SerializeToString())
    out.ClearField("secret_sha256")
    return out


class AccessServicer(access_pb2_grpc.AccessServiceServicer):
    def __init__(self, rt: Runtime):
        self.rt = rt
        self.store = AccessStore(rt.bus)

    async def CreateKey(self, request, context):
        caller = access.require_admin()
        key, token = await self.store.create_key(
            request.tenant or caller.tenant, request.role, request.name, request.limits
        )
        return access_pb2.CreateKeyResponse(key=public(key), token=token)

    async def ListKeys(self, request, context):
        access.require_admin()
        keys = [
            public(k)
            for k in await self.store.keys()
            if (not request.tenant or k.tenant == request.tenant)
            and (request.include_revoked or not k.HasField("revoked_at"))
        ]
        return access_pb2.ListKeysResponse(keys=keys)

    async def RevokeKey(self, request, context):
        access.require_admin()
        key = await self.store.get_key(request.key_id)
        if not key.HasField("revoked_at"):
            key.revoked_at.CopyFrom(now_ts())
            await self.store.put_key(key)
        return access_pb2.RevokeKeyResponse(key=public(key))

    async def WhoAmI(self, request, context):
        settings = self.rt.settings
        out = access_pb2.WhoAmIResponse(keys_exist=await self.store.any_active_key())
        out.keys_required = access.keys_required(settings, settings.listen_addr or settings.ingest_addr)
        caller = access.caller_or_none()
        if caller is None:
            return out
        out.authenticated = caller.role != "anonymous"
        out.tenant, out.key_id = caller.tenant, caller.key_id
        out.role = access.ROLE.ROLE_ADMIN if caller.is_admin else access.ROLE.ROLE_MEMBER
        if caller.share is not None:
            out.role = access.ROLE.ROLE_UNSPECIFIED
            out.share_session_id = caller.share.session_id
            out.share_show_citations = caller.share.show_citations
            try:
                out.share_bot_name = (await self.rt.sessions.get(caller.share.session_id)).name
            except NotFound:
                raise NotFound("this share link's bot no longer exists") from None
        out.limits.max_sessions_in_flight = access.effective_limit(
            caller, "max_sessions_in_flight", settings.key_max_sessions_in_flight
        )
        out.limits.max_steps = access.effective_limit(caller, "max_steps", settings.key_max_steps)
        out.limits.chat_per_minute = access.effective_limit(caller, "chat_per_minute", settings.key_chat_per_minute)
        return out

    async def CreateShare(self, request, context):
        caller = access.require_owner()
        rec = await self.rt.sessions.get(request.session_id)  # NOT_FOUND for another tenant's
        if len(request.name) > 200:
            raise InvalidArgument("a link's name is at most 200 characters")
        token, share_id, digest = access.new_token(access.SHARE_PREFIX)
        share = access_pb2.ShareLink(
            share_id=share_id,
            tenant=caller.tenant,
            session_id=rec.session_id,
            secret_sha256=digest,
            show_citations=request.show_citations,
            created_at=now_ts(),
            name=request.name,
        )
        await self.store.add_share(share)
        return access_pb2.CreateShareResponse(share=public(share), token=token)

    async def ListShares(self, request, context):
        access.require_owner()
        rec = await self.rt.sessions.get(request.session_id)
        shares = [public(s) for s in await self.store.shares() if s.session_id == rec.session_id]
        return access_pb2.ListSharesResponse(shares=shares)

    async def RevokeShare(self, request, context):
        caller = access.require_owner()
        share = await self.store.get_share(request.share_id)
        if share.tenant != caller.tenant:
            raise NotFound(f"share link {request.share_id!r} not found")
        await self.store.delete_share(share.share_id)
        return access_pb2.RevokeShareResponse(share=public(share))
