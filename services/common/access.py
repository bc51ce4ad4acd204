"""Who is calling: API keys and share links, the tenant a call acts for, and the per-key limits.

Every gRPC call of every service goes through `AuthInterceptor`: it reads `authorization: Bearer
<token>` from the call's metadata, resolves it against the KV bucket `access` (keys and share
links are stored by id with the SHA-256 of their secret; the secret itself is never stored), and
binds the `Caller` for the rest of the call (`current()`). Without credentials a caller is the admin
of the default tenant (Settings.tenant), but only while the process listens on loopback and
DOCLORA_AUTH is not "keys"; otherwise it is UNAUTHENTICATED.

Invariants: services take the tenant from the bound caller (`acting`, `current`), never from a
request body; the session
repo hides every record of another tenant (NOT_FOUND, as an unknown id); a share token calls only
`InferenceService.Chat` for its one bot and `AccessService.WhoAmI`; revoking a key or a link takes
effect on the next call (nothing is cached)."""

from __future__ import annotations

import contextvars
import hashlib
import hmac
import ipaddress
import math
import re
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import grpc

from doclora.v1 import access_pb2
from services.common.bus import ACCESS_BUCKET
from services.common.errors import (
    InvalidArgument,
    NotFound,
    PermissionDenied,
    TooManyRequests,
    Unauthenticated,
)
from services.common.server import wrap_handler

KEY_PREFIX, SHARE_PREFIX = "dlk_", "dls_"
ROLE = access_pb2.Role
ROLE_NAMES = {ROLE.ROLE_MEMBER: "member", ROLE.ROLE_ADMIN: "admin"}
_TENANT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
_TOKEN = re.compile(r"^(dlk_|dls_)([0-9a-f]{16})_([A-Za-z0-9_-]{20,100})$")
# calls that answer without credentials (probes, discovery) and those a share link may make
OPEN_METHODS = ("/grpc.health.v1.Health/", "/grpc.reflection.", "/doclora.v1.AccessService/WhoAmI")
SHARE_METHODS = frozenset({"/doclora.v1.InferenceService/Chat", "/doclora.v1.AccessService/WhoAmI"})
CHAT_METHOD = "/doclora.v1.InferenceService/Chat"


@dataclass(frozen=True)
class Caller:
    """The caller of one gRPC call: `role` is "admin", "member", "share" (a share link) or
    "anonymous" (no credentials, on a loopback-only server: acts as admin of the default tenant)."""

    tenant: str
    role: str
    key_id: str = ""
    share: access_pb2.ShareLink | None = None
    limits: access_pb2.KeyLimits = field(default_factory=access_pb2.KeyLimits)

    @property
    def is_admin(self) -> bool:
        return self.role in ("admin", "anonymous")


_CALLER: contextvars.ContextVar[Caller | None] = contextvars.ContextVar("doclora_caller", default=None)


def current() -> Caller:
    """The caller of the gRPC call being served; UNAUTHENTICATED outside one."""
    caller = _CALLER.get()
    if caller is None:
        raise Unauthenticated("no caller bound to this call")
    return caller


def caller_or_none() -> Caller | None:
    """The caller of the call being served; None for an open method called without credentials."""
    return _CALLER.get()


def acting(settings) -> Caller:
    """The caller of the call being served; outside a call (workers, domain code driven directly
    by tests), the admin of the default tenant, as a caller without credentials on loopback."""
    return _CALLER.get() or Caller(settings.tenant, "anonymous")


def bound_tenant() -> str | None:
    """The tenant of the call being served; None in background work (workers act for the tenant of
    their work message)."""
    caller = _CALLER.get()
    return caller.tenant if caller is not None else None


def bind(caller: Caller | None) -> contextvars.Token:
    """Bind `caller` for the rest of this task (the interceptor does it per call; tests and the
    CLI's direct key commands bind one themselves)."""
    return _CALLER.set(caller)


def require_admin() -> Caller:
    caller = current()
    if not caller.is_admin:
        raise PermissionDenied("only an admin API key may do this")
    return caller


def require_owner() -> Caller:
    """A caller acting for its tenant (not a share link)."""
    caller = current()
    if caller.role == "share":
        raise PermissionDenied("a share link can only chat with its bot")
    return caller


def is_tenant_name(tenant: str) -> bool:
    return bool(_TENANT.match(tenant or ""))


def stored_tenants(store) -> list[str]:
    """Blocking: the tenants that have objects in the store (its top-level folders)."""
    folders = store.list("", recursive=False)
    return [f.rstrip("/") for f in folders if f.endswith("/") and is_tenant_name(f.rstrip("/"))]


def check_tenant_name(tenant: str) -> str:
    if not is_tenant_name(tenant):
        raise InvalidArgument("a tenant is 1-64 letters, digits, '-' or '_', starting with a letter or digit")
    return tenant


