"""What the app and every route module share, the one place each of these lives: the gRPC clients
taken from `request.app.state` (as the `ClientsDep` dependency), gRPC status -> HTTP status, the JSON
error envelope `{"error": {"code", "message"}}`, protobuf -> JSON, reading a server stream whose
first message was already read, and Server-Sent Events framing."""

from __future__ import annotations

import json
from typing import Annotated

import grpc
from fastapi import Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse
from google.protobuf.json_format import MessageToDict

from doclora.v1 import session_pb2
from gateway.clients import Clients
from services.common.options import CHOICES, choice_names

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


def http_status(code: grpc.StatusCode) -> int:
    return HTTP_STATUS.get(code, 500)


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


async def responses(call, first):
    """The messages of a server stream whose first message was already read (so that its errors
    became HTTP statuses); cancels the call when left."""
    msg = first
    try:
        while msg is not grpc.aio.EOF:
            yield msg
            msg = await call.read()
    finally:
        call.cancel()


def sse(event: str | None, data: dict) -> bytes:
    """One Server-Sent Event; `event` None gives the data-only frame OpenAI streams use."""
    head = f"event: {event}\n" if event is not None else ""
    return f"{head}data: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


def sse_error(exc: grpc.aio.AioRpcError) -> bytes:
    """The `error` event that ends a stream whose gRPC call failed after the response began."""
    return sse("error", {"error": {"code": exc.code().name, "message": exc.details()}})


def event_stream(events) -> StreamingResponse:
    """A Server-Sent Events response of the doclora routes (progress, chat), never cached."""
    return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
