"""The web UI: `GET /` serves `gateway/static/index.html`, and `GET /s/{token}` the chat-only page of
a share link, `gateway/static/share.html` (both left out of the OpenAPI document). A share token is
in its page's address, so neither page is cached nor names itself in a Referer header."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

STATIC = Path(__file__).parent.parent / "static"
PRIVATE = {"Referrer-Policy": "no-referrer", "Cache-Control": "no-store"}

router = APIRouter()


@router.get("/", include_in_schema=False)
async def index():
    return FileResponse(STATIC / "index.html", headers=PRIVATE)


@router.get("/s/{token}", include_in_schema=False)
async def share_page(token: str):
    """The page reads the token from its own address; the server checks it on each call the page makes."""
    return FileResponse(STATIC / "share.html", headers=PRIVATE)