def role_name(role: int) -> str:
    return ROLE_NAMES.get(role, "member")


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def new_token(prefix: str) -> tuple[str, str, bytes]:
    """A fresh (token, id, sha256 of its secret) for a key (`dlk_`) or a share link (`dls_`)."""
    ident, secret = secrets.token_hex(8), secrets.token_urlsafe(32)
    return f"{prefix}{ident}_{secret}", ident, _digest(secret)


def parse_token(token: str) -> tuple[str, str, str]:
    """(prefix, id, secret) of a well-formed token; UNAUTHENTICATED otherwise."""
    m = _TOKEN.match(token.strip())
    if m is None:
        raise Unauthenticated("the credentials are not a doclora API key or share token")
    return m.group(1), m.group(2), m.group(3)


def is_loopback_addr(addr: str) -> bool:
    """Whether `host:port` (or a bare host) listens on loopback only."""
    host = addr.rsplit(":", 1)[0] if addr.count(":") == 1 or addr.startswith("[") else addr
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def keys_required(settings, listen_addr: str) -> bool:
    """Whether a process listening on `listen_addr` refuses callers without credentials."""
    return settings.auth == "keys" or not is_loopback_addr(listen_addr)


class AccessStore:
    """API keys and share links in the KV bucket `access` (`key.{id}`, `share.{id}`), as protobuf."""

    def __init__(self, bus):
        self.bus = bus

    async def _get(self, kv_key: str, message):
        data, _ = await self.bus.kv_get(kv_key, bucket=ACCESS_BUCKET)
        return type(message).FromString(data)

    async def _all(self, prefix: str, message) -> list:
        out = []
        for k in await self.bus.kv_keys(bucket=ACCESS_BUCKET):
            if k.startswith(prefix):
                try:
                    out.append(await self._get(k, message))
                except NotFound:  # removed between the listing and the read
                    continue
        out.sort(key=lambda m: (m.created_at.seconds, m.created_at.nanos), reverse=True)
        return out

    async def add_key(self, key: access_pb2.ApiKey) -> None:
        await self.bus.kv_create(f"key.{key.key_id}", key.SerializeToString(), bucket=ACCESS_BUCKET)

    async def create_key(
        self, tenant: str, role: int, name: str, limits: access_pb2.KeyLimits | None = None
    ) -> tuple[access_pb2.ApiKey, str]:
        """Check and store a new API key (ROLE_MEMBER when `role` is unset); (the key as stored, its
        token, which exists nowhere else)."""
        check_tenant_name(tenant)
        if role not in (ROLE.ROLE_UNSPECIFIED, ROLE.ROLE_MEMBER, ROLE.ROLE_ADMIN):
            raise InvalidArgument(f"unknown role {role}")
        limits = limits or access_pb2.KeyLimits()
        for field_name in ("max_sessions_in_flight", "max_steps", "chat_per_minute"):
            if getattr(limits, field_name) < 0:
                raise InvalidArgument(f"limits.{field_name} must not be negative")
        if len(name) > 200:
            raise InvalidArgument("a key's name is at most 200 characters")
        token, key_id, digest = new_token(KEY_PREFIX)
        key = access_pb2.ApiKey(
            key_id=key_id,
            tenant=tenant,
            role=role or ROLE.ROLE_MEMBER,
            name=name,
            secret_sha256=digest,
            limits=limits,
        )
        key.created_at.GetCurrentTime()
        await self.add_key(key)
        return key, token

    async def _one(self, kind: str, ident: str, message, what: str):
        try:
            return await self._get(f"{kind}.{ident}", message)
        except (NotFound, InvalidArgument):
            raise NotFound(f"{what} {ident!r} not found") from None

    async def get_key(self, key_id: str) -> access_pb2.ApiKey:
        return await self._one("key", key_id, access_pb2.ApiKey(), "API key")

    async def keys(self) -> list[access_pb2.ApiKey]:
        return await self._all("key.", access_pb2.ApiKey())

    async def put_key(self, key: access_pb2.ApiKey) -> None:
        def change(_: bytes) -> bytes:
            return key.SerializeToString()

        await self.bus.kv_mutate(f"key.{key.key_id}", change, bucket=ACCESS_BUCKET)

    async def any_active_key(self) -> bool:
        return any(not k.HasField("revoked_at") for k in await self.keys())

    async def add_share(self, share: access_pb2.ShareLink) -> None:
        await self.bus.kv_create(f"share.{share.share_id}", share.SerializeToString(), bucket=ACCESS_BUCKET)

    async def get_share(self, share_id: str) -> access_pb2.ShareLink:
        return await self._one("share", share_id, access_pb2.ShareLink(), "share link")

    async def shares(self) -> list[access_pb2.ShareLink]:
        return await self._all("share.", access_pb2.ShareLink())

    async def delete_share(self, share_id: str) -> None:
        await self.bus.kv_delete(f"share.{share_id}", bucket=ACCESS_BUCKET)

    async def resolve(self, token: str) -> Caller:
        """The caller a bearer token stands for; UNAUTHENTICATED for an unknown, revoked or wrong one
        (the same message for each, so a guess learns nothing)."""
        prefix, ident, secret = parse_token(token)
        refused = Unauthenticated("unknown or revoked credentials")
        try:
            if prefix == KEY_PREFIX:
                key = await self.get_key(ident)
                if key.HasField("revoked_at") or not hmac.compare_digest(key.secret_sha256, _digest(secret)):
                    raise refused
                return Caller(key.tenant, role_name(key.role), key.key_id, limits=key.limits)
            share = await self.get_share(ident)
        except NotFound:
            raise refused from None
        if not hmac.compare_digest(share.secret_sha256, _digest(secret)):
            raise refused
        return Caller(share.tenant, "share", share=share)


