"""What the app and every route module share, the one place each of these lives: the gRPC clients
taken from `request.app.state` (as the `ClientsDep` dependency), gRPC status -> HTTP status, the JSON
error envelopes (doclora's `{"error": {"code", "message"}}` and OpenAI's `{"error": {"message", "type",
"param", "code"}}` under /v1), protobuf -> JSON, reading a server stream whose first messages were
already read, and Server-Sent Events (framed by sse-starlette, with `: ping` keep-alive comments, an
error event in the API's envelope ending a stream that fails midway, and the stream closed when the
client goes away)."""

from __future__ import annotations

import json
import logging
from typing import Annotated

import grpc
from fastapi import Depends, Request
from fastapi.responses import JSONResponse
from google.protobuf.json_format import MessageToDict
from sse_starlette import EventSourceResponse, ServerSentEvent

from doclora.v1 import session_pb2
from gateway.clients import Clients
from services.common.options import CHOICES, choice_names

log = logging.getLogger(__name__)

HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.FAILED_PRECONDITION: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 413,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


# OpenAI's error `type` by HTTP status (anything else at or above 500 is a `server_error`)
OPENAI_ERROR_TYPE = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}
# Every SSE line ends in "\n" (not sse-starlette's default "\r\n"): OpenAI streams are exactly
# `data: {json}\n\n`. Idle streams get a comment every DOCLORA_SSE_PING_S seconds, which EventSource and
# SSE clients skip and which keeps proxies from closing a progress stream waiting in the queue.
SSE_SEP = "\n"
INTERNAL_MESSAGE = "internal error; see the gateway log"


def http_status(code: grpc.StatusCode) -> int:
    return HTTP_STATUS.get(code, 500)


def retry_after(exc: grpc.aio.AioRpcError) -> str | None:
    """The seconds to wait that a refusal over a limit carries (trailing metadata `retry-after`):
    such a RESOURCE_EXHAUSTED is HTTP 429 with a Retry-After header, not 413."""
    if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
        return None
    return next((str(v) for k, v in (exc.trailing_metadata() or ()) if k == "retry-after"), None)


def rpc_status(exc: grpc.aio.AioRpcError) -> int:
    return 429 if retry_after(exc) else http_status(exc.code())


class OpenAIError(Exception):
    """An error of the OpenAI-compatible API, answered as OpenAI does (`openai_error`)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        retry_after: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.retry_after = retry_after

    def body(self) -> dict:
        kind = OPENAI_ERROR_TYPE.get(self.status) or (
            "server_error" if self.status >= 500 else "invalid_request_error"
        )
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def openai_error(exc: OpenAIError) -> JSONResponse:
    headers = {"Retry-After": exc.retry_after} if exc.retry_after else None
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


def openai_rpc_error(exc: grpc.aio.AioRpcError) -> OpenAIError:
    """A failed gRPC call as the OpenAI API says it, with the HTTP status of `rpc_status`: a full
    inference queue or a key over its rate is a 429 with Retry-After (which the OpenAI SDKs honour
    when they retry)."""
    code = exc.code()
    return OpenAIError(
        rpc_status(exc), exc.details() or code.name, code=code.name.lower(), retry_after=retry_after(exc)
    )


def clients(request: Request) -> Clients:
    """The gRPC clients the app's lifespan opened (`app.state.clients`)."""
    return request.app.state.clients


ClientsDep = Annotated[Clients, Depends(clients)]


def to_json(msg) -> dict:
    """A message as JSON; a session's options show their choices by lowercase name under the keys of
    the deprecated string fields (`answer_mode`, ...), as before the enum fields came."""
    out = MessageToDict(msg, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    if isinstance(msg, session_pb2.Session) and "options" in out:
        for choice in CHOICES:
            del out["options"][choice.field]
        out["options"].update(choice_names(msg.options))
    return out


def error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


def envelope(path: str, status: int, code: str, message: str, param: str | None = None) -> JSONResponse:
    """The error envelope of `path`: OpenAI's under /v1 (`code` in lowercase), doclora's elsewhere."""
    if path.startswith("/v1/"):
        return openai_error(OpenAIError(status, message, code=code.lower(), param=param))
    return error(status, code, message)


async def responses(call, *read):
    """The messages of a server stream whose first messages were already `read` (so that its errors
    became HTTP statuses), those first; cancels the call when left."""
    try:
        for msg in read:
            if msg is grpc.aio.EOF:
                return
            yield msg
        while (msg := await call.read()) is not grpc.aio.EOF:
            yield msg
    finally:
        call.cancel()


def sse(event: str | None, data: dict | str) -> ServerSentEvent:
    """One Server-Sent Event of JSON `data` (a str as it is); `event` None gives the data-only frame
    OpenAI streams use."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return ServerSentEvent(text, event=event, sep=SSE_SEP)


def sse_error(exc: Exception, *, openai: bool = False) -> ServerSentEvent:
    """The event that ends a stream failing after its response began, in its API's envelope:
    doclora's `error` event, or OpenAI's data-only `{"error": ...}` chunk (`openai`; the stream's
    `data: [DONE]` follows). A failed gRPC call (the service gone, say) keeps its status and
    message; anything else is logged and told as an internal error."""
    if isinstance(exc, grpc.aio.AioRpcError):
        if openai:
            return sse(None, openai_rpc_error(exc).body())
        return sse("error", {"error": {"code": exc.code().name, "message": exc.details() or exc.code().name}})
    log.error("a stream failed after its response began", exc_info=exc)
    if openai:
        return sse(None, OpenAIError(500, INTERNAL_MESSAGE).body())
    return sse("error", {"error": {"code": "INTERNAL", "message": INTERNAL_MESSAGE}})


def ping() -> ServerSentEvent:
    return ServerSentEvent(comment="ping", sep=SSE_SEP)


def event_stream(request: Request, events) -> EventSourceResponse:
    """A Server-Sent Events response (progress, chat, OpenAI chunks), never cached, with a `: ping`
    comment every `settings.sse_ping_s` seconds; when the client disconnects, `events` is closed
    (so the gRPC stream under it is cancelled)."""
    return EventSourceResponse(
        events,
        headers={"Cache-Control": "no-cache"},
        ping=request.app.state.settings.sse_ping_s,
        sep=SSE_SEP,
        ping_message_factory=ping,
    )
