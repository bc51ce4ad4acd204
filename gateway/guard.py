"""The gateway's request guard, pure ASGI middleware in front of every route (`install`):

- `OriginGuard` refuses, with 403, a request whose Host is not a name the gateway answers to (DNS
  rebinding: a page on `evil.example` whose name now resolves to 127.0.0.1), and a browser's
  cross-site request: an `Origin` other than the request's own (or `null`), or no Origin with
  `Sec-Fetch-Site: cross-site`. Requests without these headers (curl, SDKs) pass.
- `BodyLimit` refuses, with 413, a request body over the limit of its kind (JSON text or a multipart
  upload): by its Content-Length before reading anything, and by counting the bytes as the app reads
  them, so that a chunked body is held to the same limit and the bytes past it never reach the app.

Refusals use the JSON error envelope of the path (`envelope`): OpenAI's under /v1, doclora's elsewhere.
Neither middleware buffers a response, so Server-Sent Events keep streaming."""

from __future__ import annotations

import logging
from urllib.parse import urlsplit

from fastapi import FastAPI
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.common import envelope
from services.common.access import is_loopback_addr
from services.common.config import Settings

log = logging.getLogger(__name__)
# Pasted text travels as JSON (escaped, so up to twice its size) and a multipart upload carries its
# form fields besides the files: the slack on top of each limit.
BODY_SLACK = 64 * 1024
DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}
# a top-level navigation (a link to the gateway, a share link in a mail) is cross-site without an
# Origin; it cannot read the answer and safe methods change nothing, so it passes
SAFE_METHODS = ("GET", "HEAD")


def split_host(text: str) -> tuple[str, int | None] | None:
    """(host, port) of a Host header `host[:port]` (an IPv6 address in brackets), the host in lower
    case without brackets or a final dot; None if `text` is not one."""
    try:
        parts = urlsplit("//" + text.strip())
        port = parts.port
    except ValueError:
        return None
    if not parts.hostname or parts.username is not None or parts.path or parts.query or parts.fragment:
        return None
    return parts.hostname.rstrip("."), port


def parse_origin(text: str) -> tuple[str, str, int | None] | None:
    """(scheme, host, port) of an origin `scheme://host[:port]`, the port defaulted by the scheme;
    None if `text` is not one (`null`, say)."""
    try:
        parts = urlsplit(text.strip())
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if not scheme or not parts.hostname or parts.username is not None or parts.path not in ("", "/"):
        return None
    return scheme, parts.hostname.rstrip("."), port or DEFAULT_PORTS.get(scheme)


def is_loopback_name(host: str) -> bool:
    """Whether a host name (no port, no brackets) names this machine: localhost, *.localhost
    (RFC 6761), 127.0.0.0/8 or ::1."""
    return host == "localhost" or host.endswith(".localhost") or is_loopback_addr(host)


def _names(text: str) -> list[str]:
    return [name.strip().lower() for name in text.split(",") if name.strip()]