class RateLimiter:
    """Requests per minute by key, as a token bucket per key in this process (with N replicas a key
    gets up to N times its rate)."""

    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self.buckets: dict[str, tuple[float, float]] = {}

    def take(self, key: str, per_minute: int) -> None:
        """Count one request of `key`; TooManyRequests (with the seconds to wait) over the rate."""
        if per_minute <= 0:
            return
        now = self.clock()
        tokens, last = self.buckets.get(key, (float(per_minute), now))
        tokens = min(float(per_minute), tokens + (now - last) * per_minute / 60.0)
        if tokens < 1.0:
            self.buckets[key] = (tokens, now)
            wait = math.ceil((1.0 - tokens) * 60.0 / per_minute)
            raise TooManyRequests(f"more than {per_minute} chats a minute for this key", retry_after_s=wait)
        self.buckets[key] = (tokens - 1.0, now)
        if len(self.buckets) > 10_000:  # forget the idle ones
            self.buckets = {k: v for k, v in self.buckets.items() if now - v[1] < 60.0}


def effective_limit(caller: Caller, name: str, default: int) -> int:
    """A caller's limit `name` (a KeyLimits field): its key's own when set, else `default` for
    members and share links, none (0) for admins."""
    own = getattr(caller.limits, name)
    if own:
        return own
    return 0 if caller.is_admin else default


class Gate:
    """Resolves the caller of each call: `required` when DOCLORA_AUTH=keys or the process listens
    beyond loopback."""

    def __init__(self, store: AccessStore, settings, listen_addr: str):
        self.store, self.settings = store, settings
        self.required = keys_required(settings, listen_addr)
        self.chats = RateLimiter()

    async def caller(self, method: str, metadata: Iterable[tuple[str, str]]) -> Caller | None:
        """The caller of `method`, or None for an open method called without credentials."""
        header = next((v for k, v in metadata if k == "authorization"), "")
        if not self.required and not header.partition(" ")[2].strip().startswith((KEY_PREFIX, SHARE_PREFIX)):
            # OpenAI SDKs always send some key ("unused", "sk-..."): where none is needed, not
            # one of ours stands for no credentials
            header = ""
        if not header:
            if self.required and method.startswith(OPEN_METHODS):
                return None
            if self.required:
                raise Unauthenticated(
                    "this server requires an API key: send 'authorization: Bearer dlk_...' "
                    "(an admin creates keys with `doclora keys create`)"
                )
            return Caller(self.settings.tenant, "anonymous")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise Unauthenticated("authorization must be 'Bearer <token>'")
        caller = await self.store.resolve(token)
        if caller.role == "share" and method not in SHARE_METHODS and not method.startswith(OPEN_METHODS):
            raise PermissionDenied("a share link can only chat with its bot")
        if method == CHAT_METHOD:
            rate = effective_limit(caller, "chat_per_minute", self.settings.key_chat_per_minute)
            self.chats.take(caller.key_id or f"share:{caller.share.share_id}", rate)
        return caller


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Binds the `Caller` of every call (see `Gate`) before the handler runs; a refused call ends
    with UNAUTHENTICATED, PERMISSION_DENIED or RESOURCE_EXHAUSTED (through ErrorInterceptor, which
    must come first in the server's interceptor list)."""

    def __init__(self, gate: Gate):
        self.gate = gate

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        metadata = tuple(handler_call_details.invocation_metadata or ())
        gate = self.gate

        def wrap_unary(inner):
            async def call(request, context):
                bind(await gate.caller(method, metadata))
                return await inner(request, context)

            return call

        def wrap_stream(inner):
            async def call(request, context):
                bind(await gate.caller(method, metadata))
                async for item in inner(request, context):
                    yield item

            return call

        return wrap_handler(handler, wrap_unary, wrap_stream)
