"""Credentials through the gateway: the caller's `Authorization: Bearer <token>` (an API key or a
share token) goes unchanged to every gRPC call the request makes, where the services check it
(`services.common.access`); the gateway itself only refuses requests without credentials where
keys are required (it listens beyond loopback, or DOCLORA_AUTH=keys), before any call.

`Credentials` is pure ASGI middleware: it binds the header in a context variable for the request's
task (streams included), and `ForwardCredentials`, a gRPC client interceptor on every channel,
adds it to each call's metadata."""

from __future__ import annotations

import contextvars

import grpc

from gateway.common import OpenAIError, error, openai_error
from services.common.access import keys_required
from services.common.config import Settings

_AUTHORIZATION: contextvars.ContextVar[str] = contextvars.ContextVar("doclora_authorization", default="")
# routes that need credentials where keys are required; `/api/v1/me` answers everyone (the web
# UI asks it whether to show the key form)
GUARDED = ("/api/", "/v1/")
OPEN = ("/api/v1/me",)


class ForwardCredentials(
    grpc.aio.UnaryUnaryClientInterceptor,
    grpc.aio.UnaryStreamClientInterceptor,
    grpc.aio.StreamUnaryClientInterceptor,
):
    """Adds the request's `authorization` to the metadata of each gRPC call."""

    @staticmethod
    def _details(details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        token = _AUTHORIZATION.get()
        if not token:
            return details
        metadata = grpc.aio.Metadata(*(details.metadata or ()))
        metadata.add("authorization", token)
        return details._replace(metadata=metadata)

    async def intercept_unary_unary(self, continuation, client_call_details, request):
        return await continuation(self._details(client_call_details), request)

    async def intercept_unary_stream(self, continuation, client_call_details, request):
        return await continuation(self._details(client_call_details), request)

    async def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return await continuation(self._details(client_call_details), request_iterator)


class Credentials:
    """ASGI middleware: binds the request's Authorization header for `ForwardCredentials`, and
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
            if path.startswith("/v1/"):
                resp = openai_error(OpenAIError(401, message, code="unauthenticated"))
            else:
                resp = error(401, "UNAUTHENTICATED", message)
            resp.headers["WWW-Authenticate"] = "Bearer"
            return await resp(scope, receive, send)
        token = _AUTHORIZATION.set(header)
        try:
            await self.app(scope, receive, send)
        finally:
            _AUTHORIZATION.reset(token)
