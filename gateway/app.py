"""The HTTP gateway: REST under /api/v1, Server-Sent Events for progress and chat, an
OpenAI-compatible /v1/chat/completions, and the web UI. It holds no business logic: every route maps
to one gRPC call. This module assembles the app: settings and gRPC channels on `app.state`, the body
size limit, the handlers that turn every error into the JSON error envelope, and the routers of
`gateway.routes` in a fixed order (the order of the route table and of the OpenAPI paths)."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from gateway.clients import Clients
from gateway.common import error, http_status
from gateway.routes import bots, documents, health, openai, pairs, sessions, sources, web
from services.common.config import Settings
from services.common.errors import DocloraError

log = logging.getLogger(__name__)
# Pasted text travels as JSON; refuse bodies far over the text limit before reading them.
BODY_SLACK = 64 * 1024
ROUTERS = (health, sources, sessions, documents, pairs, bots, openai, web)


async def rpc_error(request: Request, exc: grpc.aio.AioRpcError):
    return error(http_status(exc.code()), exc.code().name, exc.details() or exc.code().name)


async def domain_error(request: Request, exc: DocloraError):
    """A domain error raised in the gateway itself (a name with no enum value, say), as the services'
    would come back."""
    return error(http_status(grpc.StatusCode[exc.code]), exc.code, str(exc))


async def bad_request(request: Request, exc: RequestValidationError):
    parts = [f"{'.'.join(str(x) for x in e.get('loc', []))}: {e.get('msg')}" for e in exc.errors()]
    return error(400, "INVALID_ARGUMENT", "; ".join(parts) or "malformed request")


async def internal(request: Request, exc: Exception):
    log.exception("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
    return error(500, "INTERNAL", "internal error; see the gateway log")


async def http_error(request: Request, exc: StarletteHTTPException):
    codes = {404: "NOT_FOUND", 405: "INVALID_ARGUMENT", 413: "RESOURCE_EXHAUSTED"}
    return error(exc.status_code, codes.get(exc.status_code, "INVALID_ARGUMENT"), str(exc.detail))


async def limit_body(request: Request, call_next):
    settings: Settings = request.app.state.settings
    length = request.headers.get("content-length")
    limit = settings.max_text_bytes * 2 + BODY_SLACK
    if request.headers.get("content-type", "").startswith("multipart/"):
        limit = settings.max_upload_bytes + BODY_SLACK  # files stream on; ingest checks each
    if length and length.isdigit() and int(length) > limit:
        return error(413, "RESOURCE_EXHAUSTED", f"request body of {length} bytes is too large")
    return await call_next(request)


@asynccontextmanager
async def lifespan(app: FastAPI):
    app.state.clients = Clients.connect(app.state.settings)
    yield
    await app.state.clients.close()


def create_app(settings: Settings | None = None) -> FastAPI:
    app = FastAPI(
        title="doclora",
        version="0.1.0",
        description="Turn documents into a chat bot that knows them.",
        lifespan=lifespan,
    )
    app.state.settings = settings or Settings.from_env()
    app.add_exception_handler(grpc.aio.AioRpcError, rpc_error)
    app.add_exception_handler(DocloraError, domain_error)
    app.add_exception_handler(RequestValidationError, bad_request)
    app.add_exception_handler(Exception, internal)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.middleware("http")(limit_body)
    for module in ROUTERS:
        app.include_router(module.router)
    return app
