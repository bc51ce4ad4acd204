"""Credentials through the gateway: the caller's `Authorization: Bearer <token>` (an API key or a
share token) goes unchanged to every gRPC call the request makes, where the services check it
(`services.common.access`); the gateway itself only refuses requests without credentials where
keys are required (it listens beyond loopback, or DOCLORA_AUTH=keys), before any call.

`Credentials` is pure ASGI middleware: it binds the header in a context variable for the request's
task (streams included), and `forward_credentials()`, gRPC client interceptors on every channel,
add it to each call's metadata."""

from __future__ import annotations

import contextvars

import grpc

from gateway.common import envelope
from services.common.access import is_loopback_addr, keys_required
from services.common.config import Settings
from services.common.server import GRPC_OPTIONS

_AUTHORIZATION: contextvars.ContextVar[str] = contextvars.ContextVar("doclora_authorization", default="")
# routes that need credentials where keys are required; `/api/v1/me` answers everyone (the web
# UI asks it whether to show the key form)
GUARDED = ("/api/", "/v1/")
OPEN = ("/api/v1/me",)


def with_credentials(details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
    """`details` with the request's `authorization` added to its metadata."""
    token = _AUTHORIZATION.get()
    if not token:
        return details
    metadata = grpc.aio.Metadata(*(details.metadata or ()))
    metadata.add("authorization", token)
    return details._replace(metadata=metadata)


# grpc.aio files a client interceptor under one kind of call only, so one class per kind
class _UnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, client_call_details, request):
        return await continuation(with_credentials(client_call_details), request)


class _UnaryStream(grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, client_call_details, request):
        return await continuation(with_credentials(client_call_details), request)


class _StreamUnary(grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return await continuation(with_credentials(client_call_details), request_iterator)


def forward_credentials() -> list[grpc.aio.ClientInterceptor]:
    """The client interceptors that add the request's `authorization` to every gRPC call."""
    return [_UnaryUnary(), _UnaryStream(), _StreamUnary()]


class Credentials:
    """ASGI middleware: binds the request's Authorization header for `forward_credentials`, and
    answers 401 to a guarded route without one where keys are required."""

    def __init__(self, app, settings: Settings):
        self.app = app
        self.required = keys_required(settings, settings.gateway_host)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        header = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"authorization"), "")
        path = scope["path"]
        if self.required and not header and path.startswith(GUARDED) and path not in OPEN:
            message = "this server requires an API key: send 'Authorization: Bearer dlk_...'"
            resp = envelope(path, 401, "UNAUTHENTICATED", message)
            resp.headers["WWW-Authenticate"] = "Bearer"
            return await resp(scope, receive, send)
        token = _AUTHORIZATION.set(header)
        try:
            await self.app(scope, receive, send)
        finally:
            _AUTHORIZATION.reset(token)


FIRST_KEY_HELP = (
    "create the first admin key with `doclora keys create --role admin --tenant NAME --nats {nats}` "
    "(it prints the token once), then start the gateway again"
)


async def refusal_to_start(settings: Settings, wait_s: float = 120.0) -> str | None:
    """Why the gateway must not start: it listens beyond loopback and no API key exists yet (asked
    of the AccessService, waiting up to `wait_s` for it). None when it may start."""
    from doclora.v1 import access_pb2, access_pb2_grpc

    if is_loopback_addr(settings.gateway_host):
        return None
    async with grpc.aio.insecure_channel(settings.ingest_addr, options=GRPC_OPTIONS) as channel:
        try:
            who = await access_pb2_grpc.AccessServiceStub(channel).WhoAmI(
                access_pb2.WhoAmIRequest(), timeout=wait_s, wait_for_ready=True
            )
        except grpc.aio.AioRpcError as exc:
            return f"cannot ask the ingest service at {settings.ingest_addr} whether API keys exist: {exc.details()}"
    if who.keys_exist:
        return None
    return (
        f"the gateway would listen on {settings.gateway_host}, beyond loopback, and no API key exists: "
        + FIRST_KEY_HELP.format(nats=settings.nats_url)
    )
