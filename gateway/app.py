"""The HTTP gateway: REST under /api/v1, Server-Sent Events for progress and chat, an
OpenAI-compatible /v1/chat/completions, and the web UI. It holds no business logic: every route maps
to one gRPC call. This module assembles the app: settings and gRPC channels on `app.state`, the handlers that turn every error into the JSON error envelope (OpenAI's shape under
/v1), and the routers of `gateway.routes` in a fixed order (the order of the route table and of the
OpenAPI paths), behind the guard (`gateway.guard`: Host, Origin, body size) and the credentials
(`gateway.auth`). FastAPI's own /docs and /redoc load their scripts from a CDN; `routes.docs` serves
Swagger UI from the installed swagger-ui-bundle instead. Outermost of all, `HttpMetrics` counts and
times every request by route template and answers `GET /metrics` for Prometheus (not a route, so
it is not in the OpenAPI document; like /healthz it needs no credentials: it holds counts only)."""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.auth import Credentials
from gateway.clients import Clients
from gateway.common import (
    INTERNAL_MESSAGE,
    OpenAIError,
    envelope,
    error,
    http_status,
    openai_error,
    openai_rpc_error,
    retry_after,
    rpc_status,
)
from gateway.guard import install as install_guard
from gateway.routes import access, bots, docs, documents, health, openai, pairs, sessions, sources, web
from services.common import metrics
from services.common.config import Settings
from services.common.errors import DocloraError

log = logging.getLogger(__name__)
ROUTERS = (health, access, sources, sessions, documents, pairs, bots, openai, docs, web)


def is_openai(request: Request) -> bool:
    return request.url.path.startswith("/v1/")


def reply(request: Request, status: int, code: str, message: str, param: str | None = None):
    """The error envelope of the request's path (`common.envelope`)."""
    return envelope(request.url.path, status, code, message, param)


async def rpc_error(request: Request, exc: grpc.aio.AioRpcError):
    if is_openai(request):
        return openai_error(openai_rpc_error(exc))
    resp = error(rpc_status(exc), exc.code().name, exc.details() or exc.code().name)
    if wait := retry_after(exc):
        resp.headers["Retry-After"] = wait
    return resp


async def domain_error(request: Request, exc: DocloraError):
    """A domain error raised in the gateway itself (a name with no enum value, say), as the services'
    would come back."""
    return reply(request, http_status(grpc.StatusCode[exc.code]), exc.code, str(exc))


async def bad_request(request: Request, exc: RequestValidationError):
    locs = [[str(x) for x in e.get("loc", [])] for e in exc.errors()]
    parts = [f"{'.'.join(loc)}: {e.get('msg')}" for loc, e in zip(locs, exc.errors(), strict=True)]
    param = ".".join(locs[0][1:] if locs[0][:1] == ["body"] else locs[0]) if locs else None
    return reply(request, 400, "INVALID_ARGUMENT", "; ".join(parts) or "malformed request", param or None)


async def internal(request: Request, exc: Exception):
    log.exception("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
    return reply(request, 500, "INTERNAL", INTERNAL_MESSAGE)


async def http_error(request: Request, exc: StarletteHTTPException):
    codes = {404: "NOT_FOUND", 405: "INVALID_ARGUMENT", 413: "RESOURCE_EXHAUSTED"}
    return reply(request, exc.status_code, codes.get(exc.status_code, "INVALID_ARGUMENT"), str(exc.detail))


async def openai_refusal(request: Request, exc: OpenAIError):
    return openai_error(exc)


class HttpMetrics:
    """ASGI middleware: each request counted by method, route template and status, and timed to its
    response's headers (`metrics.observe_http`); `GET /metrics` answers with this process's metrics."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if scope["path"] == "/metrics" and scope["method"] in ("GET", "HEAD"):
            # in a thread: collectors may do I/O (the process's own /proc files)
            body = await asyncio.to_thread(generate_latest)
            return await Response(body, media_type=CONTENT_TYPE_LATEST)(scope, receive, send)
        started, answered = time.perf_counter(), False

        def observe(status: int) -> None:
            # the router has matched by now: the template, never the path (ids stay out of labels)
            route = getattr(scope.get("route"), "path", None)
            metrics.observe_http(scope["method"], route, status, time.perf_counter() - started)

        async def timed_send(message: Message) -> None:
            nonlocal answered
            if message["type"] == "http.response.start":
                answered = True
                observe(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, timed_send)
        except Exception:
            if not answered:  # the server's error middleware, outside this one, answers 500
                observe(500)
            raise


@asynccontextmanager
async def lifespan(app: FastAPI):
    app.state.clients = Clients.connect(app.state.settings)
    loop = type(asyncio.get_running_loop())
    log.info("gateway event loop: %s.%s", loop.__module__, loop.__name__)  # uvloop.Loop when installed
    yield
    await app.state.clients.close()


def create_app(settings: Settings | None = None) -> FastAPI:
    """The gateway app; Server-Sent Events streams send a `: ping` comment every
    `settings.sse_ping_s` seconds (DOCLORA_SSE_PING_S, 15)."""
    app = FastAPI(
        title="doclora",
        version="0.1.0",
        description="Turn documents into a chat bot that knows them.",
        lifespan=lifespan,
        docs_url=None,  # routes.docs serves /docs from local files
        redoc_url=None,  # ReDoc comes from a CDN only: blank offline
    )
    app.state.settings = settings = settings or Settings.from_env()
    app.add_exception_handler(grpc.aio.AioRpcError, rpc_error)
    app.add_exception_handler(DocloraError, domain_error)
    app.add_exception_handler(RequestValidationError, bad_request)
    app.add_exception_handler(Exception, internal)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(OpenAIError, openai_refusal)
    app.add_middleware(Credentials, settings=settings)
    install_guard(app, settings)  # runs before the routes: Host, Origin, body size
    app.add_middleware(HttpMetrics)  # added last, so it runs first: it sees the guard's refusals too
    for module in ROUTERS:
        app.include_router(module.router)
    return app