class OriginGuard:
    """Refuses (403) a Host the gateway does not answer to, and a browser's cross-site request."""

    def __init__(self, app: ASGIApp, settings: Settings):
        self.app = app
        entries = _names(settings.allowed_hosts)
        self.any_host = "*" in entries
        hosts = [split_host(e) for e in entries if e != "*"]
        self.hosts = {h[0] for h in hosts if h}
        bind = settings.gateway_host.strip("[]").lower()
        # on loopback every request checks its Host; beyond, only where DOCLORA_ALLOWED_HOSTS is set
        self.check_hosts = not self.any_host and (is_loopback_addr(bind) or bool(self.hosts))
        self.hosts.add(bind)
        entries = _names(settings.allowed_origins)
        self.any_origin = "*" in entries
        self.origins = {parse_origin(e) for e in entries if e != "*"} - {None}

    def _host_allowed(self, host: str) -> bool:
        if is_loopback_name(host) or host in self.hosts:
            return True
        return any(h.startswith("*.") and host.endswith(h[1:]) for h in self.hosts)

    def host_refusal(self, host: str | None) -> str | None:
        """Why a request with this Host header is refused; None if it is not (no header: HTTP/1.0)."""
        if not self.check_hosts or host is None:
            return None
        parsed = split_host(host)
        if parsed and self._host_allowed(parsed[0]):
            return None
        return (
            f"this gateway does not answer to the host {host!r} (a browser may reach it by another name "
            "to get around its same-origin policy); to serve that name, set DOCLORA_ALLOWED_HOSTS "
            "(comma-separated host names, or * for any)"
        )

    def origin_refusal(self, scope: Scope, headers: Headers) -> str | None:
        """Why a browser's cross-site request is refused; None if it is same-origin, allowed, or
        comes from no browser."""
        origin = headers.get("origin")
        if origin is None:
            cross = headers.get("sec-fetch-site") == "cross-site"
            navigation = headers.get("sec-fetch-mode") == "navigate" and scope["method"] in SAFE_METHODS
            if cross and not navigation and not self.any_origin:
                return (
                    "cross-site request refused (Sec-Fetch-Site: cross-site); to accept requests from "
                    "another site, set DOCLORA_ALLOWED_ORIGINS to its origin (scheme://host:port)"
                )
            return None
        parsed = parse_origin(origin)
        if parsed is not None and (self.any_origin or parsed in self.origins or parsed == own_origin(scope)):
            return None
        return (
            f"cross-origin request from {origin!r} refused; to accept it, add that origin to "
            "DOCLORA_ALLOWED_ORIGINS (comma-separated scheme://host:port)"
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        why = self.host_refusal(headers.get("host")) or self.origin_refusal(scope, headers)
        if why is None:
            return await self.app(scope, receive, send)
        log.warning("refused %s %s: %s", scope["method"], scope["path"], why)
        await envelope(scope["path"], 403, "PERMISSION_DENIED", why)(scope, receive, send)


def own_origin(scope: Scope) -> tuple[str, str, int | None] | None:
    """The origin a request was sent to: the scheme it came in by and its Host (else the address it
    reached), as `parse_origin` gives it."""
    scheme = scope.get("scheme", "http")
    host = Headers(scope=scope).get("host")
    if host is not None:
        parsed = split_host(host)
        if parsed is None:
            return None
        name, port = parsed
    elif scope.get("server"):
        name, port = str(scope["server"][0]).lower(), scope["server"][1]
    else:
        return None
    return scheme, name, port or DEFAULT_PORTS.get(scheme)


class BodyTooLarge(Exception):
    """Raised to the app by `BodyLimit`'s receive once the body passed its limit."""


class BodyLimit:
    """Refuses (413) a request body over its limit: `max_text_bytes * 2 + BODY_SLACK` (JSON text),
    `max_upload_bytes + BODY_SLACK` (multipart; files stream on and ingest checks each)."""

    def __init__(self, app: ASGIApp, settings: Settings):
        self.app = app
        self.text_limit = settings.max_text_bytes * 2 + BODY_SLACK
        self.upload_limit = settings.max_upload_bytes + BODY_SLACK

    def limit(self, headers: Headers) -> int:
        return (
            self.upload_limit if headers.get("content-type", "").startswith("multipart/") else self.text_limit
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        limit = self.limit(headers)
        length = headers.get("content-length", "").strip()
        if length.isdigit() and int(length) > limit:
            message = f"request body of {length} bytes is too large (the limit is {limit} bytes)"
            return await envelope(scope["path"], 413, "RESOURCE_EXHAUSTED", message)(scope, receive, send)

        received, over, started = 0, False, False

        async def limited_receive() -> Message:
            nonlocal received, over
            if over:
                raise BodyTooLarge()
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    over = True  # this chunk and the rest never reach the app
                    raise BodyTooLarge()
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if over and not started:
                return  # the app answers the failed read; the 413 below answers instead
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not over:
                raise
        if over and not started:
            message = f"request body over {limit} bytes is too large"
            await envelope(scope["path"], 413, "RESOURCE_EXHAUSTED", message)(scope, receive, send)


def install(app: FastAPI, settings: Settings) -> None:
    """Adds the guard to `app`: `OriginGuard` outermost (nothing is read for a refused request),
    then `BodyLimit`."""
    app.add_middleware(BodyLimit, settings=settings)
    app.add_middleware(OriginGuard, settings=settings)  # added last: runs first
